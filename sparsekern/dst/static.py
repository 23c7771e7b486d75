"""Static sparse training: the initial mask never changes (the baseline)."""
from __future__ import annotations

from .base import _UNSET, DSTMethod


class Static(DSTMethod):
    """The initial masks stay; ``step()`` only steps the optimizer (and keeps the metrics).
    ``delta_t`` is rejected: there are no updates to space."""

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, **kw):
        if kw.get("delta_t") is not None:
            raise ValueError(f"Static: delta_t={kw['delta_t']!r} has no meaning (the mask never "
                             "changes); leave it unset")
        kw.pop("delta_t", None)
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, **kw)

    def is_update_step(self, t: int) -> bool:
        return False
