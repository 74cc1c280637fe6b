"""Every broken input a user can hand the torch-side CLI gives one line on stderr and exit 2.

Each case feeds the real broken file to the real command (in this process, through typer's
runner, to skip interpreter start-up) and checks: exit code 2, exactly one stderr line, the
line names the file or column at fault, and no traceback. One tiny run is trained per module.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kanmoe.model.config import validate_config
from kanmoe.model.training import train_run

pytestmark = pytest.mark.slow


def invoke(*args: str):
    from typer.testing import CliRunner

    from kanmoe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, exactly one stderr line starting 'error:', containing every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory, california_csv: Path) -> pd.DataFrame:
    return pd.read_csv(california_csv).sample(n=400, random_state=5).reset_index(drop=True)


def _tiny_raw(data_path: Path, hidden: list[int]) -> dict:
    return {
        "name": "tiny",
        "seed": 1,
        "data": {"path": str(data_path), "target": "MedHouseVal"},
        "model": {"kind": "kamoe", "hidden": hidden, "n_experts": 3, "gate_hidden": 4},
        "train": {"epochs": 1, "threads": 1, "progress": False},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, table: pd.DataFrame) -> dict[str, Path]:
    """Two finished one-epoch runs on the same data that differ only in hidden width."""
    root = tmp_path_factory.mktemp("runs")
    table.to_csv(root / "data.csv", index=False)
    out = {"data": root / "data.csv"}
    for name, hidden in (("a", [8]), ("b", [5])):
        train_run(
            validate_config(_tiny_raw(root / "data.csv", hidden)), root / name, write_plots=False
        )
        out[name] = root / name
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# (file to break, how, needles the message must contain)
RUN_DIR_CASES: dict[str, tuple[str, Callable[[Path, dict], None], tuple[str, ...]]] = {
    "config_not_yaml": (
        "config.yaml",
        lambda p, _r: p.write_text("model: [kamoe\n  hidden: 8\n"),
        ("config.yaml", "not valid YAML", "line"),
    ),
    "config_not_mapping": (
        "config.yaml",
        lambda p, _r: p.write_text("- 1\n- 2\n"),
        ("config.yaml", "mapping"),
    ),
    "weights_garbage": (
        "weights.safetensors",
        lambda p, _r: p.write_bytes(b"\x00garbage" * 100),
        ("weights.safetensors", "not a safetensors file"),
    ),
    "weights_truncated": (
        "weights.safetensors",
        lambda p, _r: p.write_bytes(p.read_bytes()[:200]),
        ("weights.safetensors", "not a safetensors file"),
    ),
    "weights_other_architecture": (
        "weights.safetensors",
        lambda p, r: shutil.copy(r["b"] / "weights.safetensors", p),
        ("weights.safetensors", "another architecture", "shape"),
    ),
    "preprocessing_not_json": (
        "preprocessing.json",
        lambda p, _r: p.write_text("{'feature_names': "),
        ("preprocessing.json", "not valid JSON"),
    ),
    "preprocessing_missing_keys": (
        "preprocessing.json",
        lambda p, _r: p.write_text('{"feature_names": ["a"]}'),
        ("preprocessing.json", "missing key", "x_mean"),
    ),
    "preprocessing_wrong_length": (
        "preprocessing.json",
        lambda p, _r: p.write_text(p.read_text().replace('"x_std": [', '"x_std": [1.0, ', 1)),
        ("preprocessing.json", "x_std"),
    ),
    "metrics_broken": (
        "metrics.json",
        lambda p, _r: p.write_text('{"test": '),
        ("metrics.json", "broken"),
    ),
    "history_empty": (
        "history.csv",
        lambda p, _r: p.write_text(""),
        ("history.csv", "empty"),
    ),
    "history_header_only": (
        "history.csv",
        lambda p, _r: p.write_text("epoch,train_loss,val_loss,lr\n"),
        ("history.csv", "no epochs"),
    ),
    "history_bad_row": (
        "history.csv",
        lambda p, _r: p.write_text(p.read_text() + "2,0.5,oops,0.001\n"),
        ("history.csv", "line 3"),
    ),
}


@pytest.mark.parametrize("case", sorted(RUN_DIR_CASES))
def test_broken_run_dir_file_is_one_line_under_plot(
    case: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    name, breaker, needles = RUN_DIR_CASES[case]
    run = _copy(runs["a"], tmp_path)
    breaker(run / name, runs)
    assert_one_line_error(invoke("plot", run), *needles)
    assert not list(run.glob("plots/*.tmp")), "a failed plot left a temp file"


@pytest.mark.parametrize(
    "case", ["config_not_yaml", "weights_garbage", "weights_other_architecture"]
)
def test_broken_run_dir_is_one_line_under_predict_and_export(
    case: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    name, breaker, needles = RUN_DIR_CASES[case]
    run = _copy(runs["a"], tmp_path)
    breaker(run / name, runs)
    out = tmp_path / "pred.csv"
    assert_one_line_error(invoke("predict", run, "-i", runs["data"], "-o", out), *needles)
    assert not out.exists()
    repo = tmp_path / "repo"
    assert_one_line_error(invoke("export", run, "-r", repo, "-n", "m"), *needles)
    assert not repo.exists() or not any(repo.iterdir())


def test_intact_run_dir_still_loads(runs: dict[str, Path], tmp_path: Path) -> None:
    """The checks above must not reject a good run (else every case would pass vacuously)."""
    run = _copy(runs["a"], tmp_path)
    result = invoke("plot", run)
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred.csv"
    result = invoke("predict", run, "-i", runs["data"], "-o", out)
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == 400


# -- training data --------------------------------------------------------------------------


def _bad_data(kind: str, table: pd.DataFrame, path: Path) -> dict:
    """Write the broken CSV for ``kind`` at ``path``; returns extra data.* config keys."""
    df = table.copy()
    extra: dict = {}
    if kind == "missing_file":
        return {"path": str(path.parent / "no_such.csv")}
    if kind == "empty_file":
        path.write_bytes(b"")
        return extra
    if kind == "header_only":
        path.write_text(",".join(df.columns) + "\n")
        return extra
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
        return extra
    if kind == "ragged":
        path.write_text("a,b,MedHouseVal\n1,2,3\n4,5,6,7,8\n")
        return extra
    if kind == "too_few_rows":
        df = df.head(6)
    elif kind == "log_target_le_minus_one":
        df.loc[17, "MedHouseVal"] = -1.0
        extra = {"target_transform": "log"}
    elif kind == "features_overlap_target":
        extra = {"features": ["MedInc", "MedHouseVal"]}
    elif kind == "non_numeric_feature":
        df["HouseAge"] = df["HouseAge"].astype(object)
        df.loc[42, "HouseAge"] = "forty"
    elif kind == "nan_feature":
        df.loc[11, "AveRooms"] = np.nan
    elif kind == "inf_target":
        df.loc[23, "MedHouseVal"] = np.inf
    elif kind == "missing_target":
        df = df.drop(columns=["MedHouseVal"])
    df.to_csv(path, index=False)
    return extra


DATA_CASES = {
    "missing_file": ("data.path", "file not found", "no_such.csv"),
    "empty_file": ("data.path", "cannot read"),
    "header_only": ("data.path", "no data rows"),
    "binary": ("data.path", "cannot read"),
    "ragged": ("data.path", "cannot read", "line 3"),
    "too_few_rows": ("6 rows are too few",),
    "log_target_le_minus_one": ("target_transform", "'MedHouseVal'", "row 18"),
    "features_overlap_target": ("data.features", "MedHouseVal", "also targets"),
    "non_numeric_feature": ("'HouseAge'", "not numeric", "'forty'", "row 43"),
    "nan_feature": ("'AveRooms'", "NaN/inf", "row 12"),
    "inf_target": ("data.target", "'MedHouseVal'", "NaN/inf", "row 24"),
    "missing_target": ("data.target", "MedHouseVal", "not in the CSV"),
}


@pytest.mark.parametrize("kind", sorted(DATA_CASES))
def test_broken_training_data_is_one_line(kind: str, table: pd.DataFrame, tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    raw = _tiny_raw(csv, [4])
    raw["data"].update(_bad_data(kind, table, csv))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", "-c", cfg, "-o", out), *DATA_CASES[kind])
    assert not (out / "weights.safetensors").exists()


def test_training_config_not_yaml_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  epochs: 3\n lr: [\n")
    line = assert_one_line_error(invoke("train", "-c", cfg), "cfg.yaml", "not valid YAML")
    assert "line 3" in line


def test_bad_set_value_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("name: x\n")
    assert_one_line_error(invoke("train", "-c", cfg, "--set", "train.lr=[1"), "--set train.lr")


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "cannot read"), (b"a,b\n1,2\n3,4,5,6\n", "cannot read"), (None, "file not found")],
)
def test_broken_predict_input_is_one_line(
    content: bytes | None, needle: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    src = tmp_path / "in.csv"
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.csv"
    assert_one_line_error(invoke("predict", runs["a"], "-i", src, "-o", out), "--input", needle)
    assert not out.exists()


def test_paths_the_machine_refuses_are_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    """--out that is a file, an output under a file: OSError-type problems, one line each."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_tiny_raw(runs["data"], [4])))
    assert_one_line_error(invoke("train", "-c", cfg, "-o", a_file), "a_file", "not a directory")
    out = a_file / "pred.csv"
    assert_one_line_error(invoke("predict", runs["a"], "-i", runs["data"], "-o", out), "a_file")
