"""Gate drift: how far the live share of traffic per expert has moved from the reference.

The exporter records, per MoE layer, the mean gate weight of each expert over the test split
(``GateLayer.reference_shares``). Live, :class:`GateWindow` keeps the gate weights of the last
``window`` rows served in a ring buffer, and :func:`js_divergence` compares the window's mean
weight per expert with the reference.

Why Jensen-Shannon divergence over per-expert shares:
- Both sides are distributions over the same E experts once normalised to sum to 1 (this also
  makes sigmoid gates, whose weights do not sum to 1, comparable).
- JSD is symmetric, finite even when an expert gets no traffic on one side (KL is infinite
  there), and with base-2 logarithms it lies in [0, 1]: 0 = same shares, 1 = disjoint shares.
  So one alert threshold means the same thing for every model and every number of experts.
- Comparing mean shares (not the full weight histograms) keeps the state O(E) per layer to
  evaluate and answers the operational question "is the traffic split changing?"; the full
  per-expert weight distributions are exported as histograms for anything finer.

The value exported is the *divergence* (the square of scipy's ``jensenshannon`` distance,
which returns its square root).

Cost: :meth:`GateWindow.add` copies a batch's ``(rows, E)`` weights into the buffer (one
vectorised slice assignment, two at the wrap-around); the mean and the divergence are computed
only when Prometheus scrapes, from the whole buffer, so no running sum accumulates rounding.
"""

from __future__ import annotations

import math

import numpy as np


def normalise_shares(values: np.ndarray) -> np.ndarray:
    """Non-negative weights -> a distribution summing to 1 (uniform if they sum to 0)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    total = float(values.sum())
    if not math.isfinite(total) or total <= 0.0:
        return np.full(values.shape, 1.0 / values.size)
    return values / total


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2, in [0, 1]) between two share vectors.

    Both inputs are normalised first; equals ``scipy.spatial.distance.jensenshannon(p, q,
    base=2) ** 2``.
    """
    p = normalise_shares(p)
    q = normalise_shares(q)
    if p.shape != q.shape:
        raise ValueError(f"share vectors differ in length: {p.shape[0]} vs {q.shape[0]}")
    m = 0.5 * (p + q)
    # Terms with p_i = 0 contribute 0 (x log x -> 0); m_i > 0 wherever p_i > 0.
    kl_pm = np.sum(p * np.log2(np.where(p > 0, p / np.where(m > 0, m, 1.0), 1.0)))
    kl_qm = np.sum(q * np.log2(np.where(q > 0, q / np.where(m > 0, m, 1.0), 1.0)))
    return float(min(1.0, max(0.0, 0.5 * (kl_pm + kl_qm))))


class GateWindow:
    """The gate weights ``(rows, E)`` of the last ``window`` rows served by one MoE layer.

    Not thread-safe on its own: the caller (the metrics collector) holds its lock around
    :meth:`add` and :meth:`mean_shares`.
    """

    def __init__(self, n_experts: int, window: int) -> None:
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if window < 1:
            raise ValueError(f"drift window must be >= 1 row, got {window}")
        self._buf = np.zeros((window, n_experts), dtype=np.float64)
        self._pos = 0  # next row to overwrite
        self._filled = 0

    @property
    def rows(self) -> int:
        """How many rows the window holds now (at most ``window``)."""
        return self._filled

    def add(self, weights: np.ndarray) -> None:
        """Append a batch's weights ``(rows, E)``; the oldest rows fall out past ``window``."""
        size = self._buf.shape[0]
        rows = weights.shape[0]
        if rows >= size:
            self._buf[:] = weights[rows - size :]
            self._pos, self._filled = 0, size
            return
        end = self._pos + rows
        if end <= size:
            self._buf[self._pos : end] = weights
        else:
            first = size - self._pos
            self._buf[self._pos :] = weights[:first]
            self._buf[: rows - first] = weights[first:]
        self._pos = end % size
        self._filled = min(size, self._filled + rows)

    def mean_shares(self) -> np.ndarray | None:
        """Mean weight per expert over the window, normalised to sum to 1; None when empty."""
        if self._filled == 0:
            return None
        return normalise_shares(self._buf[: self._filled].sum(axis=0))
