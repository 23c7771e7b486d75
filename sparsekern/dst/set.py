"""SET (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
sparse connectivity inspired by network science").

As RigL (same schedule and cosine drop fraction), but the grown units are drawn uniformly at
random (exact count, seeded by ``(seed, step, layer)``) among the units not kept.
"""
from __future__ import annotations

from .rigl import RigLSchedule


class SET(RigLSchedule):
    """SET: magnitude drop, random growth.

    Args: as :class:`~sparsekern.dst.RigL` (``skip_optimizer_step_on_update`` defaults to
    True as there, so that SET and RigL runs differ only in how they grow).
    """

    grows_by_gradient = False
