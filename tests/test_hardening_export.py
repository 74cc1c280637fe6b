"""``export_run`` under failure: a failed ``--check`` or a write that dies midway leaves the
repository exactly as it was (no new version, no half-written files, the old version intact).

Failures are injected at the one call that fails in real life (a model whose ONNX graph
really differs from torch, a disk that fills up during ``onnx.save_model``, a rename that
fails); everything else is the real export path on a tiny trained run.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import numpy_helper

from kanmoe.errors import ExportError
from kanmoe.export import exporter
from kanmoe.export import repository as repo_mod
from kanmoe.export.repository import export_run
from kanmoe.model.config import validate_config
from kanmoe.model.training import train_run

pytestmark = pytest.mark.slow
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, california_csv: Path) -> Path:
    root = tmp_path_factory.mktemp("export_hardening")
    pd.read_csv(california_csv).sample(n=300, random_state=9).to_csv(root / "d.csv", index=False)
    raw = {
        "name": "h",
        "data": {"path": str(root / "d.csv"), "target": "MedHouseVal"},
        "model": {"kind": "kamoe", "hidden": [6], "n_experts": 3, "gate_hidden": 4},
        "train": {"epochs": 1, "threads": 1, "progress": False},
    }
    train_run(validate_config(raw), root / "run", write_plots=False)
    return root / "run"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (hidden ones too) -> sha256 of its bytes."""
    if not root.exists():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, run_dir: Path) -> Path:
    """A repository holding version 1 of model 'm', written by the real export."""
    repo = tmp_path_factory.mktemp("published") / "repo"
    export_run(run_dir, repo, "m")
    assert (repo / "m" / "1" / "model.onnx").is_file()
    # re-exporting the same run gives the same bytes: this marker tells the versions apart
    (repo / "m" / "1" / "published.txt").write_text("version 1 as first published\n")
    return repo


def _copy_repo(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _skewed_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """export_model returns a graph whose float weights are 1% off: a real parity failure."""
    real = exporter.export_model

    def skewed(servable, *args, **kwargs) -> onnx.ModelProto:
        model = real(servable, *args, **kwargs)
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32 and arr.size > 1:
                init.CopyFrom(numpy_helper.from_array(arr * np.float32(1.01), init.name))
        return model

    monkeypatch.setattr(exporter, "export_model", skewed)


def test_failed_check_into_a_new_repository_creates_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _skewed_export(monkeypatch)
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="differs from torch"):
        export_run(run_dir, repo, "m", check=True)
    assert snapshot(repo) == {}


def test_failed_check_keeps_the_previous_version(
    run_dir: Path, published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _copy_repo(published, tmp_path / "repo")
    before = snapshot(repo)
    _skewed_export(monkeypatch)
    with pytest.raises(ExportError, match="differs from torch"):
        export_run(run_dir, repo, "m", version=1, check=True, force=True)
    assert snapshot(repo) == before


def test_failed_check_is_one_line_under_the_cli(
    run_dir: Path, published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from kanmoe.cli import app

    repo = _copy_repo(published, tmp_path / "repo")
    before = snapshot(repo)
    _skewed_export(monkeypatch)
    result = CliRunner().invoke(
        app, ["export", str(run_dir), "-r", str(repo), "-n", "m", "--check"]
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "differs from torch" in lines[0], lines
    assert snapshot(repo) == before


def test_check_passes_on_the_real_export(run_dir: Path, tmp_path: Path) -> None:
    """Without the skew the same check passes: the failures above are the check's doing."""
    result = export_run(run_dir, tmp_path / "repo", "m", check=True)
    assert result.report is not None and result.report.ok
    assert result.written.onnx_path.is_file()


def test_disk_full_during_force_write_keeps_the_old_version(
    run_dir: Path, published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _copy_repo(published, tmp_path / "repo")
    before = snapshot(repo)
    real_save = onnx.save_model

    def half_then_enospc(model, path, *args, **kwargs):
        Path(path).write_bytes(model.SerializeToString()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", half_then_enospc)
    with pytest.raises(OSError, match="No space") as excinfo:
        export_run(run_dir, repo, "m", version=1, force=True)
    monkeypatch.setattr(onnx, "save_model", real_save)
    assert any(e.name == "write_repository_entry" for e in excinfo.traceback)
    assert snapshot(repo) == before


def _failing_rename(monkeypatch: pytest.MonkeyPatch, fails) -> None:
    """os.rename / os.replace raise EIO when ``fails(src)`` is true; otherwise they work."""
    real_rename, real_replace = os.rename, os.replace

    def wrap(real):
        def call(src, dst, *a, **kw):
            if fails(Path(src)):
                raise OSError(errno.EIO, f"injected I/O error on {src}")
            return real(src, dst, *a, **kw)

        return call

    monkeypatch.setattr(repo_mod.os, "rename", wrap(real_rename))
    monkeypatch.setattr(repo_mod.os, "replace", wrap(real_replace))


def _in_stage(src: Path) -> bool:
    """The staged new version: repo/.m.<random>/1 (the old one goes to repo/.m.old.<random>)."""
    return src.parent.name.startswith(".m.") and not src.parent.name.startswith(".m.old.")


def test_force_rolls_back_when_publishing_the_new_version_fails(
    run_dir: Path, published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old version is already moved aside when moving the new one in fails: it comes back."""
    repo = _copy_repo(published, tmp_path / "repo")
    before = snapshot(repo)
    _failing_rename(monkeypatch, lambda src: _in_stage(src) and src.name == "1")
    with pytest.raises(OSError, match="injected") as excinfo:
        export_run(run_dir, repo, "m", version=1, force=True)
    monkeypatch.undo()
    assert any(e.name == "write_repository_entry" for e in excinfo.traceback)
    assert snapshot(repo) == before


def test_force_rolls_back_when_config_pbtxt_fails(
    run_dir: Path, published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _copy_repo(published, tmp_path / "repo")
    before = snapshot(repo)
    _failing_rename(monkeypatch, lambda src: _in_stage(src) and src.name == "config.pbtxt")
    with pytest.raises(OSError, match="injected"):
        export_run(run_dir, repo, "m", version=1, force=True)
    monkeypatch.undo()
    assert snapshot(repo) == before
