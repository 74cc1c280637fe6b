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

# Mixture of experts (MOE engineer)
from .experts import KANExpert, MLPExpert, RNNExpert
from .gates import GRKANGate, GRNGate, LinearGate, Router
from .moe import GatedSequential, KAMoE, MoE, moe_layers, total_aux_loss

__all__ += [
    "GRKANGate",
    "GRNGate",
    "GatedSequential",
    "KAMoE",
    "KANExpert",
    "LinearGate",
    "MLPExpert",
    "MoE",
    "RNNExpert",
    "Router",
    "moe_layers",
    "total_aux_loss",
]
