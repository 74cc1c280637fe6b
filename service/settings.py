"""Service settings: flags of ``kanmoe serve`` and ``KANMOE_*`` environment variables.

One pydantic-settings model is the single list of knobs; the CLI builds its options from the
same field names so ``--max-batch-size`` and ``KANMOE_MAX_BATCH_SIZE`` always agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ProviderName = Literal["auto", "cuda", "cpu"]


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KANMOE_", extra="ignore")

    repository: Path = Field(Path("model_repository"), description="model repository root")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes; each loads every model before it accepts connections",
    )
    providers: ProviderName = Field(
        "auto", description="ONNX Runtime providers: auto (CUDA first when present), cuda, cpu"
    )
    require_gpu: bool = Field(
        False, description="readiness fails while the CUDA execution provider is not active"
    )
    intra_op_threads: int = Field(
        0, ge=0, le=256, description="ONNX Runtime intra-op threads per session (0: ORT default)"
    )
    max_batch_size: int = Field(
        256, ge=1, le=65536, description="rows coalesced into one session run"
    )
    max_delay_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="extra wait for more rows once the runner is free (0: run at once; "
        "requests still coalesce while a batch runs)",
    )
    batching: bool = Field(True, description="coalesce concurrent requests into one session run")
    max_queue_rows: int = Field(
        8192, ge=1, description="rows waiting per model version before requests get 429"
    )
    max_request_rows: int = Field(4096, ge=1, description="rows allowed in one request")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="request body limit (413 above it)"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="longest time a request may wait for its batch (503 after)"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, longest wait for in-flight requests"
    )
    api_token: str | None = Field(
        None, description="bearer token required on model routes (health, /metrics stay open)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins, comma-separated"
    )
    metrics: bool = Field(True, description="collect and expose Prometheus metrics")
    drift_window: int = Field(2048, ge=16, description="rows in the live gate-drift window")
    access_log: bool = Field(False, description="JSON access log line per request")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [v.strip() for v in text.split(",") if v.strip()]
        return value

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        return None if value == "" else value
