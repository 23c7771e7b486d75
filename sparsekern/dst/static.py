"""Static sparse training: the initial mask never changes (the baseline)."""
from __future__ import annotations

from .base import _UNSET, DSTMethod


class Static(DSTMethod):
    """The initial masks stay; ``step()`` only steps the optimizer (and keeps the metrics)."""

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, **kw):
        kw.pop("delta_t", None)
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, **kw)

    def is_update_step(self, t: int) -> bool:
        return False
