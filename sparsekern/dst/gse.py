"""GSE (Heddes et al., "Always-Sparse Training by Growing Connections with Guided Stochastic
Exploration"): growth without the dense gradient, so an update costs O(|A|) like a training step.

Every ``delta_t`` steps until ``t_end·T``, per layer (the paper's Algorithm 2):

1. draw a subset ``S`` of ``⌈γ·|A|⌉`` distinct inactive units without replacement from
   ``p(i, j) ∝ u_i·v_j`` (``sampler``: ``"uniform"`` ``u = v = 1``; ``"grabo"`` the gradient
   bound ``u_i = Σ_r |Δ_ri|``, ``v_j = Σ_r |X_rj|``; ``"graest"`` the AMS sketch
   ``u_i = |Σ_r s_r Δ_ri|``, ``v_j = |Σ_r s_r X_rj|`` with fresh random signs ``s_r``), where
   ``X``/``Δ`` are the layer's inputs (conv: im2col rows) and output gradients of the update
   step's own forward/backward, recorded by hooks that exist on that step only;
2. compute ``G`` on ``S`` only, by the pattern SDDMM (``ops.sddmm`` / ``ops.conv2d_sddmm``:
   cost ∝ ``|S|·R``; the dense-candidate top-k ops are never called);
3. grow the ``k = min(⌈α_t·|A|⌉, |S|)`` units of ``S`` with the largest ``|G|`` (weight 0, zero
   optimizer state) and drop the ``k`` active units of smallest ``|W|``.

A layer at density ``>= dense_fallback`` (0.5, the official code's) samples every inactive unit.

[ours] Block masks: a unit is a block; ``u``/``v`` of a block row/column are the sums of its
rows'/columns' factors (GraBo stays an upper bound of the block's summed ``|G|``) and ``|G|`` is
the block mean, as everywhere. Grouped convolutions: ``v_j`` sums the per-group factors (a
looser bound). ``ε = 1e-6 × mean`` is added to ``u`` and ``v`` (1 if all are 0). The drop
fraction of the ``k``-th update is ``α_{(k−1)ΔT}`` as for RigL. Sampling is successive
draws from the factorised distribution (inverse CDF per factor) with active and repeated
draws rejected, which is sampling without replacement from ``p`` restricted to inactive units;
after 64 rounds the rest is drawn exactly over all remaining inactive units.
Under data parallelism ``u``, ``v`` (GraEst: the signed sketches) and ``G_S`` are summed over
ranks and every draw is seeded by ``(seed, step, layer)``, so every rank picks the same units.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..reference import acc_dtype, stable_topk
from ..topology import build_topology, expand_blocks, topology_from_block_mask
from . import distributed as dp
from .base import _UNSET, DSTMethod, LayerState, topk_units

SAMPLERS = ("uniform", "grabo", "graest")
SIGN_SALT, SAMPLE_SALT = 3, 4
MAX_ROUNDS = 64


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sample_factorised(u: Tensor, v: Tensor, taken: Tensor, n: int,
                      gen: torch.Generator) -> Tensor:
    """``n`` distinct flat indices of an ``[len(u), len(v)]`` grid drawn without replacement from
    ``p(i, j) ∝ u_i·v_j`` over the cells where ``taken`` (bool, flat) is False; sorted.

    Draws i.i.d. row and column indices in rounds (inverse CDF of each factor) and keeps first
    occurrences of cells not yet taken (successive sampling); ``taken`` is updated in place."""
    n_cols = v.numel()
    cu, cv = u.cumsum(0), v.cumsum(0)
    chosen = []
    need = n
    for _ in range(MAX_ROUNDS):
        if need <= 0:
            break
        m = need + need // 4 + 16
        rows = torch.searchsorted(cu, torch.rand(m, generator=gen, dtype=cu.dtype) * cu[-1],
                                  right=True).clamp_(max=u.numel() - 1)
        cols = torch.searchsorted(cv, torch.rand(m, generator=gen, dtype=cv.dtype) * cv[-1],
                                  right=True).clamp_(max=n_cols - 1)
        flat = rows * n_cols + cols
        _, inv = torch.unique(flat, return_inverse=True)
        first = torch.full((int(inv.max()) + 1,), m, dtype=torch.int64)
        first.scatter_reduce_(0, inv, torch.arange(m), "amin")
        keep = first[inv] == torch.arange(m)  # first occurrence, in draw order
        cand = flat[keep]
        cand = cand[~taken[cand]][:need]
        taken[cand] = True
        chosen.append(cand)
        need -= cand.numel()
    if need > 0:  # the distribution sits on taken cells: draw the rest exactly
        w = torch.outer(u, v).flatten()
        w[taken] = 0
        rest = torch.multinomial(w, need, replacement=False, generator=gen)
        taken[rest] = True
        chosen.append(rest)
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.int64)


def _block_sum(t: Tensor, size: int) -> Tensor:
    """Sums of consecutive groups of ``size`` entries of a 1-D tensor (ragged tail included)."""
    if size == 1:
        return t
    pad = (-t.numel()) % size
    return torch.cat([t, t.new_zeros(pad)]).view(-1, size).sum(1)


class GSE(DSTMethod):
    """GSE: grow the largest ``|G|`` of a sampled subset of inactive units.

    Args:
        sampler: ``"uniform"``, ``"grabo"`` or ``"graest"`` (the subset's distribution; not the
            layer-density ``distribution``).
        gamma: subset factor ``γ``: ``|S| = ⌈γ·|A|⌉`` (1.0).
        alpha: initial drop fraction (0.2, the paper's).
        delta_t: steps between updates (1000, the paper's).
        t_end: updates stop at ``t >= t_end·T`` (0.6, the paper's).
        dense_fallback: at this layer density or above ``S`` is every inactive unit (0.5).
        skip_optimizer_step_on_update: skip the optimizer step on update steps (True, as
            Algorithm 2).
        others: see :class:`~sparsekern.dst.DSTMethod` (``dp_growth`` is not used).

    After an update ``last_subsets[layer_name]`` holds ``subset`` (sorted flat unit indices),
    ``scores`` (``|G|`` on them, block mean for blocks) and ``grown``.
    """

    update_before_optimizer = True

    def __init__(self, model, optimizer, *, total_steps: int, sparsity=_UNSET,
                 distribution=_UNSET, delta_t: int = 1000, alpha: float = 0.2,
                 t_end: float = 0.6, sampler: str = "uniform", gamma: float = 1.0,
                 dense_fallback: float = 0.5, skip_optimizer_step_on_update: bool = True, **kw):
        if sampler not in SAMPLERS:
            raise ValueError(f"GSE: sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not _finite(alpha) or not 0 <= alpha <= 1:
            raise ValueError(f"GSE: alpha must be in [0, 1], got {alpha!r}")
        if not _finite(gamma) or gamma <= 0:
            raise ValueError(f"GSE: gamma must be a finite number > 0, got {gamma!r}")
        if not _finite(dense_fallback) or not 0 < dense_fallback <= 1:
            raise ValueError(f"GSE: dense_fallback must be in (0, 1], got {dense_fallback!r}")
        self.sampler, self.alpha, self.gamma = sampler, float(alpha), float(gamma)
        self.dense_fallback = float(dense_fallback)
        self._hooks: Optional[dp.Capture] = None
        self.last_subsets: dict = {}
        self._subset_density: dict = {}
        super().__init__(model, optimizer, total_steps=total_steps, sparsity=sparsity,
                         distribution=distribution, delta_t=delta_t, t_end=t_end,
                         skip_optimizer_step_on_update=skip_optimizer_step_on_update, **kw)

    # ------------------------------------------------------------------ schedule
    def drop_fraction(self, t: int) -> float:
        """``α/2·(1 + cos(π·t/(t_end·T)))``."""
        return self.alpha / 2 * (1 + math.cos(math.pi * t / (self.t_end * self.total_steps)))

    def n_swap(self, t: int, n_active: int) -> int:
        """``⌈α·|A|⌉`` with ``α`` of the previous update's step (``t − ΔT``, as RigL's code)."""
        return math.ceil(self.drop_fraction(t - self.delta_t) * n_active - 1e-9)

    def subset_size(self, ls: LayerState, n_active: int) -> int:
        """``⌈γ·|A|⌉``, or every inactive unit at density ``>= dense_fallback``."""
        n_inactive = ls.n_units - n_active
        if n_active >= self.dense_fallback * ls.n_units:
            return n_inactive
        return min(n_inactive, math.ceil(self.gamma * n_active - 1e-9))

    # ------------------------------------------------------------------ hooks
    def _drop_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def _arm(self, t: int) -> None:
        self._drop_hooks()
        if not self.is_update_step(t):
            return
        layers = [ls for ls in self.layers if ls.updatable]
        if layers:
            self._hooks = dp.Capture(layers)

    # ------------------------------------------------------------------ operands
    def _operands(self, ls: LayerState, x: Tensor, dy: Tensor):
        """``(x, dy, conv)`` in the form the SDDMM takes (conv: padded input and its args)."""
        mod = ls.module
        if mod.mask.dim() == 2:
            k, m = ls.shape2d[1], ls.shape2d[0]
            return x.reshape(-1, k).contiguous(), dy.reshape(-1, m).contiguous(), None
        x, stride, pad, dil, groups = dp._conv_args(mod, x)
        if dy.dim() == 3:
            dy = dy.unsqueeze(0)
        return x.contiguous(), dy.contiguous(), (list(stride), list(pad), list(dil), groups)

    def factors(self, ls: LayerState, t: int, x: Tensor, dy: Tensor, conv) -> tuple[Tensor, Tensor]:
        """``(u, v)`` of the sampler on the unit grid's rows and columns (float64, CPU, > 0)."""
        (nr, nc), (br, bc) = ls.ever.shape, ls.block_size
        if self.sampler == "uniform":
            return torch.ones(nr, dtype=torch.float64), torch.ones(nc, dtype=torch.float64)
        acc = acc_dtype(x.dtype)
        rank = dp.world()[0]
        signed = self.sampler == "graest"
        if conv is None:
            if signed:
                gen = self.generator(t, ls.index, SIGN_SALT + 16 * rank)
                s = (torch.randint(0, 2, (x.shape[0],), generator=gen) * 2 - 1).to(x.device, acc)
                u, v = s @ dy.to(acc), s @ x.to(acc)
            else:
                u, v = dy.abs().to(acc).sum(0), x.abs().to(acc).sum(0)
            v = v[None]
        else:
            stride, pad, dil, groups = conv
            n, _, oh, ow = dy.shape
            if signed:
                gen = self.generator(t, ls.index, SIGN_SALT + 16 * rank)
                s = (torch.randint(0, 2, (n, 1, oh, ow), generator=gen) * 2 - 1).to(x.device, acc)
                u = (dy.to(acc) * s).sum((0, 2, 3))
                xin, d = x.to(acc), s.expand(n, groups, oh, ow)
            else:
                u = dy.abs().to(acc).sum((0, 2, 3))
                xin, d = x.abs().to(acc), torch.ones(n, groups, oh, ow, dtype=acc, device=x.device)
            shape = [groups, ls.module.mask.shape[1], *ls.module.mask.shape[2:]]
            v = torch.nn.grad.conv2d_weight(xin, shape, d.contiguous(), stride, pad, dil,
                                            groups).flatten(1)
        if dp.is_distributed():
            dp.all_reduce_mean_(u)
            dp.all_reduce_mean_(v)
        u, v = u.abs().double().cpu(), v.abs().sum(0).double().cpu()
        out = []
        for f, size in ((u, br), (v, bc)):
            f = _block_sum(torch.nan_to_num(f, nan=0.0, posinf=1e300), size)
            mean = float(f.mean()) if f.numel() else 0.0
            out.append(f + (1e-6 * mean if mean > 0 else 1.0))
        return out[0], out[1]

    # ------------------------------------------------------------------ subset and its gradient
    def sample_subset(self, ls: LayerState, t: int, unit: Tensor, n_active: int, x: Tensor,
                      dy: Tensor, conv) -> Tensor:
        """Sorted flat unit indices of ``S``."""
        n_s = self.subset_size(ls, n_active)
        if n_s >= ls.n_units - n_active:
            return (~unit.flatten()).nonzero().flatten().cpu()
        u, v = self.factors(ls, t, x, dy, conv)
        taken = unit.flatten().cpu().clone()
        return sample_factorised(u, v, taken, n_s, self.generator(t, ls.index, SAMPLE_SALT))

    def subset_grad(self, ls: LayerState, subset: Tensor, x: Tensor, dy: Tensor,
                    conv) -> Tensor:
        """Signed ``G`` on the subset's entries, ``[|S|, br, bc]`` (zero outside the matrix),
        from the pattern SDDMM."""
        mod = ls.module
        br, bc = ls.block_size
        sel = torch.zeros(ls.n_units, dtype=torch.bool)
        sel[subset] = True
        sel = sel.view(ls.ever.shape).to(mod.mask.device)
        if ls.blocked:
            topo = topology_from_block_mask(sel, ls.shape2d, ls.block_size)
            pattern = expand_blocks(sel, ls.block_size, ls.shape2d)
        else:
            pattern = sel
            topo = build_topology(pattern)
        pattern = pattern.reshape(mod.mask.shape).contiguous()
        if conv is None:
            return ops.sddmm(dy, x, pattern, topo.tensors, br, bc)
        return ops.conv2d_sddmm(dy, x, pattern, topo.tensors, br, bc, *conv)

    def _unit_scores(self, ls: LayerState, subset: Tensor, vals: Tensor) -> Tensor:
        """``|G|`` per subset unit (block mean by the block's true size)."""
        a = vals.abs().to(acc_dtype(vals.dtype)).sum((1, 2))
        if ls.blocked:
            (m, k), (br, bc), nbc = ls.shape2d, ls.block_size, ls.ever.shape[1]
            s = subset.to(a.device)
            rows = torch.clamp(m - (s // nbc) * br, max=br)
            cols = torch.clamp(k - (s % nbc) * bc, max=bc)
            a = a / (rows * cols).to(a.dtype)
        return a

    # ------------------------------------------------------------------ update
    def _update(self, t: int) -> None:
        hooks = self._hooks
        self.last_subsets = {}
        try:
            for ls in self.layers:
                if not ls.updatable:
                    continue
                if hooks is None:
                    raise RuntimeError(f"{self.name}: no hooks were armed for update step {t}")
                x, dy = hooks.tensors(ls.index, self.name)
                self._update_layer(ls, t, *self._operands(ls, x, dy))
        finally:
            self._drop_hooks()

    @torch.no_grad()
    def _update_layer(self, ls: LayerState, t: int, x: Tensor, dy: Tensor, conv) -> None:
        unit = ls.unit_mask()
        n_active = int(unit.sum())
        subset = self.sample_subset(ls, t, unit, n_active, x, dy, conv)
        self._subset_density[ls.index] = subset.numel() / ls.n_units
        k = min(self.n_swap(t, n_active), subset.numel(), n_active)
        if k <= 0 or subset.numel() == 0:
            self._record_unchanged(ls)
            return
        vals = self.subset_grad(ls, subset, x, dy, conv)
        if dp.is_distributed():
            dp.all_reduce_mean_(vals)
        scores = self._unit_scores(ls, subset, vals)
        pos, _ = stable_topk(scores, k)
        grown_idx = subset.to(pos.device)[pos]
        kept = topk_units(ls.magnitude(), unit, n_active - k)
        grown = torch.zeros_like(unit)
        grown.view(-1)[grown_idx.to(unit.device)] = True
        self.last_subsets[ls.name] = {"subset": subset, "scores": scores.cpu(),
                                      "grown": grown_idx.sort().values.cpu()}
        self._install(ls, kept | grown, grown=grown, n_dropped=k)

    def _step_cost(self, ls: LayerState, due: bool) -> float:
        """A training step plus, on update steps, the SDDMM over ``S``."""
        extra = self._subset_density.pop(ls.index, 0.0) if due else 0.0
        return 3.0 * ls.density + extra

    def _after_load(self) -> None:
        self._arm(self._t + 1)
