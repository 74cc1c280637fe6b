"""Pydantic models of every JSON body: the one place the OpenAPI document comes from.

The hot routes (v1 predict, v2 infer) parse raw bytes with orjson for speed; these models
describe the same bodies for ``/docs`` and give working examples.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

EXAMPLE_INSTANCE = {
    "MedInc": 8.3252,
    "HouseAge": 41.0,
    "AveRooms": 6.984,
    "AveBedrms": 1.024,
    "Population": 322.0,
    "AveOccup": 2.556,
    "Latitude": 37.88,
    "Longitude": -122.23,
}
EXAMPLE_ROW = list(EXAMPLE_INSTANCE.values())


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, naming the field or the problem")


class PredictRequest(BaseModel):
    """Exactly one of ``instances`` or ``inputs``; raw values in the units of training.

    Both may be absent but never ``null`` (the server refuses null), so the schema leaves the
    null out, and ``oneOf`` states the exactly-one rule.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"instances": [EXAMPLE_INSTANCE]}, {"inputs": [EXAMPLE_ROW]}],
            "oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}],
        },
    )
    instances: list[dict[str, float | list[float]]] | SkipJsonSchema[None] = Field(
        None, description="rows keyed by feature name (sequence models: each a list of steps)"
    )
    inputs: list[list[float] | list[list[float]]] | SkipJsonSchema[None] = Field(
        None, description="rows in feature order (sequence models: [steps][features])"
    )
    explain: bool = Field(
        False,
        description="add an 'explanation': each expert's own prediction and its contribution "
        "(gate weight x (expert - offset)); offset + contributions = prediction",
    )


class Explanation(BaseModel):
    """The final MoE layer's split of each row's prediction, in raw target units."""

    layer: str = Field(description="the MoE layer whose experts are shown")
    offset: float | list[float] = Field(description="per target: the training target mean")
    expert_predictions: list[list[float]] | list[list[list[float]]] = Field(
        description="per row, per expert (in 'experts' order): that expert's own prediction"
    )
    contributions: list[list[float]] | list[list[list[float]]] = Field(
        description="per row, per expert: gate weight x (expert prediction - offset); "
        "offset + their sum = the row's prediction"
    )


class PredictResponse(BaseModel):
    model: str
    version: str
    targets: list[str]
    predictions: list[float] | list[list[float]] = Field(
        description="one value per row (a list per row when the model has several targets)"
    )
    gate_weights: dict[str, list[list[float]]] = Field(
        description="per MoE layer: each row's weight per expert (sequence: last step)"
    )
    experts: dict[str, list[str]] = Field(description="per MoE layer: expert names in order")
    explanation: Explanation | SkipJsonSchema[None] = Field(
        None, description="only with explain: true"
    )


class FeatureInfo(BaseModel):
    name: str
    min: float | None = Field(None, description="smallest raw value seen in training")
    max: float | None = Field(None, description="largest raw value seen in training")


class VersionInfo(BaseModel):
    version: str
    state: Literal["READY", "UNAVAILABLE", "LOADING"]
    reason: str = ""
    providers: list[str] = []
    is_sequence: bool = False
    seq_len: int | None = None
    input_units: str = "raw"
    features: list[FeatureInfo] = []
    targets: list[str] = []
    experts: dict[str, list[str]] = {}
    metrics: dict[str, Any] = {}


class ModelInfo(BaseModel):
    name: str
    versions: list[VersionInfo]


class ModelList(BaseModel):
    models: list[ModelInfo]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str = ""


class InferTensor(BaseModel):
    name: str
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[1, 8]])
    data: list[Any] | None = Field(None, description="row-major values (flat or nested)")
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequestBody(BaseModel):
    """Open Inference Protocol v2 request (JSON form; binary tensors follow the JSON)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "inputs": [
                        {"name": "input", "datatype": "FP32", "shape": [1, 8], "data": EXAMPLE_ROW}
                    ],
                }
            ]
        }
    )
    id: str | None = None
    inputs: list[InferTensor]
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | SkipJsonSchema[None] = None  # the server refuses null here


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferTensor]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined.

    A schema embedded in an OpenAPI operation cannot keep ``#/$defs/...`` references: they
    resolve against the whole document, where no ``$defs`` exists.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
