"""kanmoe.json monitoring statistics: training feature ranges and the test-split gate reference.

References are computed here independently of kanmoe.export.stats: splits with pandas and
sklearn on the CSV itself, gate weights with the network called on hand-scaled tensors.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.model_selection import train_test_split

from kanmoe.errors import ExportError
from kanmoe.export.repository import export_run, model_info
from kanmoe.export.stats import run_stats
from kanmoe.model.config import apply_overrides, read_yaml, validate_config
from kanmoe.model.run import load_run
from kanmoe.model.training import train_run
from kanmoe.paths import CONFIGS_DIR, PROJECT_ROOT
from kanmoe.service.model_spec import load_spec

DEFAULT_RUN = PROJECT_ROOT / "default_run"
DEFAULT_ENTRY = PROJECT_ROOT / "model_repository" / "california_kamoe" / "1"


def _train_frame(df: pd.DataFrame, data: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) frames of the reference split, sklearn applied to the frame itself."""
    seed = data["split_seed"]
    rest, test = train_test_split(df, test_size=data["test_size"], random_state=seed)
    train, _ = train_test_split(rest, test_size=data["val_size"], random_state=seed)
    return train, test


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory, california_csv: Path) -> Path:
    """A 1-epoch KAMoE run (the shipped recipe, shrunk) on 1,500 rows of a reshuffled CSV."""
    csv = tmp_path_factory.mktemp("data") / "california_1500.csv"
    pd.read_csv(california_csv).sample(n=1500, random_state=1).to_csv(csv, index=False)
    raw = apply_overrides(
        read_yaml(CONFIGS_DIR / "california_kamoe.yaml"),
        [f"data.path={csv}", "train.epochs=1", "model.hidden=[8]", "model.gate_hidden=8"],
    )
    run = tmp_path_factory.mktemp("runs") / "tiny_kamoe"
    train_run(validate_config(raw), run, write_plots=False)
    return run


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_ranges_equal_the_train_split_of_the_csv(tabular_run: Path) -> None:
    stats = run_stats(tabular_run, load_run(tabular_run))
    assert stats.skipped is None and stats.values["input_units"] == "raw"
    data = _config(tabular_run)["data"]
    df = pd.read_csv(data["path"])
    train, test = _train_frame(df, data)
    features = [c for c in df.columns if c not in data["target"]]
    expected = {c: [float(train[c].min()), float(train[c].max())] for c in features}
    assert stats.values["feature_ranges"] == expected
    # the whole CSV is wider than its train split somewhere (else this test could not fail)
    assert any(df[c].min() < expected[c][0] or df[c].max() > expected[c][1] for c in features)
    assert stats.values["gate_reference"]["moe"]["rows"] == len(test)


def test_gate_reference_equals_an_independent_torch_computation(tabular_run: Path) -> None:
    servable = load_run(tabular_run)
    ref = run_stats(tabular_run, servable).values["gate_reference"]["moe"]
    data = _config(tabular_run)["data"]
    prep = json.loads((tabular_run / "preprocessing.json").read_text())
    _, test = _train_frame(pd.read_csv(data["path"]), data)
    x = torch.tensor(test[prep["feature_names"]].to_numpy(), dtype=torch.float64)
    z = (x - torch.tensor(prep["x_mean"])) / torch.tensor(prep["x_std"])
    z = z.clamp(-prep["input_clip"], prep["input_clip"]).float()
    with torch.no_grad():
        _, gates = servable.model(z, return_gates=True)
    w = gates["moe"].double()
    assert ref["split"] == "test" and ref["rows"] == len(test)
    np.testing.assert_allclose(ref["shares"], w.mean(0).numpy(), rtol=0, atol=1e-6)
    assert sum(ref["shares"]) == pytest.approx(1.0, abs=1e-6)  # softmax gate
    counts = torch.bincount(w.argmax(-1), minlength=w.shape[-1]).double() / len(w)
    np.testing.assert_allclose(ref["top1_shares"], counts.numpy(), rtol=0, atol=1e-12)
    assert sum(ref["top1_shares"]) == pytest.approx(1.0, abs=1e-12)


def test_export_run_writes_the_stats_into_the_sidecar(tmp_path: Path, tabular_run: Path) -> None:
    result = export_run(tabular_run, tmp_path / "repo", "tiny", version=1)
    assert result.stats_skipped is None
    info = json.loads((result.written.version_dir / "kanmoe.json").read_text())
    expected = run_stats(tabular_run, load_run(tabular_run)).values
    assert info["feature_ranges"] == expected["feature_ranges"]
    assert (
        info["gate_reference"]["moe"]["top1_shares"]
        == expected["gate_reference"]["moe"]["top1_shares"]
    )
    spec = load_spec(result.written.version_dir)  # the service's reader accepts it
    assert spec.feature_ranges and set(spec.feature_ranges) == set(info["feature_names"])
    shares = expected["gate_reference"]["moe"]["shares"]
    assert spec.gates[0].reference_shares == pytest.approx(shares)


def test_export_without_rebuildable_data_writes_the_model_without_stats(
    tmp_path: Path, tabular_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "moved_run"
    shutil.copytree(tabular_run, run)
    raw = _config(run)
    raw["data"]["path"] = str(tmp_path / "gone.csv")
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="kanmoe.export.repository"):
        result = export_run(run, tmp_path / "repo", "moved", version=1)
    assert result.written.onnx_path.is_file()
    info = json.loads((result.written.version_dir / "kanmoe.json").read_text())
    assert not {"feature_ranges", "gate_reference", "input_units"} & set(info)
    assert info["feature_names"][0] == "MedInc"
    assert "file not found" in (result.stats_skipped or "")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("kanmoe")]
    assert len(lines) == 1 and "\n" not in lines[0] and "gone.csv" in lines[0]
    assert load_spec(result.written.version_dir).feature_ranges is None


def test_changed_data_is_detected_not_described(tmp_path: Path, tabular_run: Path) -> None:
    """A CSV edited since training would give other rows: the stats are skipped, with why."""
    run = tmp_path / "run"
    shutil.copytree(tabular_run, run)
    raw = _config(run)
    df = pd.read_csv(raw["data"]["path"])
    df.loc[df.index[::7], "MedInc"] *= 1.5
    df.to_csv(tmp_path / "edited.csv", index=False)
    raw["data"]["path"] = str(tmp_path / "edited.csv")
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stats = run_stats(run, load_run(run))
    assert stats.values == {} and "x_mean" in (stats.skipped or "")


def test_extra_keys_may_not_replace_the_models_own() -> None:
    import onnx

    model = onnx.load(DEFAULT_ENTRY / "model.onnx", load_external_data=False)
    with pytest.raises(ExportError, match="feature_names"):
        model_info(model, "m", 1, extra={"feature_names": ["x"]})
    assert model_info(model, "m", 1, extra={"input_units": "raw"})["input_units"] == "raw"


def test_committed_default_model_sidecar_has_the_stats() -> None:
    info = json.loads((DEFAULT_ENTRY / "kanmoe.json").read_text())
    ranges, ref = info["feature_ranges"], info["gate_reference"]
    assert list(ranges) == info["feature_names"] and info["input_units"] == "raw"
    assert set(ref) == set(info["expert_names"])
    data = _config(DEFAULT_RUN)["data"]
    assert data["path"] == "builtin:california_housing" and data["split"] == "reference"
    from kanmoe.paths import CALIFORNIA_HOUSING_CSV

    df = pd.read_csv(CALIFORNIA_HOUSING_CSV)
    train, test = _train_frame(df, data)
    for name, (lo, hi) in ranges.items():
        assert train[name].between(lo, hi).all(), name
        assert (train[name].min(), train[name].max()) == (lo, hi), name
    for layer, r in ref.items():
        assert r["rows"] == len(test) and r["split"] == "test"
        assert len(r["shares"]) == len(info["expert_names"][layer])
        assert sum(r["shares"]) == pytest.approx(1.0, abs=1e-6)
        assert sum(r["top1_shares"]) == pytest.approx(1.0, abs=1e-9)
    # the committed sidecar is what default_run gives today (re-export when it changes)
    fresh = run_stats(DEFAULT_RUN, load_run(DEFAULT_RUN)).values
    assert fresh["feature_ranges"] == ranges
    for layer, r in ref.items():
        np.testing.assert_allclose(fresh["gate_reference"][layer]["shares"], r["shares"], atol=1e-6)


def _series_csv(path: Path, n_series: int = 2, length: int = 160) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_series):
        level = 50.0 * (s + 1)
        for t in range(length):
            value = level * (1.5 + np.sin(t / 6.0 + s)) + rng.normal(0, 1)
            rows.append({"time": t, "series": f"asset{s}", "value": value})
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(path, index=False)  # unordered
    return path


def test_sequence_run_export_carries_the_stats(tmp_path: Path) -> None:
    window, lookback, h = 6, 4, 2
    raw = apply_overrides(
        read_yaml(CONFIGS_DIR / "sequence_kamoe_gru.yaml"),
        [
            f"data.path={_series_csv(tmp_path / 'series.csv')}",
            f"data.window={window}",
            f"data.lookback={lookback}",
            f"data.horizon={h}",
            "model.hidden=[4, 4]",
            "train.epochs=1",
            "train.threads=1",
        ],
    )
    run = tmp_path / "run"
    train_run(validate_config(raw), run, write_plots=False)
    result = export_run(run, tmp_path / "repo", "seq", version=1)
    info = json.loads((result.written.version_dir / "kanmoe.json").read_text())
    assert info["is_sequence"] and "rolling median" in info["input_units"]

    # independent reference: per series in time order, value / rolling median shifted by h;
    # train windows end before the train period's last h steps, so they cover rows [0, a - h)
    df = pd.read_csv(tmp_path / "series.csv").sort_values(["series", "time"])
    # and test windows are those whose first target step lies in the test period [b, n)
    lows, highs, test_windows = [], [], []
    for _, g in df.groupby("series"):
        v = g["value"].reset_index(drop=True)
        x = (v / v.rolling(window).median().shift(h)).dropna().to_numpy()
        n = len(x)
        b = int(np.floor(n * 0.8))
        a = int(np.floor(b * 0.8))
        seen = x[: a - h].astype(np.float32)
        lows.append(seen.min())
        highs.append(seen.max())
        ends = range(max(lookback - 1, b - 1), n - h)
        test_windows += [x[e - lookback + 1 : e + 1, None] for e in ends]
    lo, hi = info["feature_ranges"]["value"]
    assert (np.float32(lo), np.float32(hi)) == (min(lows), max(highs))

    ref = info["gate_reference"]["moe"]
    assert ref["rows"] == len(test_windows) and len(ref["shares"]) == 3
    with torch.no_grad():
        _, gates = load_run(run)(torch.tensor(np.stack(test_windows), dtype=torch.float32))
    assert gates["moe"].ndim == 3  # per-step gate: the reference reads the last step
    last = gates["moe"][:, -1].double()
    np.testing.assert_allclose(ref["shares"], last.mean(0).numpy(), rtol=0, atol=1e-6)
    assert sum(ref["shares"]) == pytest.approx(1.0, abs=1e-6)
    assert sum(ref["top1_shares"]) == pytest.approx(1.0, abs=1e-9)
    assert load_spec(result.written.version_dir).gates[0].reference_shares is not None
