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

import math

from .base import _UNSET, DropAndGrow, LayerState, _period

MODES = ("EM", "EM&S")


def _check_schedule(schedule):
    if schedule is None:
        return None
    try:
        pairs = [(float(u), float(g)) for u, g in schedule]
    except (TypeError, ValueError):
        raise ValueError(f"MEST: gap_schedule must be a list of (until, gap) pairs, got "
                         f"{schedule!r}") from None
    ends = [u for u, _ in pairs]
    if not pairs or ends != sorted(ends) or len(set(ends)) != len(ends) or \
            not all(0 < u <= 1 and 0 <= g < 1 for u, g in pairs):
        raise ValueError(f"MEST: gap_schedule needs increasing until in (0, 1] and gaps in "
                         f"[0, 1), got {schedule!r}")
    return pairs


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
        gap_schedule: instead of ``gap``/``n_stages``, a list of ``(until, gap)`` pairs with
            ``until`` a fraction of ``T`` (increasing): the gap is the first pair's whose
            ``until·T`` is above ``t``, 0 after the last. The official scripts' schedule (2%
            until epoch 90 of 160, smaller until 120, then 0) is e.g.
            ``[(90/160, 0.02), (120/160, 0.01)]``.
        others: see :class:`~sparsekern.dst.DSTMethod`.
    """

    grows_by_gradient = False

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, update_every=None, gap: float = 0.02,
                 gamma: float = 0.0, mode: str = "EM", n_stages: int = 4, t_end: float = 0.75,
                 gap_schedule=None, **kw):
        if mode not in MODES:
            raise ValueError(f"MEST: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(gap, (int, float)) or not 0 <= gap < 1:
            raise ValueError(f"MEST: gap must be in [0, 1), got {gap!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) \
                or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"MEST: gamma must be a finite number >= 0, got {gamma!r}")
        if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
            raise ValueError(f"MEST: n_stages must be a positive int, got {n_stages!r}")
        update_every = _period("MEST", "update_every", update_every, kw.pop("delta_t", None), 500)
        self.gap_schedule = _check_schedule(gap_schedule)
        self.gap, self.gamma, self.mode, self.n_stages = float(gap), float(gamma), mode, n_stages
        self.update_every = update_every
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, delta_t=update_every, t_end=t_end, **kw)

    def _setup(self) -> None:
        bsr = [ls.name for ls in self.layers if getattr(ls.module, "layout", "dense") != "dense"]
        if bsr and self.mode == "EM&S":
            raise ValueError(f"MEST: mode='EM&S' changes the number of active blocks, which "
                             f"layout='bsr' cannot (layers {bsr}); use layout='dense'")
        units = sum(ls.n_units for ls in self.layers)
        target = sum(ls.n_target for ls in self.layers)
        self.overall_density = target / units if units else 0.0

    def gap_at(self, t: int) -> float:
        """The scheduled gap (density points) at step ``t``."""
        if self.gap_schedule is not None:
            for until, gap in self.gap_schedule:
                if t < until * self.total_steps:
                    return gap
            return 0.0
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
            if ls.bsr:  # from the stored blocks' gradient, as the magnitude
                s = s + self.gamma * ls.module.unit_magnitude(g).to(s.dtype)
            else:
                g2 = (g.detach() * ls.module.mask).flatten(1)
                s = s + self.gamma * ls.reduce(g2.to(s.dtype))
        return s
