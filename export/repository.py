"""Triton-style model repository writer: ``REPO/NAME/config.pbtxt`` + ``REPO/NAME/N/``.

Layout written for one export::

    REPO/NAME/config.pbtxt        platform onnxruntime_onnx, inputs/outputs, dynamic batching
    REPO/NAME/N/model.onnx        the self-contained model (ai.kanmoe functions attached)
    REPO/NAME/N/kanmoe.json       feature/target/expert names, metrics, version, config hash,
                                  and (when the run's data can be rebuilt) the training feature
                                  ranges and the test-split gate reference (kanmoe.export.stats)
    REPO/NAME/N/functions.json    the learned 1-D functions of every KAN layer, sampled over
                                  the training data's range (kanmoe.export.functions)

Everything is built in a temporary directory beside the target and moved in with renames,
so a failed export leaves nothing behind and readers never see a half-written version.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kanmoe.errors import ExportError
from kanmoe.export.exporter import read_metadata

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_MAX_BATCH_SIZE = 1024
DEFAULT_QUEUE_DELAY_US = 1000
log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DIR_MODE = 0o777 & ~_umask()


def _dims(value_info: onnx.ValueInfoProto) -> list[int]:
    """Dims without the batch axis; -1 for dynamic ones (Triton convention)."""
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims][1:]


def config_pbtxt(model: onnx.ModelProto, name: str, max_batch_size: int) -> str:
    """Triton ``config.pbtxt`` text for the model (batch axis implied by max_batch_size)."""

    def tensor(v: onnx.ValueInfoProto) -> str:
        dims = ", ".join(str(d) for d in _dims(v))
        return f'  {{\n    name: "{v.name}"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n  }}'

    for v in [*model.graph.input, *model.graph.output]:
        if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"tensor {v.name!r} is not float32; the repository expects FP32")
    inputs = ",\n".join(tensor(v) for v in model.graph.input)
    outputs = ",\n".join(tensor(v) for v in model.graph.output)
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {DEFAULT_QUEUE_DELAY_US}\n"
        "}\n"
    )


def model_info(
    model: onnx.ModelProto, name: str, version: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``kanmoe.json`` sidecar: the model's metadata, tensor names and shapes, then ``extra``.

    ``extra`` holds what is not in the ONNX file (e.g. training feature ranges); it may not
    redefine a key taken from the model, so the sidecar never contradicts the graph.
    """
    info: dict[str, Any] = {"name": name, "version": version, **read_metadata(model)}
    info["inputs"] = {v.name: _dims(v) for v in model.graph.input}
    info["outputs"] = {v.name: _dims(v) for v in model.graph.output}
    clash = sorted(set(extra or {}) & set(info))
    if clash:
        raise ExportError(f"kanmoe.json: extra keys {clash} would replace the model's own")
    info.update(extra or {})
    return info


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@dataclass(frozen=True)
class WrittenModel:
    model_dir: Path
    version: int

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)

    @property
    def onnx_path(self) -> Path:
        return self.version_dir / "model.onnx"


def _check_target(repository: Path, name: str, version: int | None) -> None:
    if not NAME_RE.match(name):
        raise ExportError(f"--name {name!r}: use letters, digits, '_', '-', '.' only")
    if version is not None and (isinstance(version, bool) or int(version) < 1):
        raise ExportError(f"--version must be a positive integer, got {version!r}")
    if repository.exists() and not repository.is_dir():
        raise ExportError(f"--repository {repository} exists and is not a directory")


def write_repository_entry(
    model: onnx.ModelProto,
    repository: str | Path,
    name: str,
    version: int | None = None,
    force: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    extra: Mapping[str, Any] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> WrittenModel:
    """Write ``model`` as ``repository/name/version``; ``version=None`` means next free one.

    An existing version is an error unless ``force``, which replaces it. ``config.pbtxt`` is
    rewritten to describe the new model. ``extra`` keys are added to ``kanmoe.json``;
    ``files`` (name -> bytes, e.g. ``functions.json``) are written beside the model.
    """
    repository = Path(repository)
    _check_target(repository, name, version)
    model_dir = repository / name
    versions = existing_versions(model_dir)
    version = int(version) if version is not None else (versions[-1] + 1 if versions else 1)
    target = model_dir / str(version)
    if target.exists() and not force:
        raise ExportError(f"{target} already exists (pass --force to replace it)")
    repository.mkdir(parents=True, exist_ok=True)
    created_repo_dir = not model_dir.exists()
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    os.chmod(stage, _DIR_MODE)  # mkdtemp makes 0700; servers often run as another user
    trash: Path | None = None
    published = False
    try:
        (stage / str(version)).mkdir()
        onnx.save_model(model, stage / str(version) / "model.onnx")
        info = json.dumps(model_info(model, name, version, extra), indent=2, default=str)
        (stage / str(version) / "kanmoe.json").write_text(info + "\n")
        for file_name, data in (files or {}).items():
            if file_name in ("model.onnx", "kanmoe.json") or Path(file_name).name != file_name:
                raise ExportError(f"extra file name {file_name!r} is not allowed")
            (stage / str(version) / file_name).write_bytes(data)
        (stage / "config.pbtxt").write_text(config_pbtxt(model, name, max_batch_size))
        if created_repo_dir:
            os.rename(stage, model_dir)  # one rename publishes the whole model
            return WrittenModel(model_dir, version)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=repository))
            os.rename(target, trash / str(version))
        os.rename(stage / str(version), target)
        published = True
        os.replace(stage / "config.pbtxt", model_dir / "config.pbtxt")
        return WrittenModel(model_dir, version)
    except BaseException:
        if published:  # config.pbtxt failed after the new version went live: take it back
            os.rename(target, stage / "unpublished")
        if trash is not None and (trash / str(version)).exists() and not target.exists():
            os.rename(trash / str(version), target)  # put the old version back
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _real_inputs(servable: Any, rows: int = 256):
    """Up to ``rows`` test-split rows (or windows) of the run's own data, for ``--check``;
    None when the data cannot be rebuilt (the check then uses random inputs only)."""
    try:
        from kanmoe.errors import KanmoeError
        from kanmoe.model.config import validate_config
        from kanmoe.model.data import load_dataset
    except ImportError:
        return None
    try:
        data = load_dataset(validate_config(servable.config).data)
    except (KanmoeError, OSError, ValueError):
        return None
    x = data.x.get("test")
    if x is None or not len(x):
        return None
    return np.ascontiguousarray(x[:rows], dtype=np.float32)


@dataclass(frozen=True)
class ExportResult:
    written: WrittenModel
    report: Any  # kanmoe.export.verify.VerifyReport or None
    # Why kanmoe.json lacks feature_ranges/gate_reference (data not rebuilt); None if it has them.
    stats_skipped: str | None = None


def export_run(
    run_dir: str | Path,
    repository: str | Path,
    name: str,
    version: int | None = None,
    check: bool = False,
    force: bool = False,
) -> ExportResult:
    """Load a trained run, export it, optionally verify parity, then write the repository entry.

    Nothing is written unless every earlier step succeeded. The sidecar also gets the run's
    training feature ranges and test-split gate reference (:mod:`kanmoe.export.stats`); when
    the run's data cannot be rebuilt it is written without them and one warning line says so.
    """
    from kanmoe.export.exporter import export_model
    from kanmoe.export.functions import FUNCTIONS_FILE, functions_document, functions_json_bytes
    from kanmoe.export.stats import run_stats
    from kanmoe.model.run import load_run

    repository = Path(repository)
    _check_target(repository, name, version)
    target = repository / name / str(version)
    if version is not None and target.exists() and not force:
        raise ExportError(f"{target} already exists (pass --force to replace it)")
    servable = load_run(run_dir)
    model = export_model(servable)
    report = None
    if check:
        from kanmoe.export.verify import verify_model

        report = verify_model(servable, model, real_inputs=_real_inputs(servable))
    stats = run_stats(run_dir, servable)
    if stats.skipped:
        log.warning("kanmoe.json has no feature_ranges/gate_reference: %s", stats.skipped)
    functions = functions_json_bytes(functions_document(servable, run_dir))
    written = write_repository_entry(
        model,
        repository,
        name,
        version=version,
        force=force,
        extra=stats.values,
        files={FUNCTIONS_FILE: functions},
    )
    return ExportResult(written, report, stats.skipped)
