"""SET (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
sparse connectivity inspired by network science").

As RigL (same schedule and cosine drop fraction), but the grown units are drawn uniformly at
random (exact count, seeded by ``(seed, step, layer)``) among the units not kept.
"""
from __future__ import annotations

from .base import _UNSET, DropAndGrow


class SET(DropAndGrow):
    """SET: magnitude drop, random growth.

    Args: as :class:`~sparsekern.dst.RigL` (``skip_optimizer_step_on_update`` defaults to
    True as there, so that SET and RigL runs differ only in how they grow).
    """

    grows_by_gradient = False

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, delta_t: int = 100, alpha: float = 0.3,
                 t_end: float = 0.75, skip_optimizer_step_on_update: bool = True, **kw):
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, delta_t=delta_t, alpha=alpha, t_end=t_end,
                         skip_optimizer_step_on_update=skip_optimizer_step_on_update, **kw)
