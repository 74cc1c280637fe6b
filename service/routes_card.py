"""What a served model learned: ``/v1/models/{m}/functions`` and the HTML ``/card``.

``functions`` serves the version's ``functions.json`` (written by ``kanmoe export`` beside
``model.onnx``) byte for byte; ``card`` renders :mod:`kanmoe.service.card` from the
version's spec, that file and the live expert counters. The file is read once per loaded
version (keyed by the version directory and the stamp of its ``model.onnx``, which a
re-export changes) and kept with its rendered plots; no torch is needed for either.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from kanmoe.service.card import functions_section, render_card
from kanmoe.service.errors import ServiceError
from kanmoe.service.handlers import Service
from kanmoe.service.responses import ERRORS, lookup
from kanmoe.service.settings import ServeSettings
from kanmoe.service.store import LoadedVersion

FUNCTIONS_FILE = "functions.json"
_JSON_200: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"schema": {"type": "object"}}}}
}
# The card answers HTML, its errors JSON: said explicitly, since FastAPI would document every
# error of an HTMLResponse route as text/html.
_CARD_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{
        code: {
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            }
        }
        for code in ERRORS
    },
    200: {"content": {"text/html": {"schema": {"type": "string"}}}},
}


@dataclass
class _Functions:
    """One version's functions.json: its bytes, parsed form and rendered plots."""

    stamp: tuple[int, int]
    body: bytes | None  # None: the version has no functions.json
    doc: dict[str, Any] | None
    html: str | None = field(default=None, repr=False)


class FunctionsCache:
    """functions.json per version directory, read once per loaded ``model.onnx`` stamp."""

    def __init__(self) -> None:
        self._entries: dict[Path, _Functions] = {}
        self._lock = threading.Lock()

    def get(self, version: LoadedVersion) -> _Functions:
        with self._lock:
            found = self._entries.get(version.path)
            if found is not None and found.stamp == version.stamp:
                return found
        found = self._read(version)
        with self._lock:
            self._entries[version.path] = found
        return found

    @staticmethod
    def _read(version: LoadedVersion) -> _Functions:
        path = version.path / FUNCTIONS_FILE
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return _Functions(version.stamp, None, None)
        except OSError as exc:
            raise ServiceError(
                503, f"{FUNCTIONS_FILE} of {_name(version)} is unreadable: {exc}"
            ) from None
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ServiceError(
                503, f"{FUNCTIONS_FILE} of {_name(version)} is not valid JSON: {exc}"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
            raise ServiceError(503, f"{FUNCTIONS_FILE} of {_name(version)} has no 'layers' list")
        return _Functions(version.stamp, body, doc)

    def html(self, version: LoadedVersion) -> tuple[dict[str, Any] | None, str]:
        """(parsed document, rendered learned-functions section) of ``version``."""
        entry = self.get(version)
        if entry.html is None:
            entry.html = functions_section(entry.doc)
        return entry.doc, entry.html


def _name(version: LoadedVersion) -> str:
    return f"model {version.name!r} version {version.version}"


def card_router(settings: ServeSettings, service: Service) -> APIRouter:
    router = APIRouter()
    store = service.store
    cache = FunctionsCache()

    def functions(name: str, version: str | None) -> Response:
        entry = lookup(store, name, version)
        found = cache.get(entry)
        if found.body is None:
            raise ServiceError(
                404,
                f"{_name(entry)} was exported without {FUNCTIONS_FILE}; "
                "re-export with kanmoe export",
            )
        return Response(found.body, media_type="application/json")

    @router.get("/v1/models/{name}/functions", tags=["v1"], responses={**ERRORS, **_JSON_200})
    def model_functions(name: str) -> Response:
        """The learned 1-D KAN edge functions, sampled at export (and symbolic forms)."""
        return functions(name, None)

    @router.get(
        "/v1/models/{name}/versions/{version}/functions",
        tags=["v1"],
        responses={**ERRORS, **_JSON_200},
    )
    def version_functions(name: str, version: str) -> Response:
        return functions(name, version)

    def card(name: str, version: str | None) -> HTMLResponse:
        entry = lookup(store, name, version)
        spec = entry.spec
        if spec is None:
            raise ServiceError(503, f"{_name(entry)}: {entry.reason or entry.state}")
        doc, section = cache.html(entry)
        metrics = service.metrics
        traffic = metrics.expert_traffic(name, entry.version) if metrics is not None else None
        if metrics is not None and traffic is None:
            traffic = {}  # counters on, this version not (yet) counted
        return HTMLResponse(render_card(spec, doc, traffic, section))

    @router.get(
        "/v1/models/{name}/card",
        tags=["v1"],
        response_class=HTMLResponse,
        responses=_CARD_RESPONSES,
    )
    def model_card(name: str) -> HTMLResponse:
        """A self-contained HTML model card: metrics, experts, traffic, learned functions."""
        return card(name, None)

    @router.get(
        "/v1/models/{name}/versions/{version}/card",
        tags=["v1"],
        response_class=HTMLResponse,
        responses=_CARD_RESPONSES,
    )
    def version_card(name: str, version: str) -> HTMLResponse:
        return card(name, version)

    return router
