"""kanmoe: Kolmogorov-Arnold Networks and Kolmogorov-Arnold Mixtures of Experts.

Train in PyTorch (``kanmoe.model``), export to ONNX with the spline evaluation as custom ops
(``kanmoe.export``) and serve on ONNX Runtime (``kanmoe.service``). Importing ``kanmoe``
does not import torch: the serving path must work without it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kanmoe")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
