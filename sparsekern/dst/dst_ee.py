"""DST-EE (Huang et al., "Dynamic Sparse Training via Balancing the Exploration-Exploitation
Trade-off").

As RigL, but the growth score is ``S = |G| + c·ln(t) / (N + ε)`` with ``N`` a per-unit counter
(``N ← M_0`` at the start, ``N ← N + M_new`` after every update) and ``t`` the update's step.
The bonus goes to the fused top-k (``GrowRequest.counter``/``bonus_scale``), never onto a dense
gradient.

[ours] ``c_relative=True`` scales ``c`` by the mean ``|G|`` over the layer's active entries of
the last backward before the update (the fused top-k is armed before the update step's own
forward, so its gradient is not known yet); without any gradient so far ``c`` is used as is.
"""
from __future__ import annotations

import math

import torch

from ..nn.base import full_tensor
from ..nn.request import GrowRequest
from .base import _UNSET, DropAndGrow, LayerState


class DSTEE(DropAndGrow):
    """DST-EE.

    Args:
        c: exploration coefficient (5.0; [ours], the paper gives none). With ``c_relative`` a
            never-active unit's bonus is ``c·ln(t)`` times the layer's mean active ``|G|``,
            i.e. comparable to the growth scores themselves. Chosen on the planted-topology
            benchmark and the tests' small CNN, where it gives ~1.4x RigL's exploration gain
            (1e-3, the first default, grew RigL's set).
        eps: ``ε`` of the bonus (1.0; [ours]).
        c_relative: scale ``c`` by the layer's mean active ``|G|`` (True; [ours]).
        others: as :class:`~sparsekern.dst.RigL`.
    """

    grows_by_gradient = True

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, delta_t: int = 100, alpha: float = 0.3,
                 t_end: float = 0.75, c: float = 5.0, eps: float = 1.0,
                 c_relative: bool = True, skip_optimizer_step_on_update: bool = True, **kw):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) \
                or c < 0:
            raise ValueError(f"DSTEE: c must be a finite number >= 0, got {c!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
                or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"DSTEE: eps must be a finite number > 0, got {eps!r}")
        self.c, self.eps, self.c_relative = float(c), float(eps), bool(c_relative)
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, delta_t=delta_t, alpha=alpha, t_end=t_end,
                         skip_optimizer_step_on_update=skip_optimizer_step_on_update, **kw)

    def _setup(self) -> None:
        for ls in self.layers:
            ls.extra["counter"] = ls.unit_mask().to(torch.int32)

    def gradient_scale(self, ls: LayerState) -> float:
        """Mean ``|G|`` over the active entries of the latest backward (1.0 without one)."""
        g = full_tensor(ls.module.weight.grad)  # FSDP2: a sharded DTensor
        if not self.c_relative or g is None:
            return 1.0
        g = g.detach().abs()
        if not ls.bsr and tuple(g.shape) == ls.weight_shape:
            g = g[ls.module.mask]
        return float(g.float().mean()) if g.numel() else 1.0

    def growth_request(self, ls: LayerState, t: int, kept, k: int) -> GrowRequest:
        scale = self.c * math.log(t) * self.gradient_scale(ls)
        return GrowRequest(k=k, exclude=kept, counter=ls.extra["counter"], bonus_scale=scale,
                           eps=self.eps)

    def after_update(self, ls: LayerState, new_unit) -> None:
        ls.extra["counter"] += new_unit.to(torch.int32)
