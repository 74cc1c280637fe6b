"""``kanmoe.service``: FastAPI + ONNX Runtime serving of exported KAN / KAMoE models.

Importing this package imports no torch (tests check it); ``create_app`` builds the ASGI app
and ``serve`` runs it under uvicorn.
"""

from kanmoe.service.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def create_app(settings: ServeSettings | None = None):
    from kanmoe.service.app import create_app as _create_app

    return _create_app(settings)


def serve(settings: ServeSettings) -> None:
    from kanmoe.service.server import serve as _serve

    _serve(settings)
