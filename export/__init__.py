"""ONNX export of kanmoe models with the spline evaluation as ``ai.kanmoe`` custom ops.

- :mod:`kanmoe.export.onnx_ops`: op schemas, FunctionProto bodies, torch translation table.
- :mod:`kanmoe.export.exporter`: ``ServableModel`` -> ``onnx.ModelProto``.
- :mod:`kanmoe.export.verify`: parity of ORT and ReferenceEvaluator against torch.
- :mod:`kanmoe.export.repository`: Triton-style model repository writer.
- :mod:`kanmoe.export.stats`: training feature ranges and gate reference for ``kanmoe.json``.

Importing this package does not import torch; the names below load their module on first use.
"""

import importlib
from typing import Any

_LAZY = {
    "export_model": "kanmoe.export.exporter",
    "export_run": "kanmoe.export.repository",
    "write_repository_entry": "kanmoe.export.repository",
    "run_stats": "kanmoe.export.stats",
    "RunStats": "kanmoe.export.stats",
    "verify_model": "kanmoe.export.verify",
    "VerifyReport": "kanmoe.export.verify",
    "attach_functions": "kanmoe.export.onnx_ops",
    "check_functions": "kanmoe.export.onnx_ops",
    "register_schemas": "kanmoe.export.onnx_ops",
    "DOMAIN": "kanmoe.export.onnx_ops",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kanmoe.export' has no attribute {name!r}")
