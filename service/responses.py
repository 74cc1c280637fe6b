"""What every route module shares: the documented error responses, reply helpers and the
model lookup that turns store errors into 404/503."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse, Response

from kanmoe.service import schemas
from kanmoe.service.errors import ServiceError
from kanmoe.service.handlers import Reply
from kanmoe.service.store import LoadedVersion, ModelStore, NotFound, NotReady

EXTENSIONS = ["model_repository", "binary_tensor_data", "classification_free_metadata"]
# Every error body is {"error": ...}; 422 is declared too so that FastAPI's own
# HTTPValidationError shape (which this service never sends) is not documented.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 503)
}
# The inference routes may also answer 408 (a request body that trickled in too slowly).
INFER_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 408: {"model": schemas.ErrorResponse}}
# A 200 infer answer is JSON, or JSON followed by binary tensors when an output is binary.
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **INFER_ERRORS,
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    },
}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def to_response(reply: Reply) -> Response:
    return Response(reply.body, status_code=reply.status, headers=reply.headers)


def tensor_metadata(name: str, shape: list[int]) -> schemas.TensorMetadata:
    return schemas.TensorMetadata(name=name, datatype="FP32", shape=shape)


def lookup(store: ModelStore, name: str, version: str | None = None) -> LoadedVersion:
    """The version asked for (or the newest ready one) as a 404/503 ServiceError if none."""
    try:
        return store.get(name, version)
    except NotFound as exc:
        raise ServiceError(404, str(exc)) from None
    except NotReady as exc:
        raise ServiceError(503, str(exc)) from None
