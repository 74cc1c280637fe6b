"""Training configuration: pydantic models that reject unknown keys and name the bad field.

A config is a YAML file with four sections (``data``, ``model``, ``train``, ``tune``) plus
``seed`` and ``name``. ``load_config`` applies ``--set key.sub=value`` overrides (values
parsed as YAML scalars) before validation, so every field can be changed on the command line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kanmoe.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TabularData(_Strict):
    """Rows of named feature columns and one or more target columns."""

    kind: Literal["tabular"] = "tabular"
    path: str = "builtin:california_housing"
    features: list[str] | None = None  # default: every column but the targets
    target: list[str] = Field(default_factory=lambda: ["MedHouseVal"])
    split: Literal["reference", "random"] = "reference"
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    val_size: float = Field(0.2, gt=0.0, lt=1.0)  # fraction of the train part
    split_seed: int = 42
    max_rows: int | None = Field(None, gt=10)
    input_transform: Literal["standardize", "none"] = "standardize"
    input_clip: float | None = Field(None, gt=0.0)  # clamp scaled inputs to [-c, c]
    target_transform: Literal["none", "standardize", "log"] = "standardize"

    @model_validator(mode="before")
    @classmethod
    def _target_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("target"), str):
            data = {**data, "target": [data["target"]]}
        return data


class SequenceData(_Strict):
    """Long-format time series: one row per (series, time), windows of ``lookback`` steps."""

    kind: Literal["sequence"] = "sequence"
    path: str
    time_column: str = "time"
    series_column: str | None = "series"
    target: str = "value"
    features: list[str] | None = None  # default: [target]
    lookback: int | Literal["auto"] = "auto"  # auto = max(45, 5 * horizon)
    horizon: int = Field(1, ge=1)
    normalization: Literal["none", "minmax", "rolling_median"] = "minmax"
    window: int = Field(336, ge=2)  # rolling-median window (steps)
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    val_size: float = Field(0.2, gt=0.0, lt=1.0)  # fraction of the train part (chronological)

    @property
    def lookback_steps(self) -> int:
        return max(45, 5 * self.horizon) if self.lookback == "auto" else int(self.lookback)

    @property
    def feature_columns(self) -> list[str]:
        return list(self.features) if self.features else [self.target]


DataConfig = Annotated[TabularData | SequenceData, Field(discriminator="kind")]


class ModelConfig(_Strict):
    """Architecture. ``kind`` picks the family; MoE fields apply to ``moe``/``kamoe``."""

    kind: Literal["mlp", "kan", "kanmlp", "moe", "kamoe", "rnn"] = "kamoe"
    expert: Literal["mlp", "kan", "kanmlp", "gru", "lstm"] = "mlp"  # kanmlp: KAN layer, then MLP
    placement: Literal["whole", "per_layer"] = "whole"
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64, 64])
    activation: Literal["relu", "silu", "gelu", "tanh", "elu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # KAN layers (expert == "kan" or kind == "kan")
    basis: Literal["bspline", "rbf", "linear"] = "bspline"
    grid_size: int = Field(5, ge=1)
    spline_order: int = Field(3, ge=0)
    grid_range: tuple[float, float] = (-2.0, 2.0)
    base_activation: str = "silu"
    num_control_points: int = Field(32, ge=2)
    spline_width: float = Field(4.0, gt=0.0)
    # mixture of experts
    n_experts: int = Field(3, ge=1)
    gate: Literal["linear", "grn", "grkan"] | None = None  # None: grkan for kamoe, grn for moe
    gating_activation: Literal["softmax", "sigmoid"] = "softmax"
    top_k: int | None = Field(None, ge=1)
    noisy_gating: bool = False
    input_transform: bool | None = None  # None: on for kamoe, off for moe
    gate_hidden: int | None = Field(None, ge=1)  # gate pre-projection width (MoE default 32)
    gate_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    gate_layer_norm: bool = True  # LayerNorm on the gate logits (reference GRN/GRKAN block)
    gate_kan_activations: tuple[str, str] = ("silu", "elu")  # GRKAN (paper); Keras: elu, relu
    load_balance_weight: float | None = Field(None, ge=0.0)  # None: 0.01 with top_k, else 0
    z_loss_weight: float = Field(0.0, ge=0.0)
    gate_input: Literal["auto", "last", "flatten", "all"] = "auto"
    # fixed input expansion (tabular only): the rotate_pair plane projected on `rotations`
    # directions over 180° is appended to the inputs (0 = off); see kanmoe.model.features
    rotations: int = Field(0, ge=0)
    rotate_pair: tuple[str, str] = ("Latitude", "Longitude")

    @model_validator(mode="before")
    @classmethod
    def _resolve_defaults(cls, data: Any) -> Any:
        """Write the kind-dependent defaults into the config so config.yaml shows them."""
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "kamoe")
        if kind in ("moe", "kamoe"):
            data = dict(data)
            if data.get("gate") is None:
                data["gate"] = "grkan" if kind == "kamoe" else "grn"
            if data.get("input_transform") is None:
                data["input_transform"] = kind == "kamoe"
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.top_k is not None and self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.grid_range[0] >= self.grid_range[1]:
            raise ValueError(f"grid_range {self.grid_range} must be increasing")
        if 0 < self.rotations < 3:
            raise ValueError(f"rotations must be 0 (off) or >= 3, got {self.rotations}")
        return self


class TrainConfig(_Strict):
    """Optimiser, schedule, stopping and loss weights."""

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)
    eval_batch_size: int = Field(8192, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    scheduler: Literal["plateau", "cosine", "onecycle", "none"] = "plateau"
    onecycle_pct_start: float = Field(0.3, gt=0.0, lt=1.0)
    plateau_factor: float = Field(0.25, gt=0.0, lt=1.0)
    plateau_patience: int = Field(5, ge=0)
    min_lr: float = Field(2.5e-5, ge=0.0)
    warmup_epochs: int = Field(0, ge=0)
    patience: int = Field(20, ge=1)
    min_delta: float = Field(1e-5, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    loss: Literal["mse", "huber", "l1"] = "mse"
    kan_reg_weight: float = Field(0.0, ge=0.0)
    # second-difference smoothness of KAN coefficients (kanmoe.model.smoothness)
    kan_smooth_weight: float = Field(0.0, ge=0.0)
    aux_loss_weight: float = Field(1.0, ge=0.0)
    expert_loss_weight: float = Field(0.0, ge=0.0)  # + w * mean_k loss(expert_k(x), y)
    grid_update_epochs: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    grid_update_samples: int = Field(4096, ge=16)
    progress: bool | Literal["auto"] = "auto"  # auto: on when stderr is a terminal and not CI
    threads: int | None = Field(None, ge=1)


class TuneParam(_Strict):
    """One Optuna search dimension over a dotted config key."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> TuneParam:
        if self.type == "categorical" and not self.choices:
            raise ValueError("categorical parameters need 'choices'")
        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ValueError(f"{self.type} parameters need 'low' and 'high'")
        return self


class TuneConfig(_Strict):
    params: dict[str, TuneParam] = Field(default_factory=dict)  # empty: a default space
    trials: int = Field(20, ge=1)
    epochs: int | None = Field(None, ge=1)  # epochs per trial (default: train.epochs)
    direction: Literal["minimize"] = "minimize"


class RunConfig(_Strict):
    """The whole training run."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = Field(default_factory=TabularData)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_data_kind(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and isinstance(data.get("data"), dict)
            and "kind" not in data["data"]
        ):
            data = {**data, "data": {"kind": "tabular", **data["data"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        seq = self.data.kind == "sequence"
        rnn_expert = self.model.expert in ("gru", "lstm")
        if seq and self.model.kind in ("moe", "kamoe", "rnn") and not rnn_expert:
            raise ValueError("sequence data with model.kind moe/kamoe/rnn needs expert gru or lstm")
        if not seq and (self.model.kind == "rnn" or rnn_expert):
            raise ValueError("model.kind rnn and gru/lstm experts need data.kind: sequence")
        if self.train.expert_loss_weight > 0 and (
            seq or self.model.kind not in ("moe", "kamoe") or self.model.placement != "whole"
        ):
            raise ValueError(
                "train.expert_loss_weight needs a tabular moe/kamoe model with placement: whole "
                "(each expert then predicts the target)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of everything but the name and the tune section.

        Fields added after runs were already published (``FIELDS_ADDED_LATER``) enter the
        payload only when set away from their default, so existing runs keep their hash.
        """
        payload = {k: v for k, v in self.to_dict().items() if k not in ("name", "tune")}
        for section, key, default in FIELDS_ADDED_LATER:
            if payload.get(section, {}).get(key) == default:
                payload[section] = {k: v for k, v in payload[section].items() if k != key}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# (section, key, default) of config fields added after kanmoe 0.1.0 shipped runs.
FIELDS_ADDED_LATER: tuple[tuple[str, str, Any], ...] = (("train", "kan_smooth_weight", 0.0),)


def _dotted(loc: tuple[Any, ...]) -> str:
    # Discriminated unions add the tag ("tabular") to the location; drop it.
    parts = [str(p) for p in loc if p not in ("tabular", "sequence")]
    return ".".join(parts)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    msgs = []
    for err in exc.errors():
        key = _dotted(err["loc"])
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown key '{key}'")
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            msgs.append(f"'{key}': {err['msg']}{shown}" if key else err["msg"])
    return f"invalid config {source}: " + "; ".join(msgs)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=1e-3'`` -> (['train', 'lr'], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set has an empty key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {yaml_problem(exc)}") from None
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.sub=value`` override applied."""
    out = json.loads(json.dumps(raw))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {'.'.join(parts)}: '{section}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def validate_config(raw: dict[str, Any], source: str = "") -> RunConfig:
    """Validate a raw mapping; raise ``ConfigError`` with one line naming each bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    return raw


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: the problem and where (yaml's own text spans five lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return str(problem)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML, apply ``--set`` overrides, validate."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_config(raw, source=str(path))
