"""Open Inference Protocol v2 routes (KServe / Triton clients) and the repository extension.

The hot ``/infer`` routes are answered by the front door; these FastAPI routes describe them
in the OpenAPI document and call the same :class:`~kanmoe.service.handlers.Service` method.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kanmoe import __version__
from kanmoe.service import schemas
from kanmoe.service.errors import ServiceError
from kanmoe.service.handlers import Service
from kanmoe.service.responses import (
    ERRORS,
    EXTENSIONS,
    INFER_RESPONSES,
    error_response,
    lookup,
    tensor_metadata,
    to_response,
)
from kanmoe.service.settings import ServeSettings
from kanmoe.service.store import NotFound


def v2_router(settings: ServeSettings, service: Service) -> APIRouter:
    router = APIRouter()
    store = service.store

    # -- v2 -------------------------------------------------------------------------------
    @router.get("/v2", tags=["v2"], response_model=schemas.ServerMetadata)
    async def server_metadata() -> schemas.ServerMetadata:
        return schemas.ServerMetadata(name="kanmoe", version=__version__, extensions=EXTENSIONS)

    def model_metadata(name: str, version: str | None) -> schemas.ModelMetadata:
        entry = lookup(store, name, version)
        versions = sorted((v.version for v in store.models[name].values() if v.ready), key=int)
        spec = entry.spec
        if spec is None:
            raise ServiceError(503, f"model {name!r} version {entry.version}: {entry.reason}")
        return schemas.ModelMetadata(
            name=name,
            versions=versions,
            platform="onnxruntime_onnx",
            inputs=[tensor_metadata("input", spec.input_shape())],
            outputs=[
                tensor_metadata(n, spec.output_shape(n))
                for n in spec.output_names
                if n in spec.outputs
            ],
            parameters={
                "version": entry.version,
                "providers": entry.model.providers if entry.model else [],
                "feature_names": list(spec.feature_names),
                "target_names": list(spec.target_names),
                "experts": {g.layer: list(g.experts) for g in spec.gates},
            },
        )

    @router.get(
        "/v2/models/{name}", tags=["v2"], response_model=schemas.ModelMetadata, responses=ERRORS
    )
    async def v2_model(name: str) -> schemas.ModelMetadata:
        return model_metadata(name, None)

    @router.get(
        "/v2/models/{name}/versions/{version}",
        tags=["v2"],
        response_model=schemas.ModelMetadata,
        responses=ERRORS,
    )
    async def v2_model_version(name: str, version: str) -> schemas.ModelMetadata:
        return model_metadata(name, version)

    def model_ready(name: str, version: str | None) -> Response:
        entry = lookup(store, name, version)
        if not entry.ready or service.draining:
            return error_response(
                503,
                f"model {name!r} version {entry.version} is not ready: "
                f"{entry.reason or entry.state}",
            )
        return Response(status_code=200)

    @router.get("/v2/models/{name}/ready", tags=["v2"], response_class=Response, responses=ERRORS)
    async def v2_ready(name: str) -> Response:
        return model_ready(name, None)

    @router.get(
        "/v2/models/{name}/versions/{version}/ready",
        tags=["v2"],
        response_class=Response,
        responses=ERRORS,
    )
    async def v2_version_ready(name: str, version: str) -> Response:
        return model_ready(name, version)

    def model_config(name: str, version: str | None) -> dict[str, Any]:
        entry = lookup(store, name, version)
        spec = entry.spec
        if spec is None:
            raise ServiceError(503, f"model {name!r} version {entry.version}: {entry.reason}")

        def tensor(n: str, shape: list[int]) -> dict[str, Any]:
            return {"name": n, "data_type": "TYPE_FP32", "dims": shape[1:]}

        return {
            "name": name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": settings.max_request_rows,
            "input": [tensor("input", spec.input_shape())],
            "output": [
                tensor(n, spec.output_shape(n)) for n in spec.output_names if n in spec.outputs
            ],
            "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_delay_ms * 1000)},
        }

    @router.get("/v2/models/{name}/config", tags=["v2"], responses=ERRORS)
    async def v2_config(name: str) -> dict[str, Any]:
        return model_config(name, None)

    @router.get("/v2/models/{name}/versions/{version}/config", tags=["v2"], responses=ERRORS)
    async def v2_version_config(name: str, version: str) -> dict[str, Any]:
        return model_config(name, version)

    infer_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schemas.inline_schema(schemas.InferRequestBody)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    @router.post(
        "/v2/models/{name}/infer",
        tags=["v2"],
        response_model=schemas.InferResponseBody,
        responses=INFER_RESPONSES,
        openapi_extra=infer_doc,
    )
    async def infer(name: str, request: Request) -> Response:
        """Open Inference Protocol v2 inference: JSON tensors or the binary tensor extension."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        return to_response(await service.v2_infer(name, None, await request.body(), headers))

    @router.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["v2"],
        response_model=schemas.InferResponseBody,
        responses=INFER_RESPONSES,
        openapi_extra=infer_doc,
    )
    async def infer_version(name: str, version: str, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return to_response(await service.v2_infer(name, version, await request.body(), headers))

    @router.post(
        "/v2/repository/index",
        tags=["repository"],
        response_model=list[schemas.RepositoryEntry],
        responses=ERRORS,
    )
    async def repository_index() -> list[schemas.RepositoryEntry]:
        entries = {(v.name, v.version): v.entry() for v in store.all_versions()}
        try:
            on_disk = store.scan()
        except FileNotFoundError as exc:
            raise ServiceError(503, str(exc)) from None
        for name in on_disk:
            if name not in store.models:
                entries[(name, "")] = {
                    "name": name,
                    "version": "",
                    "state": "UNAVAILABLE",
                    "reason": "not loaded",
                }
        return [schemas.RepositoryEntry(**e) for e in entries.values()]

    @router.post("/v2/repository/models/{name}/load", tags=["repository"], responses=ERRORS)
    async def load(name: str) -> dict[str, Any]:
        """(Re)load NAME from disk without a restart; a broken new version leaves the rest."""
        try:
            versions = await store.load(name)
        except NotFound as exc:
            raise ServiceError(404, str(exc)) from None
        failed = [v for v in versions if not v.ready]
        if not any(v.ready for v in versions):
            raise ServiceError(400, "; ".join(f"version {v.version}: {v.reason}" for v in failed))
        errors = {v.version: v.reason for v in failed}
        # A serving version whose file could not be re-read keeps serving; say why anyway.
        errors.update({v.version: v.extra["reload_error"] for v in versions if v.reload_failed})
        return {
            "name": name,
            "load": True,
            "versions": {v.version: v.state for v in versions},
            "errors": errors,
        }

    @router.post("/v2/repository/models/{name}/unload", tags=["repository"], responses=ERRORS)
    async def unload(name: str) -> dict[str, Any]:
        try:
            await store.unload(name)
        except NotFound as exc:
            raise ServiceError(404, str(exc)) from None
        return {"name": name, "unload": True}

    return router
