"""MEST (Yuan et al. 2021, "MEST: Accurate and Fast Memory-Economic Sparse Training Framework
on the Edge").

Every ``update_every`` steps until ``t_end·T``: prune to a lower bound by
``|W| + γ·|G_active|`` (``G_active`` is the ordinary weight gradient on the active entries) and
grow uniformly at random back to an upper bound. The bounds close a gap to the target:

* ``mode="EM"`` (elastic mutation): prune ``gap`` below the target, regrow to the target;
* ``mode="EM&S"`` (with soft memory bound): prune to the target, grow ``gap`` above it, so the
  model holds more than the target between prunes.

[ours] ``gap`` is in overall density points (0.02: prune 2% of all weights below the target),
spread over layers in proportion to their target counts (a layer gives up the fraction
``gap / overall density`` of its target). The gap follows a step schedule over ``n_stages``
equal stages of ``[0, t_end·T)``: ``gap · (1 − stage/(n_stages − 1))``, so the last stage has gap 0
(EM then changes nothing, EM&S prunes back to the target).
"""
from __future__ import annotations

from .base import _UNSET, DropAndGrow, LayerState

MODES = ("EM", "EM&S")


class MEST(DropAndGrow):
    """MEST.

    Args:
        update_every: steps between updates (500; the paper: 5 epochs, see
            :func:`~sparsekern.dst.epochs_to_steps`).
        gap: density points pruned below (EM) / grown above (EM&S) the target (0.02).
        gamma: weight of ``|G_active|`` in the prune score (0).
        mode: ``"EM"`` or ``"EM&S"`` (the latter needs ``layout="dense"``: the bsr parameter has
            a fixed number of blocks).
        n_stages: stages of the gap schedule (4).
        others: see :class:`~sparsekern.dst.DSTMethod`.
    """

    grows_by_gradient = False

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, update_every: int = 500, gap: float = 0.02,
                 gamma: float = 0.0, mode: str = "EM", n_stages: int = 4, t_end: float = 0.75,
                 **kw):
        if mode not in MODES:
            raise ValueError(f"MEST: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(gap, (int, float)) or not 0 <= gap < 1:
            raise ValueError(f"MEST: gap must be in [0, 1), got {gap!r}")
        if not isinstance(gamma, (int, float)) or gamma < 0:
            raise ValueError(f"MEST: gamma must be >= 0, got {gamma!r}")
        if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
            raise ValueError(f"MEST: n_stages must be a positive int, got {n_stages!r}")
        kw.pop("delta_t", None)
        self.gap, self.gamma, self.mode, self.n_stages = float(gap), float(gamma), mode, n_stages
        self.update_every = update_every
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, delta_t=update_every, t_end=t_end, **kw)

    def _setup(self) -> None:
        bsr = [ls.name for ls in self.layers if getattr(ls.module, "layout", "dense") != "dense"]
        if bsr and self.mode == "EM&S":
            raise ValueError(f"MEST: mode='EM&S' changes the number of active blocks, which "
                             f"layout='bsr' cannot (layers {bsr}); use layout='dense'")
        if bsr and self.gamma:
            raise ValueError(f"MEST: gamma > 0 scores the active gradient on the dense weight "
                             f"view; layers {bsr} use layout='bsr' (use gamma=0 or 'dense')")
        units = sum(ls.n_units for ls in self.layers)
        target = sum(ls.n_target for ls in self.layers)
        self.overall_density = target / units if units else 0.0

    def gap_at(self, t: int) -> float:
        """The scheduled gap (density points) at step ``t``."""
        if self.n_stages == 1:
            return self.gap
        stage = min(self.n_stages - 1, int(self.n_stages * t / (self.t_end * self.total_steps)))
        return self.gap * (1 - stage / (self.n_stages - 1))

    def bounds(self, ls: LayerState, t: int) -> tuple[int, int]:
        """``(lower, upper)`` active-unit counts of ``ls`` at update ``t``."""
        frac = self.gap_at(t) / self.overall_density if self.overall_density else 0.0
        n_gap = round(frac * ls.n_target)
        if self.mode == "EM":
            return max(0, ls.n_target - n_gap), ls.n_target
        return ls.n_target, min(ls.n_units, ls.n_target + n_gap)

    def plan(self, ls: LayerState, t: int, n_active: int) -> tuple[int, int]:
        lower, upper = self.bounds(ls, t)
        lower = min(lower, n_active)
        return lower, upper - lower

    def drop_scores(self, ls: LayerState):
        s = ls.magnitude()
        g = ls.module.weight.grad
        if self.gamma and g is not None:
            g2 = (g.detach() * ls.module.mask).flatten(1)
            s = s + self.gamma * ls.reduce(g2.to(s.dtype))
        return s
