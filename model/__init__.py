"""kanmoe.model: KAN layers, MoE wrappers, training."""

from .layers import KAN, KANLinear
from .splines import bspline_basis, export_mode, is_exporting, linear_spline_lookup, rbf_basis

__all__ = [
    "KAN",
    "KANLinear",
    "bspline_basis",
    "export_mode",
    "is_exporting",
    "linear_spline_lookup",
    "rbf_basis",
]
