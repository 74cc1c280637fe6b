"""Fixed feature expansions that run inside the network (so they are exported with it).

``PairRotations`` appends the projections of two (standardised) features onto evenly spaced
directions of their plane. A KAN layer is a sum of one-dimensional functions of its inputs,
so on its own it cannot carve structure that runs diagonally in a plane such as
(latitude, longitude); with the projections as extra inputs, its splines act as ridge
functions along many directions (projection pursuit with fixed directions). On California
Housing 32 directions lift a single KAN-first expert from R² ≈ 0.81 to ≈ 0.85.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PairRotations(nn.Module):
    """x (..., F) -> (..., F + R): x followed by its (i, j) plane projected on R directions.

    ``count`` directions are spread evenly over 180°; the two that coincide with the feature
    axes themselves (0° and 90°) are skipped, so R = count - 1 - (count even). Each
    projection is divided by its standard deviation on the training data (``fit``), which
    keeps it on the same scale as the standardised inputs and the KAN grid.
    """

    def __init__(self, n_features: int, pair: tuple[int, int], count: int) -> None:
        super().__init__()
        i, j = pair
        if not (0 <= i < n_features and 0 <= j < n_features) or i == j:
            raise ValueError(f"pair {pair} must be two different indices below {n_features}")
        if count < 3:
            raise ValueError(f"count must be >= 3 (0° and 90° are the inputs), got {count}")
        angles = [math.pi * k / count for k in range(1, count) if 2 * k != count]
        directions = torch.zeros(n_features, len(angles))
        for r, a in enumerate(angles):
            directions[i, r] = math.cos(a)
            directions[j, r] = math.sin(a)
        self.n_features, self.pair, self.count = n_features, (i, j), count
        self.register_buffer("directions", directions)
        self.register_buffer("scale", torch.ones(len(angles)))

    @property
    def out_features(self) -> int:
        return self.n_features + self.directions.shape[1]

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Set ``scale`` so every projection has unit standard deviation on ``x`` (N, F)."""
        std = (x.reshape(-1, self.n_features).to(self.directions) @ self.directions).std(0)
        self.scale.copy_(torch.where(std > 1e-6, 1.0 / std, torch.ones_like(std)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, (x @ self.directions) * self.scale], dim=-1)

    def extra_repr(self) -> str:
        return f"n_features={self.n_features}, pair={self.pair}, count={self.count}"


def fit_feature_layers(model: nn.Module, x_train: Tensor) -> int:
    """Fit every ``PairRotations`` in ``model`` on the (scaled) training inputs; returns how many.

    Only a layer that sees the raw model input can be fitted this way, which is the one place
    the builder puts it.
    """
    layers = [m for m in model.modules() if isinstance(m, PairRotations)]
    for layer in layers:
        layer.fit(x_train)
    return len(layers)
