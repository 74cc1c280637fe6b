"""Sequence benchmark: a minimal paper-recipe GRU against kanmoe's sequence models.

Two data sets that ship or are generated, so anyone can rerun this offline:

- ``msft``: daily Microsoft volume (the last 3,000 days, 2006-2017) from the ``pmdarima``
  wheel (``load_msft()``), target Volume, features Volume, |log return| and the high-low
  range over the close, each divided by its rolling 63-day median (one quarter) shifted by
  the horizon.
- ``regimes``: kanmoe's seeded regime-switching generator (``kanmoe.model.regimes``), three
  series of 800 steps, MinMax-scaled; the true regime scores the gates (normalised mutual
  information between the routed expert at a window's last step and the regime there).

Models, same data, windows, split (chronological 64/16/20) and epoch cap: ``GRU (minimal)``,
written here with the KAMoE paper's recipe (Adam 1e-3, batch 128, MSE, early stopping with
patience 10 and best weights restored, no scheduler, no clipping), and kanmoe's ``GRU``,
``LSTM``, ``MoE_GRU`` (GRN gate), ``KAMoE_GRU`` and ``KAMoE_LSTM`` (GRKAN gate) trained by
kanmoe's ``Trainer`` with the shipped ``configs/sequence_kamoe_gru.yaml`` train section.

Run from the repo root: ``python benchmarks/sequences.py`` (``make bench-seq``) writes the
``sequences`` section of RESULTS.md; ``--quick`` is a smoke run (seconds) that writes nothing
unless ``--write`` is given. ``--set train.x=...`` overrides the kanmoe config (ablations);
``--json`` keeps every run's numbers and ``--from-json`` renders the
section from such files (the published table was run in pieces that way). The reading by
hand (goal lines, ablation) is ``benchmarks/sequences_reading.md``, appended to the section.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # sibling module: the script runs as a file, not as a package
from sequences_report import plot_gates, section_text, table

from kanmoe.model.config import (
    ModelConfig,
    SequenceData,
    TrainConfig,
    apply_overrides,
    read_yaml,
    validate_config,
)
from kanmoe.model.data import Dataset, load_sequence
from kanmoe.model.training import scaled_splits

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs" / "sequence_kamoe_gru.yaml"
REFERENCE = "GRU (minimal)"
MSFT_DAYS = 3000  # the last 3,000 trading days: 2006-2017
REGIME_STEPS = 800  # per synthetic series
MODELS = {  # name -> model config fields over the shipped config's model section
    REFERENCE: None,
    "GRU": {"kind": "rnn", "expert": "gru"},
    "LSTM": {"kind": "rnn", "expert": "lstm"},
    "MoE_GRU": {"kind": "moe", "expert": "gru", "gate": "grn", "input_transform": False},
    "KAMoE_GRU": {"kind": "kamoe", "expert": "gru", "gate": "grkan"},
    "KAMoE_LSTM": {"kind": "kamoe", "expert": "lstm", "gate": "grkan"},
}


# -- data ------------------------------------------------------------------------------------
def msft_frame() -> pd.DataFrame:
    """Long-format daily MSFT frame from the pmdarima wheel (no download)."""
    from pmdarima.datasets import load_msft

    raw = load_msft()
    close = raw["Close"].astype(float)
    return pd.DataFrame(
        {
            "time": raw["Date"].astype(str),
            "series": "msft",
            "Volume": raw["Volume"].astype(float),
            "abs_return": np.abs(np.log(close).diff()).fillna(0.0),
            "hl_range": (raw["High"] - raw["Low"]) / close,
        }
    )


def regimes_frame(quick: bool) -> pd.DataFrame:
    from kanmoe.model.regimes import generate

    return generate(n_series=3, n_steps=400 if quick else REGIME_STEPS, seed=0)


def data_config(name: str, path: Path, horizon: int, lookback: int | None) -> SequenceData:
    common = {"path": str(path), "horizon": horizon, "lookback": lookback or "auto"}
    if name == "msft":
        return SequenceData(
            **common,
            target="Volume",
            features=["Volume", "abs_return", "hl_range"],
            normalization="rolling_median",
            window=63,
        )
    return SequenceData(
        **common, target="value", features=["value", "abs_change", "range"], normalization="minmax"
    )


@dataclass
class Prepared:
    data: Dataset
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    regime_last: np.ndarray | None  # true regime at each test window's last step


def prepare(name: str, frame: pd.DataFrame, workdir: Path, horizon: int, lookback) -> Prepared:
    path = workdir / f"{name}.csv"
    if not path.exists():
        frame.to_csv(path, index=False, float_format="%.9g")
    cfg = data_config(name, path, horizon, lookback)
    data = load_sequence(cfg)
    tensors = scaled_splits(data)
    regime_last = None
    if "regime" in frame.columns:  # same windows (minmax keeps every row): read the labels
        labels = load_sequence(
            cfg.model_copy(update={"features": ["regime"], "normalization": "none"})
        )
        regime_last = labels.x["test"][:, -1, 0].astype(int)
    return Prepared(data, tensors, regime_last)


# -- the reference: a minimal GRU with the paper's recipe ---------------------------------------
class MinimalGRU(nn.Module):
    """GRU(h, sequences) -> GRU(h) -> Linear(horizon): the paper's plain GRU model."""

    def __init__(self, n_in: int, hidden: list[int], n_out: int) -> None:
        super().__init__()
        widths = [n_in, *hidden]
        self.rnns = nn.ModuleList(
            nn.GRU(a, b, batch_first=True) for a, b in itertools.pairwise(widths)
        )
        self.head = nn.Linear(widths[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for rnn in self.rnns:
            x, _ = rnn(x)
        return self.head(x[:, -1])


def fit_minimal(model: nn.Module, p: Prepared, seed: int, max_epochs: int) -> dict:
    """Adam 1e-3, batch 128, MSE, early stopping (patience 10) restoring the best weights."""
    (xt, yt), (xv, yv) = p.tensors["train"], p.tensors["val"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.MSELoss()
    best, best_state, bad, epochs = math.inf, None, 0, 0
    started = time.perf_counter()
    for _ in range(max_epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 128):
            idx = perm[i : i + 128]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
        epochs += 1
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(xv), yv))
        if val < best:
            best, best_state, bad = val, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= 10:
                break
    seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    return {"epochs": epochs, "seconds": seconds}


# -- kanmoe's models through its own trainer --------------------------------------------------
def kanmoe_configs(
    model_name: str, hidden: list[int], max_epochs: int, overrides: list[str]
) -> tuple[ModelConfig, TrainConfig]:
    """The shipped config with ``model_name``'s model fields, then ``overrides`` on top."""
    raw = read_yaml(SHIPPED)
    raw["model"] = {**raw["model"], **MODELS[model_name], "hidden": hidden}
    if raw["model"]["kind"] == "rnn":  # MoE-only fields off for the plain RNN
        raw["model"] = {
            k: v for k, v in raw["model"].items() if k not in ("gate", "input_transform")
        }
    cfg = validate_config(apply_overrides(raw, overrides), source=str(SHIPPED))
    train_cfg = cfg.train.model_copy(
        update={"epochs": min(cfg.train.epochs, max_epochs), "progress": False}
    )
    return cfg.model, train_cfg


def fit_kanmoe(model: nn.Module, train_cfg: TrainConfig, p: Prepared, seed: int) -> dict:
    from kanmoe.model.training import Trainer

    xt = p.tensors["train"][0]
    steps = math.ceil(len(xt) / train_cfg.batch_size)
    trainer = Trainer(model, train_cfg, seed=seed, steps_per_epoch=steps)
    result = trainer.fit(*p.tensors["train"], *p.tensors["val"])
    return {
        "epochs": result.epochs,
        "seconds": result.train_seconds,
        "best_epoch": result.best_epoch,
    }


def r2(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """R² over all horizon steps (mean over targets); scale-free, so scaled units are fine."""
    from kanmoe.model.run import regression_metrics

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 4096]) for i in range(0, len(x), 4096)])
    return regression_metrics(y.double().numpy(), pred.double().numpy())["r2"]


def routed_nmi(model: nn.Module, p: Prepared) -> float | None:
    """NMI between the argmax expert at each test window's last step and the true regime."""
    from sklearn.metrics import normalized_mutual_info_score

    if p.regime_last is None or not hasattr(model, "gate_names") or not model.gate_names():
        return None
    model.eval()
    with torch.no_grad():
        _, gates = model(p.tensors["test"][0], return_gates=True)
    w = next(iter(gates.values()))
    routed = (w[:, -1] if w.dim() == 3 else w).argmax(dim=-1).numpy()
    return float(normalized_mutual_info_score(p.regime_last, routed))


def run_one(
    model_name: str,
    p: Prepared,
    seed: int,
    hidden: list[int],
    max_epochs: int,
    overrides: list[str],
) -> dict:
    from kanmoe.model.builder import build_model

    torch.manual_seed(seed)
    np.random.seed(seed)
    d = p.data
    if model_name == REFERENCE:
        model: nn.Module = MinimalGRU(d.n_features, hidden, d.n_targets)
        fit = fit_minimal(model, p, seed, max_epochs)
    else:
        model_cfg, train_cfg = kanmoe_configs(model_name, hidden, max_epochs, overrides)
        model = build_model(model_cfg, d.n_features, d.n_targets, d.seq_len)
        fit = fit_kanmoe(model, train_cfg, p, seed)
    row = {
        "model": model_name,
        "seed": seed,
        **fit,
        "sec_per_epoch": fit["seconds"] / max(1, fit["epochs"]),
        "train_r2": r2(model, *p.tensors["train"]),
        "val_r2": r2(model, *p.tensors["val"]),
        "test_r2": r2(model, *p.tensors["test"]),
    }
    nmi = routed_nmi(model, p)
    if nmi is not None:
        row["nmi"] = nmi
    row["_model"] = model
    return row


def regime_run(out: Path, hidden: list[int], max_epochs: int, overrides: list[str]) -> dict:
    """Train the shipped KAMoE_GRU config on the regimes data into ``out/run`` (h=1, seed 0),
    score routing on its test period through ``kanmoe predict``'s path, and draw the gate
    weights against the true regime into ``out/run/plots/gates_vs_regime.png``."""
    from sklearn.metrics import normalized_mutual_info_score

    from kanmoe.model.inference import predict_sequence_frame
    from kanmoe.model.training import train_run

    out.mkdir(parents=True, exist_ok=True)
    frame = regimes_frame(quick=False)
    frame.to_csv(out / "regimes.csv", index=False, float_format="%.9g")
    raw = read_yaml(SHIPPED)
    data = data_config("regimes", out / "regimes.csv", 1, None).model_dump()
    raw["data"] = {**data, "lookback": "auto"}
    raw["model"] = {**raw["model"], "hidden": hidden}
    raw["train"] = {**raw["train"], "epochs": max_epochs, "progress": False}
    cfg = validate_config(apply_overrides(raw, overrides), source=str(SHIPPED))
    servable, metrics = train_run(cfg, out / "run")
    pred = predict_sequence_frame(servable, frame)
    both = pred.merge(frame[["series", "time", "regime"]], on=["series", "time"])
    cut = {s: int(np.floor(len(g) * (1 - cfg.data.test_size))) for s, g in frame.groupby("series")}
    test = both[both["time"] >= both["series"].map(cut)]
    gate_cols = [c for c in test.columns if c.startswith("gate.")]
    routed = test[gate_cols].to_numpy().argmax(axis=1)
    nmi = float(normalized_mutual_info_score(test["regime"], routed))
    shown = test.groupby("series")["regime"].nunique().idxmax()  # most regimes in its test
    plot_gates(both[both["series"] == shown], gate_cols, nmi, cut[shown], out / "run" / "plots")
    return {"nmi": nmi, "test_r2": metrics["test"]["r2"], "epochs": metrics["epochs"]}


def speed(widths: list[int], rounds: int, overrides: list[str], seq_len: int = 45) -> str:
    """Training step time (forward, backward, AdamW step) of KAMoE_GRU / MoE_GRU vs GRU.

    Same width, the shipped batch size, 3 features, ``seq_len`` steps; the models take turns
    each round so machine noise hits all alike; the ratio of medians is reported.
    """
    from kanmoe.model.builder import build_model

    lines = [
        "| width | GRU ms/step | MoE_GRU / GRU | KAMoE_GRU / GRU |",
        "|---|---|---|---|",
    ]
    for w in widths:
        steps: dict[str, list[float]] = {}
        runners = {}
        for name in ("GRU", "MoE_GRU", "KAMoE_GRU"):
            model_cfg, train_cfg = kanmoe_configs(name, [w, w], 1, overrides)
            torch.manual_seed(0)
            model = build_model(model_cfg, 3, 1, seq_len)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = torch.randn(train_cfg.batch_size, seq_len, 3)
            y = torch.randn(train_cfg.batch_size, 1)

            def step(model=model, opt=opt, x=x, y=y) -> None:
                opt.zero_grad(set_to_none=True)
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()

            step()  # warm-up
            runners[name] = step
        for _ in range(rounds):
            for name, step in runners.items():
                t0 = time.perf_counter()
                step()
                steps.setdefault(name, []).append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in steps.items()}
        lines.append(
            f"| {w} | {med['GRU'] * 1e3:.1f} | {med['MoE_GRU'] / med['GRU']:.2f}x | "
            f"{med['KAMoE_GRU'] / med['GRU']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, writes nothing")
    ap.add_argument("--datasets", nargs="+", default=["msft", "regimes"])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--horizons", nargs="+", type=int, default=[1, 3, 6])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--hidden", nargs="+", type=int, default=[32, 32])
    ap.add_argument("--lookback", type=int, default=None, help="default: max(45, 5*horizon)")
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value")
    ap.add_argument("--json", type=Path, help="append every run's numbers to this JSON lines file")
    ap.add_argument(
        "--write", action="store_true", help="write RESULTS.md (default unless --quick)"
    )
    ap.add_argument("--no-write", action="store_true", help="never write RESULTS.md (ablations)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "sequence_regimes_gates.png")
    ap.add_argument(
        "--regime-run",
        type=Path,
        help="train the shipped config on the regimes data into DIR "
        "(plots/gates_vs_regime.png, copied to --plot) and report routing NMI; nothing else",
    )
    ap.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="build the table from these --json files "
        "(runs without overrides only) instead of training",
    )
    ap.add_argument(
        "--notes",
        type=Path,
        default=Path(__file__).with_name("sequences_reading.md"),
        help="markdown appended to the section: the reading by hand, goal lines, ablation",
    )
    ap.add_argument("--results", type=Path, default=results_file.RESULTS, help="file to write")
    ap.add_argument("--speed", action="store_true", help="only time training steps (goal 4)")
    ap.add_argument("--speed-widths", nargs="+", type=int, default=[32, 100])
    args = ap.parse_args(argv)
    if args.speed:
        torch.set_num_threads(args.threads)
        print(speed(args.speed_widths, 3 if args.quick else 15, args.overrides))
        return 0
    if args.regime_run:
        torch.set_num_threads(args.threads)
        got = regime_run(args.regime_run, args.hidden, args.max_epochs, args.overrides)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.regime_run / "run" / "plots" / "gates_vs_regime.png", args.plot)
        (args.regime_run / "regime.json").write_text(json.dumps(got) + "\n")
        print(json.dumps(got))
        return 0
    if args.from_json:
        rows = [json.loads(line) for f in args.from_json for line in f.read_text().splitlines()]
        for r in rows:  # runs with overrides become their own rows, labelled by them
            if r.get("overrides"):
                r["model"] += f" ({', '.join(o.split('.', 1)[-1] for o in r['overrides'])})"
        args.seeds = sorted({r["seed"] for r in rows})
        names = list(dict.fromkeys(r["model"] for r in rows))
        models = sorted(names, key=lambda n: (list(MODELS).index(n.split(" (")[0]), n))
        text = table(rows, args.datasets, args.horizons, models)
        print(text)
        results_file.update_section("sequences", section_text(args, text), args.results)
        return 0
    if args.quick:
        args.horizons, args.seeds, args.hidden = args.horizons[:1], args.seeds[:1], [8, 8]
        args.max_epochs, args.lookback = min(args.max_epochs, 2), args.lookback or 12
    write = (args.write or not args.quick) and not args.no_write
    torch.set_num_threads(args.threads)
    frames = {}
    for ds in args.datasets:
        frames[ds] = msft_frame() if ds == "msft" else regimes_frame(args.quick)
        if ds == "msft":  # 2006-2017 (quick: the last 1,200 days) keeps a run to minutes
            keep = 1200 if args.quick else MSFT_DAYS
            frames[ds] = frames[ds].iloc[-keep:].reset_index(drop=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.datasets:
            for h in args.horizons:
                p = prepare(ds, frames[ds], Path(tmp), h, args.lookback)
                for seed in args.seeds:
                    for m in args.models:
                        row = run_one(m, p, seed, args.hidden, args.max_epochs, args.overrides)
                        row.update(dataset=ds, horizon=h)
                        print(
                            f"{ds} h={h} seed={seed} {m:14s} test R² {row['test_r2']:.4f} "
                            f"train {row['train_r2']:.3f} val {row['val_r2']:.3f} "
                            f"epochs {row['epochs']} {row['sec_per_epoch']:.2f} s/ep"
                            + (f" NMI {row['nmi']:.3f}" if "nmi" in row else ""),
                            flush=True,
                        )
                        row.pop("_model")
                        rows.append(row)
                        if args.json:
                            with args.json.open("a") as fh:
                                fh.write(json.dumps({**row, "overrides": args.overrides}) + "\n")
    models = [m for m in MODELS if m in args.models]
    text = table(rows, args.datasets, args.horizons, models)
    print(text)
    if write:
        results_file.update_section("sequences", section_text(args, text), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
