"""``kanmoe train``, ``predict``, ``tune`` and ``plot``: the training-side commands.

torch and the model code are imported inside each command so ``kanmoe --help`` stays light.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from kanmoe.commands import one_line_errors


def _load(config: Path | None, sets: list[str], seed: int | None, out: Path | None, resume: bool):
    from kanmoe.errors import ConfigError
    from kanmoe.model.config import apply_overrides, read_yaml, validate_config

    if config is None:
        if not (resume and out is not None):
            raise ConfigError("--config is required (or --out RUN_DIR --resume)")
        config = out / "config.yaml"
    raw = apply_overrides(read_yaml(config), list(sets))
    if seed is not None:
        raw["seed"] = seed
    return validate_config(raw, source=str(config))


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def train(
        config: Path = typer.Option(None, "--config", "-c", help="YAML run config"),
        out: Path = typer.Option(None, "--out", "-o", help="run dir (default runs/<name>)"),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="override a config key: key.sub=value (YAML value)"
        ),
        resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt"),
        seed: int = typer.Option(None, "--seed", help="override the config's seed"),
        distributed: int = typer.Option(
            1, "--distributed", min=1, help="data-parallel processes on this machine (gloo)"
        ),
    ) -> None:
        """Train a model from a YAML config into a run dir (weights, metrics, plots)."""
        cfg = _load(config, set_, seed, out, resume)
        from kanmoe.model.training import train_run

        run_dir = out or Path("runs") / cfg.name
        try:
            if distributed > 1:
                from kanmoe.model.distributed import spawn

                spawn(distributed, train_run, cfg, run_dir, resume)
                metrics = json.loads((run_dir / "metrics.json").read_text())
            else:
                from kanmoe.model.distributed import join_from_env

                joined = join_from_env()  # under torchrun: this process is one rank
                _, metrics = train_run(cfg, run_dir, resume=resume)
                if joined and not metrics:
                    return  # not rank 0: rank 0 prints the summary
        except KeyboardInterrupt:
            typer.echo(_interrupted_message(run_dir), err=True)
            sys.exit(130)  # 128 + SIGINT, what a shell reports for a Ctrl-C'd program
        t = metrics["test"]
        typer.echo(
            f"{run_dir}: test r2={t['r2']:.4f} rmse={t['rmse']:.4f} mae={t['mae']:.4f} "
            f"({metrics['epochs']} epochs, {metrics['train_seconds']:.1f} s)"
        )

    @app.command()
    @one_line_errors
    def predict(
        run_dir: Path = typer.Argument(..., help="trained run dir"),
        input: Path = typer.Option(..., "--input", "-i", help="CSV with the feature columns"),
        output: Path = typer.Option(..., "--output", "-o", help="CSV to write"),
    ) -> None:
        """Batch predictions (and per-expert gate weights) for every row of a CSV."""
        from kanmoe.model.inference import predict_csv

        n = predict_csv(run_dir, input, output)
        typer.echo(f"wrote {n} predictions to {output}")

    @app.command()
    @one_line_errors
    def tune(
        config: Path = typer.Option(..., "--config", "-c", help="YAML run config (tune: section)"),
        trials: int = typer.Option(None, "--trials", "-n", help="number of trials"),
        storage: str = typer.Option(None, "--storage", help="Optuna storage, sqlite:///study.db"),
        study_name: str = typer.Option(None, "--study-name", help="study to create or join"),
        set_: list[str] = typer.Option([], "--set", "-s", help="override a config key"),
    ) -> None:
        """Search hyper-parameters with Optuna (TPE, median pruning on val loss)."""
        cfg = _load(config, set_, None, None, False)
        from kanmoe.model.tuning import run_study

        study = run_study(
            cfg, trials=trials, storage=storage, study_name=study_name, echo=typer.echo
        )
        import optuna

        done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if not done:
            from kanmoe.errors import TrainingError

            raise TrainingError(
                f"no trial finished ({len(study.trials)} pruned or failed); widen or move "
                "the search space"
            )
        best = study.best_trial
        typer.echo(f"best trial {best.number}: val loss {best.value:.5f}")
        typer.echo(json.dumps(best.params, indent=2))

    @app.command()
    @one_line_errors
    def plot(run_dir: Path = typer.Argument(..., help="trained run dir")) -> None:
        """Regenerate a run's plots (learning curves, gate weights, KAN functions)."""
        from kanmoe.model.data import load_dataset
        from kanmoe.model.plots import write_all_plots
        from kanmoe.model.run import load_run, read_history

        servable = load_run(run_dir)
        history = read_history(run_dir / "history.csv")
        from kanmoe.model.config import validate_config

        data = load_dataset(validate_config(servable.config).data)
        for path in write_all_plots(run_dir, servable, history, data.x["test"]):
            typer.echo(str(path))


def _interrupted_message(run_dir: Path) -> str:
    """One line after Ctrl-C: where the last good checkpoint is and how to resume from it."""
    from kanmoe.model.training import CHECKPOINT, checkpoint_epoch

    lead = "\n" if sys.stderr.isatty() else ""  # end a progress bar's line first
    epoch = checkpoint_epoch(run_dir / CHECKPOINT)
    if epoch is None:
        return f"{lead}interrupted before the first epoch finished: nothing to resume in {run_dir}"
    return (
        f"{lead}interrupted: {run_dir / CHECKPOINT} holds epoch {epoch}; "
        f"continue with: kanmoe train --out {run_dir} --resume"
    )
