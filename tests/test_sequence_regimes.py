"""The synthetic regime generator: seeded, regimes visible in recent history, and found by a
small KAMoE's gate; plus the benchmark's smoke run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kanmoe.model.regimes import DEFAULT_REGIMES, FEATURES, generate

ROOT = Path(__file__).resolve().parent.parent


def test_generator_is_seeded_and_long_format() -> None:
    a, b, c = (
        generate(seed=3, n_steps=300),
        generate(seed=3, n_steps=300),
        generate(seed=4, n_steps=300),
    )
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["value"], c["value"])
    assert list(a.columns) == ["time", "series", *FEATURES, "regime"]
    assert len(a) == 3 * 300 and (a["value"] > 0).all()
    assert set(a["regime"]) == set(range(len(DEFAULT_REGIMES)))


def test_regimes_are_recoverable_from_recent_history() -> None:
    """By construction: a nearest-centroid rule on a 10-step mean of log(value) finds the
    regime far above chance (1/3), so a gate that reads recent history can too."""
    frame = generate(seed=1, n_steps=1500)
    hits, total = 0, 0
    for _, block in frame.groupby("series"):
        level = np.log(block["value"]).rolling(10).mean().to_numpy()[10:]
        regime = block["regime"].to_numpy()[10:]
        centroids = np.array([r.level for r in DEFAULT_REGIMES])
        guess = np.abs(level[:, None] - centroids[None, :]).argmin(axis=1)
        hits += int((guess == regime).sum())
        total += len(regime)
    assert hits / total > 0.75


def test_a_small_kamoe_routes_by_regime(tmp_path: Path) -> None:
    """Trained for seconds on a tiny instance, the argmax expert at each step shares far more
    information with the true regime than with the same regimes shuffled (chance)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the seed's result is then the same on every machine
    try:
        score, chance = _train_and_score(tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert score > 0.2 and score > 20 * chance, (score, chance)


def _train_and_score(tmp_path: Path) -> tuple[float, float]:
    import torch
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from kanmoe.model.builder import build_model
    from kanmoe.model.config import ModelConfig, SequenceData, TrainConfig
    from kanmoe.model.data import load_sequence
    from kanmoe.model.training import Trainer

    generate(n_series=2, n_steps=600, seed=0).to_csv(tmp_path / "r.csv", index=False)
    cfg = SequenceData(
        path=str(tmp_path / "r.csv"), features=FEATURES, lookback=12, normalization="minmax"
    )
    data = load_sequence(cfg)
    labels = load_sequence(cfg.model_copy(update={"features": ["regime"], "normalization": "none"}))
    x = {k: torch.from_numpy(data.prep.scale_x(v)) for k, v in data.x.items()}
    y = {k: torch.from_numpy(data.prep.scale_y(v)) for k, v in data.y.items()}
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            kind="kamoe", expert="gru", hidden=[8, 8], gate_hidden=8, load_balance_weight=0.1
        ),
        3,
        1,
        12,
    )
    train = TrainConfig(
        epochs=8, batch_size=64, lr=3e-3, weight_decay=0.0, scheduler="none", grad_clip=None
    )
    Trainer(model, train.model_copy(update={"progress": False}), seed=0).fit(
        x["train"], y["train"], x["val"], y["val"]
    )
    model.eval()
    with torch.no_grad():
        _, gates = model(torch.cat([x["train"], x["test"]]), return_gates=True)
    routed = gates["moe"].argmax(-1).flatten().numpy()
    regime = np.concatenate([labels.x["train"], labels.x["test"]])[..., 0].astype(int).flatten()
    shuffled = np.random.default_rng(0).permutation(regime)
    return nmi(regime, routed), nmi(shuffled, routed)


def test_benchmark_quick_runs(tmp_path: Path) -> None:
    """``benchmarks/sequences.py --quick``: every model trains on both data sets, the table
    has a row per model and the regimes part scores the gates (writes nothing)."""
    pytest.importorskip("pmdarima")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sequences
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    out = tmp_path / "runs.jsonl"
    threads = torch.get_num_threads()
    try:
        assert sequences.main(["--quick", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["dataset"], r["model"]) for r in rows} == {
        (d, m) for d in ("msft", "regimes") for m in sequences.MODELS
    }
    assert all(np.isfinite(r["test_r2"]) and r["epochs"] >= 1 for r in rows)
    assert all("nmi" in r for r in rows if r["dataset"] == "regimes" and "MoE" in r["model"])
