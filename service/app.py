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
from kanmoe.service.handlers import Service
from kanmoe.service.metrics import ServiceMetrics
from kanmoe.service.responses import ERRORS, INFER_ERRORS, error_response, lookup, to_response
from kanmoe.service.routes_card import card_router
from kanmoe.service.routes_v2 import v2_router
from kanmoe.service.settings import ServeSettings
from kanmoe.service.store import LoadedVersion, ModelStore

log = logging.getLogger("kanmoe.service")


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


def create_fastapi(settings: ServeSettings, service: Service, metrics: Any | None) -> FastAPI:
    store = service.store

    async def load_repository() -> None:
        await store.load_all()
        # The loaded sessions, specs and imports live until exit: move them out of the
        # collector's way so full collections under load scan only request garbage.
        gc.collect()
        gc.freeze()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One process: load in the background, so liveness answers at once and readiness
        # once every model has loaded and run its warm-up batch. Several worker processes
        # share one listening socket: each loads before it starts accepting, so a worker
        # still loading never takes a connection its loaded siblings could have answered.
        loading: asyncio.Task[None] | None = None
        if settings.workers > 1:
            await load_repository()
        else:
            loading = asyncio.create_task(load_repository())
        yield
        service.draining = True
        if loading is not None and not loading.done():
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
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal error; see the server log")

    def get(name: str, version: str | None = None) -> LoadedVersion:
        return lookup(store, name, version)

    # -- health and metrics ---------------------------------------------------------------
    @app.get("/v2/health/live", tags=["health"], response_class=Response)
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["health"], response_class=Response, responses=ERRORS)
    async def ready() -> Response:
        if service.draining:
            return error_response(503, "the server is shutting down")
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
            return error_response(503, "not ready: " + ("; ".join(bad) or "no model loaded"))
        return Response(status_code=200)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics_route(request: Request) -> Response:
        if metrics is None:
            return error_response(404, "metrics are disabled (KANMOE_METRICS=false)")
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
        return to_response(await service.v1_predict(name, None, await request.body(), ctype))

    @app.post(
        "/v1/models/{name}/versions/{version}/predict",
        tags=["v1"],
        response_model=schemas.PredictResponse,
        responses=INFER_ERRORS,
        openapi_extra=predict_doc,
    )
    async def predict_version(name: str, version: str, request: Request) -> Response:
        ctype = request.headers.get("content-type")
        return to_response(await service.v1_predict(name, version, await request.body(), ctype))

    app.include_router(v2_router(settings, service))
    app.include_router(card_router(settings, service))

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
