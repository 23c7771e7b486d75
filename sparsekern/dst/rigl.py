"""RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners").

Every ``delta_t`` steps until ``t_end·T``: drop the ``int(f(t)·n_active)`` active units of
smallest ``|W|`` (cosine ``f``), grow as many units of largest ``|G|`` among those not kept, where
``G`` is the dense-candidate gradient of the update step's minibatch. ``|G|``'s top-k comes from
the layer's fused backward (a :class:`~sparsekern.nn.request.GrowRequest` armed before that
step's forward); no dense gradient is formed.
"""
from __future__ import annotations

from .base import _UNSET, DropAndGrow


class RigLSchedule(DropAndGrow):
    """Drop-and-grow on RigL's schedule and defaults (every ``delta_t`` steps until
    ``t_end·T``, cosine drop fraction from ``alpha``, optimizer step skipped on update steps);
    subclasses say how units grow (RigL, SET)."""

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, delta_t: int = 100, alpha: float = 0.3,
                 t_end: float = 0.75, skip_optimizer_step_on_update: bool = True, **kw):
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, delta_t=delta_t, alpha=alpha, t_end=t_end,
                         skip_optimizer_step_on_update=skip_optimizer_step_on_update, **kw)


class RigL(RigLSchedule):
    """RigL.

    Args:
        model, optimizer, total_steps, sparsity, distribution, delta_t, t_end, block_size,
            layout, exclude, seed, dp_growth: see :class:`~sparsekern.dst.DSTMethod`.
        alpha: initial drop fraction (0.3).
        skip_optimizer_step_on_update: skip the optimizer step on update steps (True, as the
            official code).

    Example::

        m = dst.RigL(model, opt, total_steps=T, sparsity=0.9, delta_t=100)
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            m.step()
            opt.zero_grad()
    """

    grows_by_gradient = True
