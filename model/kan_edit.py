"""Editing a trained KAN layer: grid refit, pykan regularisation, locking and pruning.

Mixed into :class:`kanmoe.model.layers.KANLinear`; kept apart so each file holds one job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _solve_ridge(ata: Tensor, aty: Tensor) -> Tensor:
    """Solve (A^T A + eps I) c = A^T y per input in float64; eps tiny, relative to the diagonal."""
    ata, aty = ata.double(), aty.double()
    ridge = 1e-10 * ata.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
    eye = torch.eye(ata.shape[-1], dtype=ata.dtype, device=ata.device)
    return torch.linalg.solve(ata + ridge[:, None, None] * eye, aty)


def _ridge_fit(basis: Tensor, target: Tensor) -> Tensor:
    """Per-input least squares: basis (in, S, M), target (in, S, out) -> coef (in, M, out).

    Normal equations with a tiny ridge so unsupported bases go to ~0 instead of blowing up
    (works on CPU and CUDA, unlike the CPU-only rank-revealing lstsq drivers).
    """
    a = basis.double()
    return _solve_ridge(a.transpose(1, 2) @ a, a.transpose(1, 2) @ target.double()).to(basis.dtype)


class KANEditMixin:
    """update_grid / regularization_loss / lock / unlock / prune for KANLinear."""

    # ------------------------------------------------------------------ grid update

    @torch.no_grad()
    def update_grid(self, x: Tensor, margin: float = 0.01, quantile: float = 0.0) -> None:
        """Refit each input's grid to the data in ``x`` keeping the layer's function.

        New range per input: [q-quantile - margin, (1-q)-quantile + margin] (q = 0: min/max).
        The grid stays uniform per input (an affine map onto the canonical range); the spline
        coefficients are refitted by least squares to the old edge functions at x, through
        the (in, M, M) normal equations, so memory does not grow with batch x out. The base
        branch reads raw x and is unaffected.
        """
        self._check_input(x)
        if not 0.0 <= quantile < 0.5:
            raise ValueError(f"quantile must be in [0, 0.5), got {quantile!r}")
        x2 = x.reshape(-1, self.in_features)
        old_basis = self._dense_basis(self._normalise(x2)).transpose(0, 1).double()  # (in,S,M)
        old_coef = self._coef_oim().permute(1, 2, 0).double()  # (in, M, out)
        if quantile > 0:
            q = torch.tensor([quantile, 1.0 - quantile], dtype=x2.dtype, device=x2.device)
            lo, hi = torch.quantile(x2, q, dim=0)
        else:
            lo, hi = x2.min(0).values, x2.max(0).values
        lo, hi = lo - margin, hi + margin
        span = (hi - lo).clamp_min(1e-6)
        scale = (self.grid_hi - self.grid_lo) / span
        self.grid_scale.copy_(scale)
        self.grid_shift.copy_(self.grid_lo - lo * scale)
        self._flags_from_buffers()
        new_basis = self._dense_basis(self._normalise(x2)).transpose(0, 1).double()
        nt = new_basis.transpose(1, 2)
        coef = _solve_ridge(nt @ new_basis, (nt @ old_basis) @ old_coef)  # (in, M, out)
        self._set_coef_oim(coef.to(self.grid_scale.dtype).permute(2, 0, 1))

    def _set_coef_oim(self, coef: Tensor) -> None:
        """Store effective coefficients (out, in, M) back into the parameters and lock buffer."""
        if self.basis == "linear":
            native = coef.permute(1, 2, 0)
            self.control_points.copy_(native)
            self.locked_coef.copy_(native)
            return
        self.locked_coef.copy_(coef)
        if self.enable_standalone_scale_spline:
            s = self.spline_scaler.unsqueeze(-1)
            safe = torch.where(s.abs() > 1e-12, s, torch.ones_like(s))
            coef = torch.where(s.abs() > 1e-12, coef / safe, torch.zeros_like(coef))
        self.spline_weight.copy_(coef)

    # ------------------------------------------------------------------ regularisation

    def _sample_inputs(self, x: Tensor | None) -> Tensor:
        if x is not None:
            self._check_input(x)
            return x.reshape(-1, self.in_features)
        if self._last_x is not None:
            return self._last_x
        return self.input_domain(64)

    def edge_magnitude(self, x: Tensor | None = None) -> Tensor:
        """(out, in) mean |phi_{q,p}(x_p)| over ``x``, the last training batch, or the grid."""
        return self.edge_activations(self._sample_inputs(x)).abs().mean(0)

    def regularization_loss(self, l1: float = 1.0, entropy: float = 1.0) -> Tensor:
        """pykan's L1 + entropy penalty on the mean |activation| of each edge.

        Approximation: the means use the first 8-256 rows of the last training batch (fewer
        for wide layers, so the (rows, out, in) activations stay <= 4M numbers; before any
        training forward, a uniform sweep of the grid), so the cost does not grow with the
        batch. Inputs are detached: gradients reach this layer's weights, not earlier layers.
        """
        mag = self.edge_magnitude()
        total = mag.sum()
        p = mag / (total + 1e-12)
        ent = -(p * torch.log(p + 1e-12)).sum()
        return l1 * total + entropy * ent

    # ------------------------------------------------------------------ lock / prune

    def _edge_index(self, in_idx: int | Sequence[int], out_idx: int | Sequence[int] | None):
        ins = [in_idx] if isinstance(in_idx, int) else list(in_idx)
        outs = range(self.out_features) if out_idx is None else out_idx
        outs = [outs] if isinstance(outs, int) else list(outs)
        for i in ins:
            if not 0 <= i < self.in_features:
                raise ValueError(f"in_idx {i} out of range [0, {self.in_features})")
        for o in outs:
            if not 0 <= o < self.out_features:
                raise ValueError(f"out_idx {o} out of range [0, {self.out_features})")
        return torch.tensor(outs)[:, None], torch.tensor(ins)[None, :]

    @torch.no_grad()
    def lock(
        self,
        in_idx: int | Sequence[int],
        out_idx: int | Sequence[int] | None = None,
        fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Freeze edges (out_idx None = every output of ``in_idx``) at their current function.

        With ``fn`` (a torch function of x, e.g. ``torch.sin``) the edge is first refitted to
        fn over its grid (base weight 0). Locked edges ignore later parameter changes (the
        forward reads the frozen copy), so optimisers, weight decay and momentum cannot move
        them; their gradients are zero.
        """
        rows, cols = self._edge_index(in_idx, out_idx)
        coef = self._coef_oim().clone()
        base = self.base_weights()
        if fn is not None:
            xs = self.input_domain(256, widen=0.0)  # (S, in)
            target = fn(xs).to(xs.dtype).t().unsqueeze(-1)  # (in, S, 1)
            fitted = _ridge_fit(self._dense_basis(self._normalise(xs)).transpose(0, 1), target)
            coef[rows, cols] = (
                fitted[:, :, 0].unsqueeze(0).expand(coef.shape[0], -1, -1)[rows, cols]
            )
            if base is not None:
                base = base.clone()
                base[rows, cols] = 0.0
        if self.basis == "linear":
            self.locked_coef[cols, :, rows] = coef.permute(1, 2, 0)[cols, :, rows]
        else:
            self.locked_coef[rows, cols] = coef[rows, cols]
            self.locked_base[rows, cols] = base[rows, cols]
        self.lock_mask[rows, cols] = True
        self._flags_from_buffers()

    @torch.no_grad()
    def unlock(
        self, in_idx: int | Sequence[int], out_idx: int | Sequence[int] | None = None
    ) -> None:
        """Let training change these edges again (they restart from the current parameters)."""
        rows, cols = self._edge_index(in_idx, out_idx)
        self.lock_mask[rows, cols] = False
        self._flags_from_buffers()

    @torch.no_grad()
    def prune(self, threshold: float = 1e-2, x: Tensor | None = None) -> Tensor:
        """Mask edges with mean |activation| below ``threshold``; returns the (out, in) keep mask.

        Pruning is a mask (the layer keeps its shape; a masked edge contributes exactly 0), so
        saved weights and exported graphs stay compatible. Nodes go with their edges: an input
        whose edges are all masked is ignored and an output with no edge left outputs 0
        (``pruned_inputs()``/``pruned_outputs()`` list them).
        """
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        keep = (self.edge_magnitude(x) >= threshold) & (self.edge_mask > 0)
        self.edge_mask.copy_(keep.to(self.edge_mask.dtype))
        self._flags_from_buffers()
        return keep

    def pruned_inputs(self) -> list[int]:
        """Inputs with no edge left."""
        return [int(i) for i in torch.nonzero(self.edge_mask.sum(0) == 0).flatten()]

    def pruned_outputs(self) -> list[int]:
        """Outputs with no edge left."""
        return [int(i) for i in torch.nonzero(self.edge_mask.sum(1) == 0).flatten()]
