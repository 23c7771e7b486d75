"""BiDST (Ji et al. 2024, "Advancing Dynamic Sparse Training by Exploring Optimization
Opportunities"): bi-level optimisation of weights and mask scores.

Mask scores ``ψ`` (``layer.scores``, an ``nn.Parameter`` of the weight's shape) are trained with
the weights. A candidate set ``C = M ∪ E`` (``E``: ``round(S·N)`` extra inactive units) is armed on
each layer; every backward fills ``ψ.grad`` with ``dψ = G⊙W − λ·φ(G)`` on ``C`` and 0 elsewhere
from one SDDMM over ``C`` (cost ∝ |C|). ``ψ`` takes an SGD step with the weights' current
learning rate every step. Every ``refresh_every`` steps until ``t_end·T`` the mask becomes the
per-layer top-``n_active`` of ``ψ + τ·Gumbel`` over ``C``: the mask changes only then.

[ours] ``E`` is redrawn at every refresh, uniformly at random among inactive units; ``ψ`` starts
at ``|W|``; weights of ``E`` are dormant (kept, not trained, not in the forward) and keep their
value when they become active again (0 if never active; with ``layout="bsr"`` there are no
dormant values, new blocks start at 0); block masks score a block by the mean of ``ψ`` (signed)
over it; ``φ``/``λ`` defaults come from the planted-topology benchmark
(``benchmarks/dst_planted.py``, ``sparsekern/dst/README.md``).
Under data parallelism ``ψ.grad`` is averaged over ranks like the weights' gradients.

Memory: ``ψ``, its gradient and the candidate mask are weight-shaped (``M·K`` entries) for
``layout="bsr"`` too, so BiDST does not keep a ``bsr`` layer's memory proportional to its density
(RigL, SET, DST-EE, MEST and GSE do: they work on the block grid and the stored blocks).
"""
from __future__ import annotations

import math

import torch

from ..nn.request import CandidateRequest
from .._util import PHI_CHOICES
from . import distributed as dp
from .base import _UNSET, DSTMethod, _period, LayerState, random_units, topk_units

GUMBEL_SALT, SEARCH_SALT = 1, 2
PHI_FORMS = PHI_CHOICES + ("eq9",)


class BiDST(DSTMethod):
    """BiDST.

    Args:
        lam: ``λ``, the multiplier of ``φ(G)`` in ``dψ`` (1e3, [ours]; for ``phi="eq9"``
            the paper's ``λ``, ``dψ = W⊙G − G/λ``, its Table A.1: 1e-4). ``λ·|G|`` competes
            with ``ψ ≈ |W|`` over a refresh period, so its scale depends on the learning rate
            and the gradient's size: 1e3 was chosen on the planted-topology benchmark (Adam,
            lr 3e-3); tune it where those differ.
        search_space: ``S``, the extra candidates as a fraction of all units (0.05; the paper:
            0.05 at 90% sparsity, 0.03 at 95%, 0.02 at 98%).
        refresh_every: steps between mask refreshes (1000; the paper: 8 epochs on CIFAR, 5 on
            ImageNet, see :func:`~sparsekern.dst.epochs_to_steps`). ``delta_t`` is accepted as
            its alias (both given and different: ``ValueError``).
        tau: Gumbel noise temperature of the refresh (``0``: exact top-k of ``ψ``).
        phi: ``"abs"`` (``|G|`` on all of ``C``: search-space units gain score while their
            weights are 0; default, [ours]), ``"sq_active"`` (``M⊙G²``: a never-active unit's
            ψ stays 0, so it never enters the mask), ``"signed"`` (``G``) or ``"eq9"`` (the
            paper's eq. 9 as written, ``dψ = W⊙G − G/λ``).
        t_end: refreshes stop at ``t >= t_end·T`` (0.75; [ours]).
        others: see :class:`~sparsekern.dst.DSTMethod`.
    """

    update_before_optimizer = False

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, lam: float = 1e3, search_space: float = 0.05,
                 refresh_every=None, tau: float = 0.0, phi: str = "abs",
                 t_end: float = 0.75, **kw):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) \
                or not math.isfinite(lam) or lam < 0 or (phi == "eq9" and lam == 0):
            raise ValueError(f"BiDST: lam must be a finite number >= 0 (> 0 for phi='eq9'), "
                             f"got {lam!r}")
        if not isinstance(search_space, (int, float)) or not 0 <= search_space <= 1:
            raise ValueError(f"BiDST: search_space must be in [0, 1], got {search_space!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) \
                or not math.isfinite(tau) or tau < 0:
            raise ValueError(f"BiDST: tau must be a finite number >= 0, got {tau!r}")
        if phi not in PHI_FORMS:
            raise ValueError(f"BiDST: phi must be one of {PHI_FORMS}, got {phi!r}")
        refresh_every = _period("BiDST", "refresh_every", refresh_every, kw.pop("delta_t", None),
                                1000)
        kw.pop("skip_optimizer_step_on_update", None)
        self.lam, self.search_space, self.tau, self.phi = float(lam), float(search_space), \
            float(tau), phi
        self.refresh_every = refresh_every
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, delta_t=refresh_every, t_end=t_end, **kw)

    # ------------------------------------------------------------------ candidate sets
    def _setup(self) -> None:
        for ls in self.layers:
            if not ls.updatable:
                continue
            if ls.module.weight.dtype not in (torch.float32, torch.float64, torch.float16,
                                              torch.bfloat16):
                raise TypeError(f"BiDST: layer {ls.name!r} has a non-float weight")
            ls.module.enable_scores()
            held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            if id(ls.module.scores) in held:
                raise ValueError(f"BiDST: the optimizer holds layer {ls.name!r}'s mask scores; "
                                 "BiDST steps them itself (build the optimizer before BiDST)")
            self._draw_search_space(ls, 0)

    def n_search(self, ls: LayerState) -> int:
        return round(self.search_space * ls.n_units)

    def _draw_search_space(self, ls: LayerState, t: int) -> None:
        unit = ls.unit_mask()
        inactive = ~unit
        k = min(self.n_search(ls), int(inactive.sum()))
        ls.extra["search"] = random_units(inactive, k, self.generator(t, ls.index, SEARCH_SALT))
        self._arm_candidates(ls)
        c = ls.to_mask(self.candidates(ls))
        ls.extra["candidate_density"] = float(c.float().mean()) if c.numel() else 0.0

    def candidates(self, ls: LayerState) -> torch.Tensor:
        """``C = M ∪ E`` on the unit grid."""
        return ls.unit_mask() | ls.extra["search"]

    def _arm_candidates(self, ls: LayerState) -> None:
        c = ls.to_mask(self.candidates(ls)).flatten(1)
        ls.module.set_candidates(CandidateRequest(candidates=c, **self.psi_form()))

    def psi_form(self) -> dict:
        """``lam``/``phi`` of the layers' request: ``"eq9"`` (the paper's eq. 9 as written,
        ``dψ = W⊙G − G/λ``) is the ``"signed"`` form with multiplier ``1/λ``."""
        if self.phi == "eq9":
            return {"lam": 1.0 / self.lam, "phi": "signed"}
        return {"lam": self.lam, "phi": self.phi}

    def _after_load(self) -> None:
        for ls in self.layers:
            if ls.updatable:
                self._arm_candidates(ls)

    def _layer_extra_state(self, ls: LayerState) -> dict:
        out = super()._layer_extra_state(ls)
        if ls.updatable:
            out["scores"] = ls.module.scores.detach().clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for ls in self.layers:
                scores = ls.extra.pop("scores", None)
                if scores is not None:
                    ls.module.scores.copy_(scores)

    # ------------------------------------------------------------------ every step: ψ
    @torch.no_grad()
    def _before_optimizer(self, t: int) -> None:
        for ls in self.layers:
            if not ls.updatable:
                continue
            psi = ls.module.scores
            g = psi.grad
            if g is None:
                continue
            if dp.is_distributed():
                dp.all_reduce_mean_(g)
            psi.sub_(g.to(psi.dtype), alpha=self.lr_of(ls.module.weight))
            psi.grad = None

    # ------------------------------------------------------------------ refresh
    def refresh_scores(self, ls: LayerState, t: int) -> torch.Tensor:
        """``ψ`` per unit (block mean, signed) plus ``τ·Gumbel`` noise."""
        psi = ls.module.scores.detach().flatten(1)
        s = ls.reduce(psi.to(torch.float64 if psi.dtype == torch.float64 else torch.float32),
                      absolute=False)
        if self.tau:
            u = torch.rand(s.shape, generator=self.generator(t, ls.index, GUMBEL_SALT),
                           dtype=torch.float64)
            u = u.clamp_(1e-20, 1 - 1e-16)
            s = s + (self.tau * -torch.log(-torch.log(u))).to(s.dtype).to(s.device)
        return s

    def _update(self, t: int) -> None:
        for ls in self.layers:
            if not ls.updatable:
                continue
            unit = ls.unit_mask()
            new = topk_units(self.refresh_scores(ls, t), self.candidates(ls), int(unit.sum()))
            if torch.equal(new, unit):
                self._record_unchanged(ls)
            else:
                self._install(ls, new, keep_dormant=True)
            self._draw_search_space(ls, t)

    def _step_cost(self, ls: LayerState, due: bool) -> float:
        if not ls.updatable:
            return 3.0 * ls.density
        return 2.0 * ls.density + ls.extra["candidate_density"]
