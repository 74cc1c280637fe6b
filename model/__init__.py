"""kanmoe.model: KAN layers, gates, mixtures of experts, training (needs torch)."""

from .experts import KANExpert, MLPExpert, RNNExpert
from .gates import GRKANGate, GRNGate, LinearGate, Router
from .layers import KAN, KANLinear
from .moe import GatedSequential, KAMoE, MoE, moe_layers, total_aux_loss
from .splines import bspline_basis, export_mode, is_exporting, linear_spline_lookup, rbf_basis

__all__ = [
    "KAN",
    "GRKANGate",
    "GRNGate",
    "GatedSequential",
    "KAMoE",
    "KANExpert",
    "KANLinear",
    "LinearGate",
    "MLPExpert",
    "MoE",
    "RNNExpert",
    "Router",
    "bspline_basis",
    "export_mode",
    "is_exporting",
    "linear_spline_lookup",
    "moe_layers",
    "rbf_basis",
    "total_aux_loss",
]
