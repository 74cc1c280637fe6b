"""FastAPI application: the v1 API, the Open Inference Protocol v2, health and /metrics.

``create_app(settings)`` returns the ASGI app to serve: the FastAPI app wrapped in the
:class:`~kanmoe.service.frontdoor.FrontDoor`, which answers the two hot routes itself and
adds request ids, auth, limits and request metrics to everything.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kanmoe import __version__
from kanmoe.service import schemas
from kanmoe.service.errors import ServiceError
from kanmoe.service.frontdoor import FrontDoor
from kanmoe.service.handlers import Reply, Service
from kanmoe.service.metrics import ServiceMetrics
from kanmoe.service.settings import ServeSettings
from kanmoe.service.store import LoadedVersion, ModelStore, NotFound, NotReady

log = logging.getLogger("kanmoe.service")

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


def _err(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _reply(reply: Reply) -> Response:
    return Response(reply.body, status_code=reply.status, headers=reply.headers)


def _version_info(v: LoadedVersion) -> schemas.VersionInfo:
    spec = v.spec
    if spec is None:
        return schemas.VersionInfo(version=v.version, state=v.state, reason=v.reason)
    ranges = spec.feature_ranges or {}
    return schemas.VersionInfo(
        version=v.version,
        state=v.state,
        reason=v.reason,
        providers=v.model.providers if v.model else [],
        is_sequence=spec.is_sequence,
        seq_len=spec.seq_len,
        input_units=str(spec.raw.get("input_units", "raw")),
        features=[
            schemas.FeatureInfo(
                name=f, min=ranges.get(f, (None, None))[0], max=ranges.get(f, (None, None))[1]
            )
            for f in spec.feature_names
        ],
        targets=list(spec.target_names),
        experts={g.layer: list(g.experts) for g in spec.gates},
        metrics=spec.metrics,
    )


def _tensor(name: str, shape: list[int]) -> schemas.TensorMetadata:
    return schemas.TensorMetadata(name=name, datatype="FP32", shape=shape)


def create_fastapi(settings: ServeSettings, service: Service, metrics: Any | None) -> FastAPI:
    store = service.store

    async def load_repository() -> None:
        try:
            await store.load_all()
        except Exception as exc:  # a missing repository must not kill the process
            store.load_error = str(exc)
            log.error("model repository not loaded: %s", exc)
        store.loaded = True
        # The loaded sessions, specs and imports live until exit: move them out of the
        # collector's way so full collections under load scan only request garbage.
        gc.collect()
        gc.freeze()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: liveness answers at once, readiness once every model
        # has loaded and run its warm-up batch.
        loading = asyncio.create_task(load_repository())
        yield
        service.draining = True
        if not loading.done():
            loading.cancel()
        await store.close()

    app = FastAPI(
        title="kanmoe",
        version=__version__,
        description="KAN / KAMoE models on ONNX Runtime: a v1 JSON API with per-expert gate "
        "weights and the Open Inference Protocol v2 (KServe / Triton clients).",
        lifespan=lifespan,
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _err(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _err(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _err(exc.status, exc.message, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _err(500, "internal error; see the server log")

    def get(name: str, version: str | None = None) -> LoadedVersion:
        try:
            return store.get(name, version)
        except NotFound as exc:
            raise ServiceError(404, str(exc)) from None
        except NotReady as exc:
            raise ServiceError(503, str(exc)) from None

    # -- health and metrics ---------------------------------------------------------------
    @app.get("/v2/health/live", tags=["health"], response_class=Response)
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["health"], response_class=Response, responses=ERRORS)
    async def ready() -> Response:
        if service.draining:
            return _err(503, "the server is shutting down")
        if not store.ready():
            bad = [
                f"{v.name}/{v.version}: {v.reason or v.state}"
                for v in store.all_versions()
                if not v.ready
            ]
            if settings.require_gpu:
                bad.append("KANMOE_REQUIRE_GPU is set and CUDA is not active on every model")
            if not store.loaded:
                bad.insert(0, "models are still loading")
            if store.load_error:
                bad.insert(0, store.load_error)
            return _err(503, "not ready: " + ("; ".join(bad) or "no model loaded"))
        return Response(status_code=200)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics_route(request: Request) -> Response:
        if metrics is None:
            return _err(404, "metrics are disabled (KANMOE_METRICS=false)")
        for v in store.all_versions():
            if v.batcher is not None:
                metrics.set_queue_depth(v.name, v.version, v.batcher.queued_rows)
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    # -- v1 -------------------------------------------------------------------------------
    @app.get("/v1/models", tags=["v1"], response_model=schemas.ModelList)
    async def list_models() -> schemas.ModelList:
        return schemas.ModelList(
            models=[
                schemas.ModelInfo(
                    name=name,
                    versions=[
                        _version_info(v)
                        for v in sorted(store.models[name].values(), key=lambda v: int(v.version))
                    ],
                )
                for name in store.model_names()
            ]
        )

    @app.get("/v1/models/{name}", tags=["v1"], response_model=schemas.ModelInfo, responses=ERRORS)
    async def model_info(name: str) -> schemas.ModelInfo:
        if name not in store.models:
            get(name)  # raises the 404 with the list of models
        return schemas.ModelInfo(
            name=name,
            versions=[
                _version_info(v)
                for v in sorted(store.models[name].values(), key=lambda v: int(v.version))
            ],
        )

    predict_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": schemas.inline_schema(schemas.PredictRequest),
                    "examples": {
                        "named": {"value": {"instances": [schemas.EXAMPLE_INSTANCE]}},
                        "positional": {"value": {"inputs": [schemas.EXAMPLE_ROW]}},
                    },
                }
            },
        }
    }

    @app.post(
        "/v1/models/{name}/predict",
        tags=["v1"],
        response_model=schemas.PredictResponse,
        responses=INFER_ERRORS,
        openapi_extra=predict_doc,
    )
    async def predict(name: str, request: Request) -> Response:
        """Predict from named features or rows; the answer carries each row's gate weights."""
        ctype = request.headers.get("content-type")
        return _reply(await service.v1_predict(name, None, await request.body(), ctype))

    @app.post(
        "/v1/models/{name}/versions/{version}/predict",
        tags=["v1"],
        response_model=schemas.PredictResponse,
        responses=INFER_ERRORS,
        openapi_extra=predict_doc,
    )
    async def predict_version(name: str, version: str, request: Request) -> Response:
        ctype = request.headers.get("content-type")
        return _reply(await service.v1_predict(name, version, await request.body(), ctype))

    # -- v2 -------------------------------------------------------------------------------
    @app.get("/v2", tags=["v2"], response_model=schemas.ServerMetadata)
    async def server_metadata() -> schemas.ServerMetadata:
        return schemas.ServerMetadata(name="kanmoe", version=__version__, extensions=EXTENSIONS)

    def model_metadata(name: str, version: str | None) -> schemas.ModelMetadata:
        entry = get(name, version)
        versions = sorted((v.version for v in store.models[name].values() if v.ready), key=int)
        spec = entry.spec
        if spec is None:
            raise ServiceError(503, f"model {name!r} version {entry.version}: {entry.reason}")
        return schemas.ModelMetadata(
            name=name,
            versions=versions,
            platform="onnxruntime_onnx",
            inputs=[_tensor("input", spec.input_shape())],
            outputs=[
                _tensor(n, spec.output_shape(n)) for n in spec.output_names if n in spec.outputs
            ],
            parameters={
                "version": entry.version,
                "providers": entry.model.providers if entry.model else [],
                "feature_names": list(spec.feature_names),
                "target_names": list(spec.target_names),
                "experts": {g.layer: list(g.experts) for g in spec.gates},
            },
        )

    @app.get(
        "/v2/models/{name}", tags=["v2"], response_model=schemas.ModelMetadata, responses=ERRORS
    )
    async def v2_model(name: str) -> schemas.ModelMetadata:
        return model_metadata(name, None)

    @app.get(
        "/v2/models/{name}/versions/{version}",
        tags=["v2"],
        response_model=schemas.ModelMetadata,
        responses=ERRORS,
    )
    async def v2_model_version(name: str, version: str) -> schemas.ModelMetadata:
        return model_metadata(name, version)

    def model_ready(name: str, version: str | None) -> Response:
        entry = get(name, version)
        if not entry.ready or service.draining:
            return _err(
                503,
                f"model {name!r} version {entry.version} is not ready: "
                f"{entry.reason or entry.state}",
            )
        return Response(status_code=200)

    @app.get("/v2/models/{name}/ready", tags=["v2"], response_class=Response, responses=ERRORS)
    async def v2_ready(name: str) -> Response:
        return model_ready(name, None)

    @app.get(
        "/v2/models/{name}/versions/{version}/ready",
        tags=["v2"],
        response_class=Response,
        responses=ERRORS,
    )
    async def v2_version_ready(name: str, version: str) -> Response:
        return model_ready(name, version)

    def model_config(name: str, version: str | None) -> dict[str, Any]:
        entry = get(name, version)
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

    @app.get("/v2/models/{name}/config", tags=["v2"], responses=ERRORS)
    async def v2_config(name: str) -> dict[str, Any]:
        return model_config(name, None)

    @app.get("/v2/models/{name}/versions/{version}/config", tags=["v2"], responses=ERRORS)
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

    @app.post(
        "/v2/models/{name}/infer",
        tags=["v2"],
        response_model=schemas.InferResponseBody,
        responses=INFER_RESPONSES,
        openapi_extra=infer_doc,
    )
    async def infer(name: str, request: Request) -> Response:
        """Open Inference Protocol v2 inference: JSON tensors or the binary tensor extension."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        return _reply(await service.v2_infer(name, None, await request.body(), headers))

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["v2"],
        response_model=schemas.InferResponseBody,
        responses=INFER_RESPONSES,
        openapi_extra=infer_doc,
    )
    async def infer_version(name: str, version: str, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return _reply(await service.v2_infer(name, version, await request.body(), headers))

    @app.post(
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

    @app.post("/v2/repository/models/{name}/load", tags=["repository"], responses=ERRORS)
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

    @app.post("/v2/repository/models/{name}/unload", tags=["repository"], responses=ERRORS)
    async def unload(name: str) -> dict[str, Any]:
        try:
            await store.unload(name)
        except NotFound as exc:
            raise ServiceError(404, str(exc)) from None
        return {"name": name, "unload": True}

    return app


def create_app(settings: ServeSettings | None = None) -> Any:
    """The ASGI app for ``settings`` (default: from ``KANMOE_*`` environment variables)."""
    settings = settings or ServeSettings()
    metrics = ServiceMetrics(drift_window=settings.drift_window) if settings.metrics else None
    store = ModelStore(settings, metrics)
    service = Service(settings, store, metrics)
    api = create_fastapi(settings, service, metrics)
    app: Any = FrontDoor(api, service, settings, metrics)
    if settings.cors_origins:
        app = CORSMiddleware(
            app,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    app.state_service = service  # type: ignore[attr-defined]
    return app
