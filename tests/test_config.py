"""Run configs: unknown keys and bad values give one line naming the dotted key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kanmoe.errors import ConfigError
from kanmoe.model.config import apply_overrides, load_config, parse_override, validate_config
from kanmoe.paths import CONFIGS_DIR

SHIPPED = sorted(CONFIGS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_unknown_nested_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'"):
        validate_config({"train": {"lrr": 0.1}})


def test_wrong_type_names_dotted_key_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"model": {"grid_size": "many"}})
    msg = str(info.value)
    assert "'model.grid_size'" in msg and "'many'" in msg
    assert "\n" not in msg


def test_list_item_error_names_index() -> None:
    with pytest.raises(ConfigError, match=r"'model\.hidden\.1'"):
        validate_config({"model": {"hidden": [8, "x"]}})


def test_sequence_section_key_is_named() -> None:
    raw = {"data": {"kind": "sequence", "path": "x.csv", "horizon": 0}}
    with pytest.raises(ConfigError, match=r"'data\.horizon'"):
        validate_config(raw)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        validate_config({"model": {"n_experts": 2, "top_k": 3}})
    with pytest.raises(ConfigError, match="sequence"):
        validate_config({"model": {"kind": "rnn", "expert": "gru"}})
    with pytest.raises(ConfigError, match="needs expert gru or lstm"):
        validate_config({"data": {"kind": "sequence", "path": "x.csv"}, "model": {"kind": "kamoe"}})


def test_overrides_parse_yaml_scalars() -> None:
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("model.hidden=[4, 8]") == (["model", "hidden"], [4, 8])
    assert parse_override("model.top_k=null") == (["model", "top_k"], None)
    raw = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.5", "model.kind=kan"])
    cfg = validate_config(raw)
    assert cfg.train.lr == 0.5 and cfg.model.kind == "kan"
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        parse_override("train.lr")


def test_lookback_auto_is_max_45_5h() -> None:
    rnn = {"kind": "rnn", "expert": "gru"}
    cfg = validate_config(
        {"data": {"kind": "sequence", "path": "x.csv", "horizon": 12}, "model": rnn}
    )
    assert cfg.data.lookback_steps == 60
    cfg = validate_config(
        {"data": {"kind": "sequence", "path": "x.csv", "horizon": 3}, "model": rnn}
    )
    assert cfg.data.lookback_steps == 45


def test_config_hash_ignores_name_but_not_hyperparameters() -> None:
    a = validate_config({"name": "a"})
    assert a.config_hash() == validate_config({"name": "b"}).config_hash()
    assert a.config_hash() != validate_config({"train": {"lr": 0.5}}).config_hash()


def test_cli_bad_key_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"kind": "mlp", "widths": [4]}}))
    result = subprocess.run(
        [sys.executable, "-m", "kanmoe.cli", "train", "--config", str(cfg), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'model.widths'" in lines[0]


def test_cli_bad_set_value_is_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kanmoe.cli",
            "train",
            "--config",
            str(CONFIGS_DIR / "california_mlp.yaml"),
            "--set",
            "train.batch_size=big",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "'train.batch_size'" in result.stderr and "'big'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fields_added_later_keep_old_hashes_until_set() -> None:
    """A field added after runs were published must not change their hash at its default
    (the committed default model's ONNX records the hash of its run), but must when set."""
    from kanmoe.model.config import FIELDS_ADDED_LATER

    base = validate_config({})
    for section, key, default in FIELDS_ADDED_LATER:
        explicit = validate_config({section: {key: default}})
        assert explicit.config_hash() == base.config_hash()
        changed = validate_config({section: {key: default + 1.0}})
        assert changed.config_hash() != base.config_hash()
