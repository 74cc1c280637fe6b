"""``kanmoe tune``: median pruning really prunes, and the default search space is searched.

Trials are tiny (300 rows, an 8-unit MLP), so a dozen of them take seconds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kanmoe.model.config import validate_config
from kanmoe.model.tuning import DEFAULT_SPACE, run_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory, california_csv: Path) -> Path:
    path = tmp_path_factory.mktemp("tune") / "c300.csv"
    pd.read_csv(california_csv).sample(n=300, random_state=2).to_csv(path, index=False)
    return path


def _raw(data: Path, **tune: object) -> dict:
    return {
        "name": "tune",
        "seed": 0,
        "data": {"path": str(data), "target": "MedHouseVal"},
        "model": {"kind": "mlp", "hidden": [8]},
        "train": {"batch_size": 64, "threads": 1, "progress": False, "patience": 50},
        "tune": tune,
    }


def test_median_pruning_prunes_bad_trials(small_csv: Path) -> None:
    """Past the pruner's warm-up (3 finished trials, epoch 5), trials worse than the median
    at the same epoch stop early: some trials end PRUNED with fewer epochs than the rest."""
    import optuna

    raw = _raw(
        small_csv,
        epochs=10,
        params={"train.lr": {"type": "float", "low": 1e-6, "high": 3e-2, "log": True}},
    )
    lines: list[str] = []
    study = run_study(validate_config(raw), trials=12, echo=lines.append)
    states = [t.state for t in study.trials]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(states) == 12
    assert pruned, f"no trial was pruned: {[t.value for t in complete]}"
    assert len(complete) >= 3
    for t in pruned:  # stopped after the warm-up and before the last epoch
        steps = sorted(t.intermediate_values)
        assert 5 <= steps[-1] < 10, steps  # optuna prunes from step n_warmup_steps on
    for t in complete:
        assert sorted(t.intermediate_values) == list(range(1, 11))
    # a pruned trial was worse than the median of the earlier trials at the step it stopped
    for t in pruned:
        step = max(t.intermediate_values)
        earlier = [
            u.intermediate_values[step]
            for u in study.trials[: t.number]
            if step in u.intermediate_values
        ]
        assert t.intermediate_values[step] > sorted(earlier)[(len(earlier) - 1) // 2]
    assert study.best_trial.state == optuna.trial.TrialState.COMPLETE
    assert len(lines) == len(complete)  # one line per finished trial


def test_default_search_space_when_the_config_has_none(small_csv: Path) -> None:
    raw = _raw(small_csv, epochs=1)
    raw["model"] = {"kind": "kan", "hidden": [3]}  # so model.grid_size matters too
    study = run_study(validate_config(raw), trials=3, echo=lambda _line: None)
    assert len(study.trials) == 3
    for trial in study.trials:
        assert set(trial.params) == set(DEFAULT_SPACE)
        for key, p in DEFAULT_SPACE.items():
            value = trial.params[key]
            if p.type == "categorical":
                assert value in [repr(c) for c in p.choices], (key, value)
            else:
                assert p.low <= value <= p.high, (key, value)
    # TPE actually varied the points (the space is being searched, not a fixed default)
    assert len({t.params["train.lr"] for t in study.trials}) == 3


def test_diverging_trials_are_pruned_and_a_study_without_results_is_one_line(
    small_csv: Path, tmp_path: Path
) -> None:
    import optuna
    import yaml
    from typer.testing import CliRunner

    from kanmoe.cli import app

    raw = _raw(
        small_csv,
        epochs=2,
        params={"train.lr": {"type": "float", "low": 1e8, "high": 1e9, "log": True}},
    )
    raw["train"].update(grad_clip=None, scheduler="none")
    study = run_study(validate_config(raw), trials=2, echo=lambda _line: None)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["tune", "-c", str(cfg), "-n", "2"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no trial finished" in lines[0], lines
