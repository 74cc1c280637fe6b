"""The training loop: AdamW, LR schedule, early stopping, checkpoints, KAN grid updates.

Data are pre-tensorised; each epoch draws one index permutation from a seeded generator
(faster than a DataLoader for small tabular batches and deterministic). After every epoch
the full trainer state goes to ``checkpoint.pt`` atomically, so Ctrl-C leaves the last
good checkpoint and ``resume=True`` continues from it.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kanmoe.model.config import TrainConfig
from kanmoe.model.distributed import all_sum, average_gradients, is_main, rank_and_world
from kanmoe.model.run import (
    atomic_save,
    predict_raw,
    regression_metrics,
    write_history,
)

EpochCallback = Callable[[int, dict], None]
CHECKPOINT = "checkpoint.pt"


def kan_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from kanmoe.model.layers import KANLinear
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, KANLinear)]


def kan_regularization(model: nn.Module) -> Tensor:
    terms = [m.regularization_loss() for m in kan_layers(model)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def aux_loss(model: nn.Module) -> Tensor:
    try:
        from kanmoe.model.moe import total_aux_loss
    except ImportError:
        return torch.zeros(())
    value = total_aux_loss(model)
    return value if isinstance(value, Tensor) else torch.as_tensor(float(value))


@torch.no_grad()
def update_kan_grids(model: nn.Module, x: Tensor) -> int:
    """Refit every KANLinear's grid to the inputs it sees on ``x``, first layer first.

    Each layer gets a fresh forward pass so it sees the inputs produced by the already
    updated layers before it. Returns the number of layers updated.
    """
    layers = kan_layers(model)
    was_training = model.training
    model.eval()
    for layer in layers:
        seen: list[Tensor] = []

        def hook(_module: nn.Module, args: tuple, seen: list[Tensor] = seen) -> None:
            seen.append(args[0].detach())

        handle = layer.register_forward_pre_hook(hook)
        try:
            model(x)
        finally:
            handle.remove()
        if seen:
            inputs = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
            layer.update_grid(inputs)
    model.train(was_training)
    return len(layers)


def _loss_fn(name: str) -> nn.Module:
    return {"mse": nn.MSELoss(), "huber": nn.HuberLoss(), "l1": nn.L1Loss()}[name]


def progress_enabled(mode: str | bool) -> bool:
    if isinstance(mode, bool):
        return mode
    return sys.stderr.isatty() and not os.environ.get("CI")


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = math.inf
    epochs: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False


class Trainer:
    """Fits ``model`` on scaled tensors; state is checkpointed to ``run_dir`` each epoch."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        seed: int = 0,
        run_dir: str | Path | None = None,
        callbacks: Sequence[EpochCallback] = (),
        steps_per_epoch: int = 1,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        self.loss_fn = _loss_fn(cfg.loss)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = self._make_scheduler()
        self.gen = torch.Generator().manual_seed(seed)
        self.result = FitResult()
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0
        self.start_epoch = 0
        self.rank, self.world = rank_and_world()

    def _make_scheduler(self):
        c = self.cfg
        if c.scheduler == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.opt, factor=c.plateau_factor, patience=c.plateau_patience, min_lr=c.min_lr
            )
        if c.scheduler == "onecycle":  # stepped per batch
            return torch.optim.lr_scheduler.OneCycleLR(
                self.opt,
                max_lr=c.lr,
                total_steps=c.epochs * self.steps_per_epoch + 1,
                pct_start=c.onecycle_pct_start,
                final_div_factor=max(1.0, c.lr / max(c.min_lr, 1e-12) / 25.0),
            )
        if c.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(
                self.opt, T_max=max(1, c.epochs), eta_min=c.min_lr
            )
        return None

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "epoch": self.start_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "result": self.result.__dict__,
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
        }

    def save_checkpoint(self) -> None:
        if self.run_dir is not None and self.rank == 0:
            state = self.state()
            atomic_save(self.run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, path: str | Path) -> None:
        from kanmoe.errors import ConfigError

        try:
            state = read_checkpoint(path)
        except Exception as exc:  # torch raises many types for a torn or foreign file
            raise ConfigError(f"--resume: {path} is not a readable checkpoint ({exc})") from None
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"--resume: {path} does not match this config's model/optimiser ({first})"
            ) from None
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.best_state = state["best_state"]
        self.bad_epochs = state["bad_epochs"]
        self.result = FitResult(**state["result"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        self.start_epoch = state["epoch"]

    # -- loop --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> float:
        self.model.eval()
        total, bs = 0.0, self.cfg.eval_batch_size
        for i in range(0, len(x), bs):
            total += float(self.loss_fn(self.model(x[i : i + bs]), y[i : i + bs])) * len(
                x[i : i + bs]
            )
        return total / max(1, len(x))

    def _expert_hooks(self, outputs: list[Tensor]) -> list:
        """Capture each expert's output of the first MoE layer during the normal forward."""
        from kanmoe.model.moe import moe_layers

        layers = list(moe_layers(self.model))
        if not layers:
            return []

        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> None:
            outputs.append(out)

        return [expert.register_forward_hook(hook) for expert in layers[0][1].experts]

    def _train_epoch(self, x: Tensor, y: Tensor) -> float:
        c = self.cfg
        self.model.train()
        perm = torch.randperm(len(x), generator=self.gen)
        total, n = 0.0, 0
        expert_out: list[Tensor] = []
        handles = self._expert_hooks(expert_out) if c.expert_loss_weight > 0 else []
        try:
            for i in range(0, len(x), c.batch_size):
                idx = perm[i : i + c.batch_size]
                if self.world > 1:  # this rank's slice; weight = its share of the batch
                    share = idx[self.rank :: self.world]
                    weight = len(share) * self.world / len(idx)
                    total += self._train_step(x[share], y[share], expert_out, weight) * len(share)
                    n += len(share)
                else:
                    total += self._train_step(x[idx], y[idx], expert_out) * len(idx)
                    n += len(idx)
        finally:
            for handle in handles:
                handle.remove()
        if self.world > 1:
            total, n = all_sum(total, n)
        return total / max(1, n)

    def _train_step(
        self, xb: Tensor, yb: Tensor, expert_out: list[Tensor], weight: float = 1.0
    ) -> float:
        """One optimiser step; returns the data loss. ``expert_out`` is filled by hooks.

        ``weight``: this rank's share of a data-parallel batch (see kanmoe.model.distributed).
        """
        c = self.cfg
        expert_out.clear()
        if len(xb) == 0:  # no rows of a short last batch here: join the step with zero grads
            self.opt.zero_grad(set_to_none=True)
            average_gradients(self.model.parameters(), self.world)
            self._clip_and_step()
            return 0.0
        data_loss = self.loss_fn(self.model(xb), yb)
        loss = data_loss * weight
        if expert_out:
            per_expert = torch.stack([self.loss_fn(out, yb) for out in expert_out])
            loss = loss + c.expert_loss_weight * per_expert.mean() * weight
        if c.aux_loss_weight > 0:
            loss = loss + c.aux_loss_weight * aux_loss(self.model)
        if c.kan_reg_weight > 0:
            loss = loss + c.kan_reg_weight * kan_regularization(self.model)
        if c.kan_smooth_weight > 0:
            from kanmoe.model.smoothness import kan_smoothness

            loss = loss + c.kan_smooth_weight * kan_smoothness(self.model)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            average_gradients(self.model.parameters(), self.world)
        self._clip_and_step()
        return float(data_loss.detach())

    def _clip_and_step(self) -> None:
        c = self.cfg
        if c.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.opt.step()
        if isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR):
            self.scheduler.step()

    def _warmup_lr(self, epoch: int) -> None:
        if self.cfg.scheduler == "onecycle":
            return  # OneCycle has its own warm-up
        if self.cfg.warmup_epochs and epoch < self.cfg.warmup_epochs:
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr * (epoch + 1) / self.cfg.warmup_epochs

    def fit(self, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor) -> FitResult:
        """Train until ``epochs`` or early stopping; restores the best weights at the end."""
        from tqdm.auto import tqdm

        c, r = self.cfg, self.result
        started = time.perf_counter() - r.train_seconds
        bar = tqdm(
            total=c.epochs,
            initial=self.start_epoch,
            desc="train",
            unit="ep",
            disable=not progress_enabled(c.progress) or self.rank != 0,
            leave=False,
        )
        try:
            for epoch in range(self.start_epoch, c.epochs):
                if r.stopped_early:
                    break
                if epoch in c.grid_update_epochs and kan_layers(self.model):
                    n = min(len(x_train), c.grid_update_samples)
                    sample = torch.randperm(len(x_train), generator=self.gen)[:n]
                    update_kan_grids(self.model, x_train[sample])
                self._warmup_lr(epoch)
                train_loss = self._train_epoch(x_train, y_train)
                val_loss = self.evaluate(x_val, y_val)
                lr = self.opt.param_groups[0]["lr"]
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.scheduler.step(val_loss)
                elif (
                    isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
                    and epoch >= c.warmup_epochs
                ):
                    self.scheduler.step()
                row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "lr": lr}
                r.history.append(row)
                if val_loss < r.best_val - c.min_delta:
                    r.best_val, r.best_epoch, self.bad_epochs = val_loss, epoch + 1, 0
                    self.best_state = copy.deepcopy(self.model.state_dict())
                else:
                    self.bad_epochs += 1
                r.stopped_early = self.bad_epochs >= c.patience or not math.isfinite(train_loss)
                r.epochs = epoch + 1
                r.train_seconds = time.perf_counter() - started
                self.start_epoch = epoch + 1
                self.save_checkpoint()
                bar.update(1)
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", lr=f"{lr:.1e}")
                for cb in self.callbacks:
                    cb(epoch + 1, row)
        finally:
            bar.close()
        if self.best_state is None and r.history and not math.isfinite(r.history[-1]["train_loss"]):
            from kanmoe.errors import TrainingError

            last = r.history[-1]
            raise TrainingError(
                f"training diverged: train loss {last['train_loss']} at epoch {last['epoch']} "
                f"before any finite validation loss; lower train.lr ({c.lr:g}) or set "
                "train.grad_clip"
            )
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return r


# What a checkpoint may hold besides tensors and plain containers: the numpy RNG state's
# array (its module path differs between numpy 1 and 2).
_NUMPY_GLOBALS = frozenset(
    {
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
)


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True``: tensors, plain containers and the numpy RNG
    state's array only, so a checkpoint from elsewhere cannot run code when resumed."""
    import importlib

    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    foreign = sorted(set(found) - _NUMPY_GLOBALS)
    if foreign:
        raise ValueError(f"it holds Python objects a checkpoint never has: {', '.join(foreign)}")
    allowed: list = [type(np.dtype(np.uint32))]  # built while unpickling, never listed
    for name in found:
        module, _, attr = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_epoch(path: str | Path) -> int | None:
    """Epochs completed in the checkpoint at ``path``; None when there is none (or unreadable)."""
    if not Path(path).is_file():
        return None
    try:
        return int(read_checkpoint(path)["epoch"])
    except Exception:  # a checkpoint we cannot read is no checkpoint to resume from
        return None


def scaled_splits(data) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train"|"val"|"test": (x, y)}`` as tensors in the model's (scaled) units."""
    prep = data.prep
    return {
        part: (
            torch.from_numpy(prep.scale_x(data.x[part])),
            torch.from_numpy(prep.scale_y(data.y[part])),
        )
        for part in ("train", "val", "test")
    }


# -- a whole run: data -> model -> fit -> run dir ------------------------------------------
def train_run(
    cfg,
    out_dir: str | Path,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
    write_plots: bool = True,
):
    """Train ``cfg`` (a ``RunConfig``) into ``out_dir``; returns (ServableModel, metrics)."""

    from kanmoe.errors import RunDirError
    from kanmoe.model.builder import build_model
    from kanmoe.model.data import load_dataset
    from kanmoe.model.features import fit_feature_layers

    out = Path(out_dir)
    main = is_main()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    ckpt = out / CHECKPOINT
    if resume and not ckpt.is_file():
        raise RunDirError(f"--resume: no {CHECKPOINT} in {out} (nothing to resume)")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data)
    prep = data.prep
    tensors = scaled_splits(data)
    model = build_model(
        cfg.model, data.n_features, data.n_targets, data.seq_len, prep.feature_names
    )
    fit_feature_layers(model, tensors["train"][0])
    if main:
        _prepare_run_dir(out, cfg, prep, resume)
    steps = math.ceil(len(tensors["train"][0]) / cfg.train.batch_size)
    trainer = Trainer(
        model, cfg.train, seed=cfg.seed, run_dir=out, callbacks=callbacks, steps_per_epoch=steps
    )
    if resume:
        trainer.load_checkpoint(ckpt)
    result = trainer.fit(*tensors["train"], *tensors["val"])
    if not main:  # every rank holds the same weights; rank 0 writes them
        return None, {}
    return _finish_run(out, cfg, model, data, prep, result, write_plots)


def _prepare_run_dir(out: Path, cfg, prep, resume: bool) -> None:
    import yaml

    from kanmoe.model.run import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run: drop the artefacts of whatever run was here before
        for name in (CHECKPOINT, "weights.safetensors", "metrics.json", "history.csv"):
            (out / name).unlink(missing_ok=True)
        for png in (out / "plots").glob("*.png"):
            png.unlink()
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(out / "preprocessing.json", prep.to_json())


def _finish_run(out: Path, cfg, model, data, prep, result, write_plots: bool):
    """Weights, metrics on every split, history and plots of a finished run (rank 0)."""
    import json

    from kanmoe.model.run import atomic_write_text, save_weights, servable_from_prep

    save_weights(model, out / "weights.safetensors")
    servable = servable_from_prep(
        model, prep, seq_len=data.seq_len, config=cfg.to_dict(), config_hash=cfg.config_hash()
    )
    metrics: dict = {}
    for part in ("train", "val", "test"):
        y_pred, _ = predict_raw(servable, data.x[part])
        metrics[part] = regression_metrics(data.y[part].astype(np.float64), y_pred)
    metrics.update(
        epochs=result.epochs,
        best_epoch=result.best_epoch,
        train_seconds=round(result.train_seconds, 3),
        n_parameters=sum(p.numel() for p in model.parameters()),
        config_hash=cfg.config_hash(),
    )
    servable.metrics = metrics
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_history(out / "history.csv", result.history)
    if write_plots:
        from kanmoe.model.plots import write_all_plots

        write_all_plots(out, servable, result.history, data.x["test"])
    return servable, metrics
