"""Ctrl-C for real: SIGINT to a ``kanmoe train`` process mid-epoch, then ``--resume``.

The process gets the signal while it trains its second epoch (right after the first
checkpoint appears). It must exit 130 with one line that says how to resume, leave a
checkpoint that loads, and ``--resume`` must finish the run exactly as an uninterrupted one.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from kanmoe.model.config import validate_config
from kanmoe.model.training import Trainer, train_run

pytestmark = pytest.mark.slow

EPOCHS = 5


def _config(data: Path) -> dict:
    return {
        "name": "sigint",
        "seed": 4,
        "data": {"path": str(data), "target": "MedHouseVal"},
        "model": {"kind": "kamoe", "hidden": [8], "n_experts": 3, "gate_hidden": 4},
        # small batches: an epoch takes long enough to be interrupted in the middle
        "train": {"epochs": EPOCHS, "batch_size": 16, "threads": 1, "progress": False},
    }


def _val_losses(run: Path) -> list[float]:
    with open(run / "history.csv") as fh:
        return [float(row["val_loss"]) for row in csv.DictReader(fh)]


def test_sigint_mid_epoch_exits_130_and_resume_finishes(
    tmp_path: Path, california_csv: Path
) -> None:
    data = tmp_path / "data.csv"
    pd.read_csv(california_csv).sample(n=1000, random_state=3).to_csv(data, index=False)
    raw = _config(data)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"

    proc = subprocess.Popen(
        [sys.executable, "-m", "kanmoe.cli", "train", "-c", str(cfg_path), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # the second epoch is running now
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"kanmoe train --out {out} --resume" in lines[0]
    assert "test r2" not in stdout  # it did not finish
    assert not (out / "weights.safetensors").exists()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")), "torn temp files"

    # the checkpoint loads into a fresh trainer for the same config
    cfg = validate_config(raw)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    done = state["epoch"]
    assert 1 <= done < EPOCHS and f"epoch {done}" in lines[0]
    from kanmoe.model.builder import build_model

    model = build_model(cfg.model, 8, 1, None, [f"f{i}" for i in range(8)])
    trainer = Trainer(model, cfg.train, seed=cfg.seed)
    trainer.load_checkpoint(out / "checkpoint.pt")
    assert trainer.start_epoch == done and len(trainer.result.history) == done

    # --resume finishes the run, and it is the same computation as an uninterrupted run
    from typer.testing import CliRunner

    from kanmoe.cli import app

    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    _, ref = train_run(cfg, tmp_path / "ref", write_plots=False)
    got, want = _val_losses(out), _val_losses(tmp_path / "ref")
    assert len(got) == EPOCHS
    assert got == pytest.approx(want, rel=1e-5)
    metrics = yaml.safe_load((out / "metrics.json").read_text())
    assert metrics["epochs"] == EPOCHS
    assert metrics["test"]["r2"] == pytest.approx(ref["test"]["r2"], rel=1e-5)


def test_sigint_before_any_checkpoint_says_nothing_to_resume(tmp_path: Path) -> None:
    """Interrupted while loading data or in the first epoch: no false promise of a resume."""
    from kanmoe.commands.train import _interrupted_message

    message = _interrupted_message(tmp_path)
    assert "nothing to resume" in message and "--resume" not in message
    (tmp_path / "checkpoint.pt").write_bytes(b"torn")
    assert "nothing to resume" in _interrupted_message(tmp_path)


def test_resume_from_a_torn_checkpoint_is_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kanmoe.cli import app

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x"}))
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn zip")
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path), "--resume"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable checkpoint" in lines[0], lines


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_runs_code_from_a_foreign_checkpoint(tmp_path: Path) -> None:
    """A checkpoint is loaded with weights_only: an object that would run code is refused."""
    from typer.testing import CliRunner

    from kanmoe.cli import app

    marker = tmp_path / "code-ran"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x"}))
    torch.save({"epoch": 1, "model": _RunsCodeWhenUnpickled(marker)}, tmp_path / "checkpoint.pt")
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path), "--resume"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Python objects a checkpoint never has" in lines[0], lines
    assert "pathlib" in lines[0] and not marker.exists()
