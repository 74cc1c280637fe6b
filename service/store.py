"""The loaded model repository: every model and version, their state, load/unload/reload.

Layout read (what ``kanmoe export`` writes, Triton-compatible)::

    REPO/NAME/N/model.onnx + REPO/NAME/N/kanmoe.json   (N a positive integer)

A version that fails to load is kept as UNAVAILABLE with its reason; the versions already
serving are untouched, so a corrupt new export never takes a model down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kanmoe.service.batcher import MicroBatcher, Outputs
from kanmoe.service.model_spec import MODEL_FILE_NAME, ModelSpec, ModelSpecError, load_spec
from kanmoe.service.runtime import CUDA, ModelLoadError, OnnxModel
from kanmoe.service.settings import ServeSettings

log = logging.getLogger("kanmoe.service")

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"


class NotFound(LookupError):
    """Unknown model or version: answer 404."""


class NotReady(RuntimeError):
    """Known model, but no version of it can serve now: answer 503."""


@dataclass
class LoadedVersion:
    name: str
    version: str
    path: Path
    state: str = LOADING
    reason: str = ""
    spec: ModelSpec | None = None
    model: OnnxModel | None = None
    batcher: MicroBatcher | None = None
    stamp: tuple[int, int] = (0, 0)  # (mtime_ns, size) of model.onnx when loaded
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def reload_failed(self) -> bool:
        """Serving, but the last reload could not read its files (they changed on disk)."""
        return self.ready and "reload_error" in self.extra

    def entry(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "state": self.state,
            "reason": self.reason,
        }


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def _version_dirs(model_dir: Path) -> dict[str, Path]:
    if not model_dir.is_dir():
        return {}
    return {
        p.name: p
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    }


class ModelStore:
    def __init__(self, settings: ServeSettings, metrics: Any | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.root = Path(settings.repository)
        self.models: dict[str, dict[str, LoadedVersion]] = {}
        self._lock = asyncio.Lock()
        self.loaded = False  # the first load of the whole repository has finished
        self.load_error = ""

    # -- queries ------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return sorted(self.models)

    def get(self, name: str, version: str | None = None) -> LoadedVersion:
        """The version asked for, or the newest READY one; NotFound / NotReady otherwise."""
        versions = self.models.get(name)
        if not versions and not self.loaded:  # it may yet appear: "not yet", not "no such"
            raise NotReady(f"the model repository is still loading; model {name!r} not yet")
        if not versions:
            raise NotFound(
                f"unknown model {name!r}; models: {', '.join(self.model_names()) or 'none'}"
            )
        if version is not None and version != "":
            found = versions.get(version)
            if found is None:
                raise NotFound(
                    f"model {name!r} has no version {version!r}; versions: "
                    f"{', '.join(sorted(versions, key=int))}"
                )
            return found
        ready = [v for v in versions.values() if v.ready]
        if not ready:
            reasons = "; ".join(
                f"version {v.version}: {v.reason or v.state}" for v in versions.values()
            )
            raise NotReady(f"model {name!r} has no ready version ({reasons})")
        return max(ready, key=lambda v: int(v.version))

    def serving(self, name: str, version: str | None = None) -> LoadedVersion:
        found = self.get(name, version)
        if not found.ready:
            raise NotReady(
                f"model {name!r} version {found.version} is {found.state}: {found.reason}"
            )
        return found

    def all_versions(self) -> list[LoadedVersion]:
        return [
            v
            for name in self.model_names()
            for v in sorted(self.models[name].values(), key=lambda v: int(v.version))
        ]

    def ready(self) -> bool:
        """Every model has a READY version (and, when required, runs on the GPU)."""
        if not self.loaded or not self.models:
            return False
        for versions in self.models.values():
            ready = [v for v in versions.values() if v.ready]
            if not ready:
                return False
            if self.settings.require_gpu and not all(v.model and v.model.on_gpu for v in ready):
                return False
        return True

    # -- loading ------------------------------------------------------------------------
    def scan(self) -> list[str]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} does not exist")
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    async def load_all(self) -> None:
        """First load of the whole repository; ``loaded`` (and ``load_error``) record the end.

        A missing or unreadable repository is recorded, not raised: the process stays up,
        live but not ready, and says why.
        """
        try:
            for name in self.scan():
                await self.load(name)
        except Exception as exc:  # whatever went wrong, the process must stay up and say it
            self.load_error = str(exc)
            log.error("model repository not loaded: %s", exc)
        finally:
            self.loaded = True

    async def load(self, name: str) -> list[LoadedVersion]:
        """(Re)load ``name`` from disk: new or changed versions load, vanished ones unload."""
        async with self._lock:
            model_dir = self.root / name
            dirs = _version_dirs(model_dir)
            if not dirs:
                raise NotFound(
                    f"no model {name!r} in repository {self.root} (expected {model_dir}/N/)"
                )
            current = self.models.setdefault(name, {})
            for version in list(current):
                if version not in dirs:
                    await self._close(current.pop(version))
            for version, path in sorted(dirs.items(), key=lambda kv: int(kv[0])):
                old = current.get(version)
                if old is not None and old.ready and old.stamp == _stamp(path / MODEL_FILE_NAME):
                    old.extra.pop("reload_error", None)  # the file it was loaded from is back
                    continue
                fresh = await asyncio.to_thread(self._open, name, version, path)
                if fresh.ready:
                    current[version] = fresh
                    if old is not None:  # same labels: the fresh version keeps its series
                        await self._close(old, forget_metrics=False)
                elif old is not None and old.ready:
                    log.error(
                        "model %s version %s: reload failed, keeping the loaded one: %s",
                        name,
                        version,
                        fresh.reason,
                    )
                    old.extra["reload_error"] = fresh.reason
                else:
                    current[version] = fresh
            return list(current.values())

    async def unload(self, name: str) -> None:
        async with self._lock:
            versions = self.models.pop(name, None)
            if versions is None:
                raise NotFound(f"unknown model {name!r}")
            for v in versions.values():
                await self._close(v)

    def _open(self, name: str, version: str, path: Path) -> LoadedVersion:
        entry = LoadedVersion(name, version, path, stamp=_stamp(path / MODEL_FILE_NAME))
        s = self.settings
        try:
            spec = load_spec(path, name=name)
            onnx_path = path / MODEL_FILE_NAME
            if not onnx_path.is_file():
                raise ModelLoadError(f"{onnx_path} is missing")
            model = OnnxModel(onnx_path, spec, s.providers, s.intra_op_threads)
            model.warm_up()
        except (ModelSpecError, ModelLoadError, OSError) as exc:
            entry.state, entry.reason = UNAVAILABLE, str(exc)
            log.error("model %s version %s failed to load: %s", name, version, exc)
            return entry
        entry.spec, entry.model = spec, model
        entry.batcher = MicroBatcher(
            model.run,
            run_full=model.run_full,
            max_batch_rows=s.max_batch_size,
            max_delay_s=s.max_delay_ms / 1000.0,
            max_queue_rows=s.max_queue_rows,
            enabled=s.batching,
            on_batch=self._batch_hook(spec) if self.metrics is not None else None,
        )
        if self.metrics is not None:
            self.metrics.add_model(spec, model.providers)
        entry.state = READY
        gpu = "on the GPU" if CUDA in model.providers else "on the CPU"
        log.info(
            "model %s version %s ready %s (providers %s)",
            name,
            version,
            gpu,
            ",".join(model.providers),
        )
        return entry

    def _batch_hook(self, spec: ModelSpec):
        metrics = self.metrics
        gates = spec.gates

        def hook(x: np.ndarray, outputs: Outputs, seconds: float) -> None:
            # (rows, T, E) gates of sequence models are read at the last step by the metrics
            weights = {g.layer: outputs[g.output] for g in gates}
            metrics.observe_batch(spec, int(x.shape[0]), seconds, x, weights)

        return hook

    async def _close(self, entry: LoadedVersion, forget_metrics: bool = True) -> None:
        if entry.batcher is not None:
            await entry.batcher.close(self.settings.drain_timeout_s)
        if forget_metrics and self.metrics is not None and entry.spec is not None:
            self.metrics.remove_model(entry.name, entry.version)
        entry.state, entry.reason = UNAVAILABLE, "unloaded"

    async def close(self) -> None:
        for versions in self.models.values():
            for v in versions.values():
                await self._close(v)
