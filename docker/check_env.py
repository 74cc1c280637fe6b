"""Check a serving environment right after ``pip install``: fail the image build if it is wrong.

``python check_env.py --ort onnxruntime-gpu --provider CUDAExecutionProvider`` exits 1, with
one line per problem, unless

- exactly one installed distribution ships the ``onnxruntime`` package, and it is ``--ort``
  (``onnxruntime`` and ``onnxruntime-gpu`` unpack into the same directory, so with both the
  last one installed wins file by file and CUDA quietly disappears from the providers),
- ``--provider`` is among the providers that ONNX Runtime build offers (a build-time fact:
  no GPU is needed to list it),
- torch is not installed (the service loads ONNX files only; torch would add gigabytes),
- the service package imports, and importing it does not import torch.

The Dockerfile runs it in both targets, and ``tests/test_serving_wheel.py`` runs it in a
fresh virtual environment made with the image's install line, so the check itself is tested.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import re
import sys


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ort_owners() -> list[str]:
    """Installed distributions whose files include the top-level ``onnxruntime`` package."""
    owners = set()
    for dist in md.distributions():
        files = dist.files or []
        if any(f.parts and f.parts[0] == "onnxruntime" for f in files):
            owners.add(_canonical(dist.metadata["Name"]))
    return sorted(owners)


def problems(ort: str, provider: str | None) -> list[str]:
    """Everything wrong with this environment for serving (empty when it is right)."""
    found: list[str] = []
    owners = ort_owners()
    if owners != [_canonical(ort)]:
        found.append(
            f"expected exactly one ONNX Runtime distribution ({ort}), found {owners or 'none'}"
        )
    if importlib.util.find_spec("torch") is not None:
        found.append("torch is installed; the serving environment must not hold it")
    try:
        importlib.import_module("kanmoe.service.server")
        importlib.import_module("kanmoe.commands.serve")
    except ImportError as exc:
        found.append(f"the service does not import: {exc}")
    if "torch" in sys.modules:
        found.append("importing the service imported torch")
    if provider is not None and owners:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        if provider not in available:
            found.append(f"{provider} is not offered by this ONNX Runtime build: {available}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ort", required=True, help="the one ONNX Runtime distribution wanted")
    parser.add_argument("--provider", help="an execution provider the build must offer")
    args = parser.parse_args(argv)
    found = problems(args.ort, args.provider)
    for line in found:
        print(f"check_env: {line}", file=sys.stderr)
    if not found:
        print(f"check_env: ok ({args.ort}, no torch)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
