"""Framework-free request handling: bytes in, ``Reply`` out, for v1 predict and v2 infer.

The ASGI front door (hot path) and the FastAPI routes (OpenAPI surface) both call these, so
the two can never disagree about what a request means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from kanmoe.service import v2_codec
from kanmoe.service.batcher import Draining, Outputs, QueueFull
from kanmoe.service.errors import ServiceError, bad_request
from kanmoe.service.model_spec import INPUT_NAME, ModelSpec
from kanmoe.service.settings import ServeSettings
from kanmoe.service.store import LoadedVersion, ModelStore, NotFound, NotReady
from kanmoe.service.v1_codec import check_finite, check_shape, encode_v1_response, parse_v1_request

JSON = "application/json"


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    model: str = ""  # for the request metric; empty when no model was resolved

    @classmethod
    def error(cls, exc: ServiceError, model: str = "") -> Reply:
        return cls(
            exc.status, error_body(exc.message), {"content-type": JSON, **exc.headers}, model
        )


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


# No Content-Type is accepted too: tritonclient's sync client sends none.
V1_TYPES = ("application/json",)
V2_TYPES = ("application/json", "application/octet-stream")


def check_content_type(content_type: str | None, allowed: tuple[str, ...]) -> None:
    """415 for a declared type the route cannot read (e.g. curl -d's form encoding)."""
    if not content_type:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media in allowed or (media.startswith("application/") and media.endswith("+json")):
        return
    raise ServiceError(
        415,
        f"Content-Type {media!r} is not supported here; send {' or '.join(allowed)} "
        "(with curl: -H 'Content-Type: application/json')",
    )


class Service:
    """What a request can ask of the loaded repository; owns the draining flag."""

    def __init__(self, settings: ServeSettings, store: ModelStore, metrics: Any | None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.draining = False
        # Open client connections, when the server can tell (uvicorn's state, set by
        # kanmoe.service.server); unknown means "assume others", so nothing runs inline.
        self.connections: Callable[[], int] = lambda: 2

    # -- shared -------------------------------------------------------------------------
    def resolve(self, name: str, version: str | None) -> LoadedVersion:
        if self.draining:
            self.reject(name, "draining")
            raise ServiceError(503, "the server is shutting down", {"retry-after": "1"})
        try:
            return self.store.serving(name, version)
        except NotFound as exc:
            raise ServiceError(404, str(exc)) from None
        except NotReady as exc:
            self.reject(name, "not_ready")
            raise ServiceError(503, str(exc), {"retry-after": "1"}) from None

    def reject(self, model: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_rejection(model, reason)

    def _refused(self, name: str, exc: ServiceError) -> Reply:
        """The error reply; a refusal of the request itself is counted by its reason (429/503
        were counted where they were raised)."""
        if exc.status in (400, 413, 415, 422):
            self.reject(name, "too_large" if exc.status == 413 else "bad_request")
        return Reply.error(exc, name)

    async def run(self, entry: LoadedVersion, x: np.ndarray, full: bool = False) -> Outputs:
        """Through the version's batcher; the caller (the front door) bounds the wait.
        ``full`` fetches every graph output, not only the prediction and the gates."""
        assert entry.batcher is not None
        try:
            return await entry.batcher.submit(x, may_inline=self.connections() <= 1, full=full)
        except QueueFull as exc:
            self.reject(entry.name, "queue_full")
            raise ServiceError(429, f"{exc}; retry later", {"retry-after": "1"}) from None
        except Draining as exc:
            self.reject(entry.name, "draining")
            raise ServiceError(503, str(exc), {"retry-after": "1"}) from None

    # -- v1 -----------------------------------------------------------------------------
    async def v1_predict(
        self, name: str, version: str | None, body: bytes, content_type: str | None = None
    ) -> Reply:
        try:
            check_content_type(content_type, V1_TYPES)
            entry = self.resolve(name, version)
            spec = entry.spec
            assert spec is not None
            x, explain = parse_v1_request(body, spec, self.settings.max_request_rows)
            if explain and (why := spec.explain_unavailable()):
                raise bad_request(
                    f"'explain' is not available for model {name!r} version {entry.version}: {why}"
                )
            outputs = await self.run(entry, x, full=explain)
            return Reply(
                200,
                encode_v1_response(spec, entry.version, outputs, explain),
                {"content-type": JSON},
                name,
            )
        except ServiceError as exc:
            return self._refused(name, exc)

    # -- v2 -----------------------------------------------------------------------------
    async def v2_infer(
        self, name: str, version: str | None, body: bytes, headers: dict[str, str]
    ) -> Reply:
        try:
            check_content_type(headers.get("content-type"), V2_TYPES)
            entry = self.resolve(name, version)
            spec = entry.spec
            assert spec is not None
            try:
                request = v2_codec.decode_infer_request(
                    body,
                    headers.get("inference-header-content-length"),
                    headers.get("content-encoding"),
                    self.settings.max_body_bytes,
                )
                v2_codec.check_requested_outputs(request, spec.output_names)
            except v2_codec.ProtocolError as exc:
                raise ServiceError(exc.status, exc.message) from None
            x = self._v2_input(request, spec)
            wanted = (  # none named: the protocol's default is every output
                spec.output_names if request.outputs is None else [o.name for o in request.outputs]
            )
            full = any(n not in spec.base_output_names for n in wanted)
            outputs = await self.run(entry, x, full=full)
            body_out, out_headers = v2_codec.encode_infer_response(
                name,
                entry.version,
                request,
                outputs,
                spec.output_names,
                headers.get("accept-encoding"),
            )
            return Reply(200, body_out, out_headers, name)
        except ServiceError as exc:
            return self._refused(name, exc)

    def _v2_input(self, request: Any, spec: ModelSpec) -> np.ndarray:
        names = list(request.inputs)
        if names != [INPUT_NAME]:
            raise bad_request(f"expected exactly one input named {INPUT_NAME!r}, got {names}")
        x = request.inputs[INPUT_NAME]
        if x.dtype != np.float32:
            raise bad_request(f"input {INPUT_NAME!r}: datatype must be FP32")
        x = check_shape(x, spec, f"input {INPUT_NAME!r}", self.settings.max_request_rows)
        check_finite(x, spec, f"input {INPUT_NAME!r} row")
        return x
