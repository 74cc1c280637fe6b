"""Hyper-parameter search with Optuna: TPE sampler, median pruning on val loss per epoch.

The search space is the config's ``tune.params`` (dotted config keys), or ``DEFAULT_SPACE``.
Trials share a study through ``--storage sqlite:///study.db`` so several processes can work
on one search. Each trial trains in memory (no run dir); the best parameters are printed.
"""

from __future__ import annotations

import json
from typing import Any

from kanmoe.errors import TrainingError
from kanmoe.model.config import RunConfig, TuneParam, validate_config

DEFAULT_SPACE: dict[str, TuneParam] = {
    "train.lr": TuneParam(type="float", low=3e-4, high=1e-2, log=True),
    "train.weight_decay": TuneParam(type="float", low=1e-6, high=1e-2, log=True),
    "train.batch_size": TuneParam(type="categorical", choices=[128, 256, 512]),
    "model.hidden": TuneParam(type="categorical", choices=[[32], [64], [64, 64], [128, 64]]),
    "model.grid_size": TuneParam(type="int", low=3, high=10),
}


def _suggest(trial, key: str, p: TuneParam) -> Any:
    if p.type == "float":
        return trial.suggest_float(key, p.low, p.high, log=p.log)
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
    # Optuna stores categorical choices as JSON-able scalars: index lists by their repr.
    labels = [repr(c) for c in p.choices]
    label = trial.suggest_categorical(key, labels)
    return p.choices[labels.index(label)]


def _with(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def run_study(
    cfg: RunConfig,
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    echo=print,
):
    """Run ``trials`` trials (default ``tune.trials``); returns the Optuna study."""
    import optuna
    import torch

    from kanmoe.model.builder import build_model
    from kanmoe.model.data import load_dataset
    from kanmoe.model.features import fit_feature_layers
    from kanmoe.model.training import Trainer

    space = dict(cfg.tune.params) or DEFAULT_SPACE
    data = load_dataset(cfg.data)
    prep = data.prep
    xt, yt = (
        torch.from_numpy(prep.scale_x(data.x["train"])),
        torch.from_numpy(prep.scale_y(data.y["train"])),
    )
    xv, yv = (
        torch.from_numpy(prep.scale_x(data.x["val"])),
        torch.from_numpy(prep.scale_y(data.y["val"])),
    )
    base = cfg.to_dict()
    if cfg.tune.epochs:
        base["train"]["epochs"] = cfg.tune.epochs

    def objective(trial: optuna.Trial) -> float:
        raw = json.loads(json.dumps(base))
        for key, p in space.items():
            _with(raw, key, _suggest(trial, key, p))
        trial_cfg = validate_config(raw, source=f"(trial {trial.number})")
        torch.manual_seed(trial_cfg.seed)
        model = build_model(
            trial_cfg.model, data.n_features, data.n_targets, data.seq_len, prep.feature_names
        )
        fit_feature_layers(model, xt)

        def report(epoch: int, row: dict) -> None:
            trial.report(row["val_loss"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        steps = -(-len(xt) // trial_cfg.train.batch_size)
        trainer = Trainer(
            model, trial_cfg.train, seed=trial_cfg.seed, callbacks=[report], steps_per_epoch=steps
        )
        try:
            result = trainer.fit(xt, yt, xv, yv)
        except TrainingError as exc:  # a diverging trial is a bad point, not a failed study
            echo(f"trial {trial.number}: pruned, {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        echo(
            f"trial {trial.number}: best val loss {result.best_val:.5f} "
            f"at epoch {result.best_epoch}"
        )
        return result.best_val

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=5),
    )
    study.optimize(objective, n_trials=trials or cfg.tune.trials)
    return study
