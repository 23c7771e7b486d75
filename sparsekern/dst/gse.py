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
draws from the factorised distribution with active and repeated draws rejected, which is
sampling without replacement from ``p`` restricted to inactive units (see
:func:`sample_factorised`; small grids and stalled rounds draw exactly by Gumbel top-k).

Cost: an update touches ``O(|A| + |S| + n_in + n_out)`` entries besides the SDDMM — the
active units are read off the layer's topology, the subset's topology is built from its sorted
indices, grow and drop pick by one order statistic (:func:`top_positions`), and for element
masks on a dense weight the resets (weight, gradient, optimizer state) and metrics are indexed
by the grown units and the new mask's topology is built from its sorted active list
(``set_mask(units=...)``) — except a few flat passes over the mask (its copy and the checks).
Under data parallelism ``u``, ``v`` (GraEst: the signed sketches) and ``G_S`` are summed over
ranks and every draw is seeded by ``(seed, step, layer)``, so every rank picks the same units.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .._util import acc_dtype, stable_topk
from ..topology import index_tensors
from . import distributed as dp
from .base import _UNSET, DSTMethod, LayerState

SAMPLERS = ("uniform", "grabo", "graest")
SIGN_SALT, SAMPLE_SALT = 3, 4
MAX_ROUNDS = 64
MIN_DRAWS = 256  # a round draws at least this many cells (tail rounds need few)
STALL = 0.05  # a round whose draws are fewer new cells hands the rest to the exact draw
EXACT_CELLS = 1 << 16  # grids this small are drawn exactly in one call


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sample_factorised(u: Tensor, v: Tensor, taken: Tensor, n: int,
                      gen: torch.Generator) -> Tensor:
    """``n`` distinct flat indices of an ``[len(u), len(v)]`` grid drawn without replacement from
    ``p(i, j) ∝ u_i·v_j`` over the cells where ``taken`` (bool, flat) is False; sorted.

    Successive sampling in rounds: each round draws ``m`` i.i.d. cells in random order (uniform
    ``u`` and ``v``: one ``randint`` over the cells) and keeps the first ``need`` distinct cells
    not yet taken — exactly what successive draws with rejection reach, so the count never
    overshoots; ``m`` is ``need`` in the first round, then ``need`` over the previous round's
    rate of new cells (at least ``MIN_DRAWS``), so few rounds reach ``n``. Cost
    ``O(n_rows + n_cols + m log m)`` per round (:func:`_draws`, a sort to de-duplicate), no
    ``len(u)·len(v)`` temporary unless the grid is small (``<= EXACT_CELLS``) or ``p`` sits on
    taken cells (a round whose draws are under 5% new cells, or 64 rounds): then the rest is
    drawn exactly by Gumbel top-k over the cells not taken, which has the same law.
    ``taken`` is updated in place."""
    n_cols = v.numel()
    n_cells = u.numel() * n_cols
    idx = torch.int32 if n_cells < 2 ** 31 else torch.int64
    chosen = []
    need = n
    rounds = 0 if n_cells <= EXACT_CELLS else MAX_ROUNDS
    uniform = rounds > 0 and _constant(u) and _constant(v)
    rate = None
    for _ in range(rounds):
        if need <= 0:
            break
        m = need if rate is None else math.ceil(1.25 * need / max(rate, STALL))
        m = max(m, MIN_DRAWS)
        if uniform:  # uniform cells: one draw per cell instead of a row and a column
            flat = torch.randint(0, n_cells, (m,), generator=gen, dtype=idx)
        else:
            flat = (_draws(u, m, gen, False, idx) * n_cols).add_(_draws(v, m, gen, True, idx))
        flat = flat.masked_select(~taken.index_select(0, flat))
        if m > need and not uniform:  # only a prefix is kept: put the draws in random order
            flat = flat.index_select(0, torch.randperm(flat.numel(), generator=gen))
        new, n_new = _first_distinct(flat, need)
        taken.index_fill_(0, new.long(), True)
        chosen.append(new)
        need -= new.numel()
        rate = n_new / m
        if rate < STALL:
            break
    if need > 0:  # small grid, or the distribution sits on taken cells: draw the rest exactly
        keys = torch.outer(u, v).flatten().log_()  # Gumbel top-k: exact, any grid size
        keys -= torch.empty_like(keys).exponential_(generator=gen).log_()
        keys[taken] = -math.inf
        rest = keys.topk(need).indices.sort().values
        taken[rest] = True
        chosen.append(rest.to(idx))
    if not chosen:
        return torch.zeros(0, dtype=torch.int64)
    return _union_sorted(chosen).long()


def _constant(f: Tensor) -> bool:
    """Whether every entry of ``f`` equals the first (a uniform factor)."""
    return bool((f == f[0]).all())


def _sorted(idx: Tensor) -> Tensor:
    """``idx`` (``>= 0``) sorted, by an int32 sort when the values fit (twice as fast as int64);
    same dtype."""
    if idx.dtype == torch.int64 and idx.numel() and int(idx.max()) < 2 ** 31:
        return idx.to(torch.int32).sort().values.long()
    return idx.sort().values


def _union_sorted(pieces: list) -> Tensor:
    """The sorted union of disjoint index tensors of one dtype: the sorted rest is merged into
    the first (largest) piece by the ranks of its entries alone, ``O(n + |rest|·log n)``,
    instead of sorting everything."""
    first = pieces[0]
    if first.numel() > 1 and not bool((first[1:] > first[:-1]).all()):
        first = _sorted(first)
    if len(pieces) == 1:
        return first
    rest = _sorted(torch.cat(pieces[1:]))
    at = torch.searchsorted(first, rest) + torch.arange(rest.numel())
    out = first.new_empty(first.numel() + rest.numel())
    is_rest = torch.zeros(out.numel(), dtype=torch.bool).index_fill_(0, at, True)
    return out.masked_scatter_(~is_rest, first).index_copy_(0, at, rest)


def _first_distinct(seq: Tensor, limit: int) -> tuple[Tensor, int]:
    """The first ``limit`` distinct values of ``seq`` in order of first occurrence (all of them,
    sorted, when there are at most ``limit``; ``seq``'s dtype), and the number of distinct
    values."""
    if seq.numel() <= 1:
        return seq[:limit], seq.numel()
    vals, order = seq.sort(stable=True)
    first = torch.ones(vals.numel(), dtype=torch.bool)
    torch.ne(vals[1:], vals[:-1], out=first[1:])
    n_distinct = int(torch.count_nonzero(first))
    if n_distinct <= limit:
        return vals.masked_select(first), n_distinct
    return seq.index_select(0, _sorted(order.masked_select(first))[:limit]), n_distinct


def _draws(f: Tensor, m: int, gen: torch.Generator, shuffle: bool,
           dtype: torch.dtype = torch.int64) -> Tensor:
    """``m`` i.i.d. indices (``dtype``) with probability ``∝ f`` (float64, > 0), as a multiset:
    sorted unless ``shuffle`` (then in random order). Non-uniform ``f``: ``m`` sorted uniforms
    from normalised exponential spacings, located in the CDF by one ``searchsorted`` of the
    ``len(f)`` CDF values into them (``O(m + len(f)·log m)``, no per-draw binary search)."""
    n = f.numel()
    if _constant(f):
        return torch.randint(0, n, (m,), generator=gen, dtype=dtype)
    cdf = f.cumsum(0)
    u01 = torch.rand(m + 1, generator=gen, dtype=torch.float64).neg_().add_(1)  # (0, 1]
    spacing = u01.log_().neg_().cumsum(0)
    r = spacing[:m] * (float(cdf[-1]) / float(spacing[m]))
    ends = torch.searchsorted(r, cdf)
    ends[-1] = m
    out = torch.repeat_interleave(torch.arange(n, dtype=dtype),
                                  torch.diff(ends, prepend=ends.new_zeros(1)), output_size=m)
    return out.index_select(0, torch.randperm(m, generator=gen)) if shuffle else out


def top_positions(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """Sorted positions of the ``k`` largest (``largest=False``: smallest) ``scores`` of a 1-D
    tensor, with the tie rule of :func:`~sparsekern.reference.stable_topk` (largest: ties to the
    lower index, NaN highest; smallest: its complement, ties to the higher index).

    ``O(n)`` by one order statistic (:func:`kth_smallest`) and one pass over the ties, instead
    of a full stable sort."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    if bool(torch.isnan(scores.sum())):  # any NaN (or inf - inf: the exact path is right too)
        if not largest:
            keep = torch.ones(n, dtype=torch.bool, device=scores.device)
            keep[top_positions(scores, n - k)] = False
            return keep.nonzero().flatten()
        return stable_topk(scores, k)[0].sort().values
    if largest:
        thr = kth_smallest(scores, n - k + 1)
        pick = scores > thr
    else:
        thr = kth_smallest(scores, k)
        pick = scores < thr
    n_tie = k - int(torch.count_nonzero(pick))
    eq = scores == thr
    if n_tie == int(torch.count_nonzero(eq)):  # every tie is picked (always for distinct scores)
        return pick.logical_or_(eq).nonzero().flatten()
    tie = eq.nonzero().flatten()
    pick[tie[:n_tie] if largest else tie[tie.numel() - n_tie:]] = True
    return pick.nonzero().flatten()


KTH_SAMPLE = 2048  # inputs over 4x this bracket the order statistic from a strided sample


def kth_smallest(scores: Tensor, q: int) -> Tensor:
    """``torch.kthvalue(scores, q).values`` of a 1-D tensor without NaN (``1 <= q <= n``).

    Large inputs: a strided sample of ``KTH_SAMPLE`` values brackets the value, and
    ``kthvalue`` runs on the entries inside the bracket only (two compare passes instead of a
    selection over all ``n``); a bracket that misses falls back to the full ``kthvalue``, so
    the result is always exact and deterministic."""
    n = scores.numel()
    if n <= 4 * KTH_SAMPLE:
        return torch.kthvalue(scores, q).values
    samp = scores[::n // KTH_SAMPLE].sort().values
    m = samp.numel()
    pos, margin = (q - 0.5) * m / n, 4 * math.sqrt(m) + 8
    lo, hi = int(pos - margin), int(pos + margin)
    below = torch.zeros((), dtype=torch.int64)
    inside = torch.ones_like(scores, dtype=torch.bool)
    if lo > 0:
        inside = scores >= samp[lo]
        below = n - torch.count_nonzero(inside)
    if hi < m - 1:
        inside &= scores <= samp[hi]
    cand = scores.masked_select(inside)
    r = q - int(below)
    if not 1 <= r <= cand.numel():
        return torch.kthvalue(scores, q).values
    return torch.kthvalue(cand, r).values


def conv_tap_sums(x: Tensor, kernel, stride, padding, dilation, out_hw) -> Tensor:
    """``[C, kh·kw]``: for every input channel and kernel tap, the sum of the tap's input over
    the im2col rows (batch and output positions) — GraBo's conv ``v`` from ``x = |input|``.
    Equals the weight gradient of a one-channel conv with an all-ones output gradient, in
    ``O(|x|)``: the batch is summed first, then each tap sums a strided window."""
    kh, kw = kernel
    oh, ow = out_hw
    base = F.pad(x.sum(0), (padding[1], padding[1], padding[0], padding[0]))
    out = []
    for a in range(kh):
        for b in range(kw):
            h0, w0 = a * dilation[0], b * dilation[1]
            out.append(base[:, h0:h0 + (oh - 1) * stride[0] + 1:stride[0],
                            w0:w0 + (ow - 1) * stride[1] + 1:stride[1]].sum((1, 2)))
    return torch.stack(out, 1)


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
        for ls in self.layers:
            skip = getattr(ls.module, "skip_weight_grad", None)
            if callable(skip):
                skip(False)

    def _arm(self, t: int) -> None:
        """Update steps: capture every layer's input and output gradient; when the optimizer
        step is skipped on them (the default), the backward gives the active weights zero
        gradients instead of computing them, since nothing uses them."""
        self._drop_hooks()
        if not self.is_update_step(t):
            return
        layers = [ls for ls in self.layers if ls.updatable]
        if layers:
            self._hooks = dp.Capture(layers)
        if self.skip_optimizer_step_on_update:
            for ls in layers:
                skip = getattr(ls.module, "skip_weight_grad", None)
                if callable(skip):
                    skip(True)

    # ------------------------------------------------------------------ operands
    def _operands(self, ls: LayerState, x: Tensor, dy: Tensor):
        """``(x, dy, conv)`` in the form the SDDMM takes (conv: padded input and its args)."""
        mod = ls.module
        if len(ls.weight_shape) == 2:
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
                shape = [groups, *ls.weight_shape[1:]]
                v = torch.nn.grad.conv2d_weight(x.to(acc), shape,
                                                s.expand(n, groups, oh, ow).contiguous(),
                                                stride, pad, dil, groups)
            else:
                u = dy.abs().to(acc).sum((0, 2, 3))
                v = conv_tap_sums(x.abs().to(acc), ls.weight_shape[2:], stride, pad, dil,
                                  (oh, ow)).reshape(groups, -1)  # [group, (c, kh, kw)]
            v = v.flatten(1)
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
    def active_units(self, ls: LayerState) -> Tensor:
        """Sorted flat indices of the active units, read off the layer's cached topology in
        ``O(|A|)`` (no pass over the dense mask)."""
        mod = ls.module
        sync = getattr(mod, "_sync", None)
        if callable(sync):
            sync()  # an in-place mask edit since the forward
        topo = getattr(mod, "topology", None)
        if topo is None or tuple(topo.block_size) != tuple(ls.block_size):
            return ls.unit_mask().flatten().nonzero().flatten()
        rp, ci = topo.row_ptr.long(), topo.col_idx
        starts = torch.arange(rp.numel() - 1, device=rp.device) * ls.ever.shape[1]
        return torch.repeat_interleave(starts, rp.diff(), output_size=ci.numel()).add_(ci)

    def sample_subset(self, ls: LayerState, t: int, unit: Tensor, n_active: int, x: Tensor,
                      dy: Tensor, conv) -> Tensor:
        """Sorted flat unit indices of ``S`` (``unit``: the unit mask, not modified)."""
        n_s = self.subset_size(ls, n_active)
        if n_s >= ls.n_units - n_active:
            return (~unit.flatten()).nonzero().flatten().cpu()
        u, v = self.factors(ls, t, x, dy, conv)
        taken = unit.flatten().cpu().clone()
        return sample_factorised(u, v, taken, n_s, self.generator(t, ls.index, SAMPLE_SALT))

    def subset_grad(self, ls: LayerState, subset: Tensor, x: Tensor, dy: Tensor,
                    conv) -> Tensor:
        """Signed ``G`` on the subset's entries, ``[|S|, br, bc]`` (zero outside the matrix),
        from the pattern SDDMM on the subset's topology (built from the sorted indices, CSR
        only for the backends whose SDDMM reads nothing else; the SDDMM's mask is the inactive
        set, which holds every entry of every subset unit; for ``bsr`` an all-true view, as a
        subset unit is an inactive block)."""
        mod = ls.module
        br, bc = ls.block_size
        dev = mod.weight.device
        csc = ops.resolve_backend(dev) not in ("cpp", "reference")  # they read CSR only
        topo = index_tensors(subset.to(dev), tuple(ls.ever.shape), csc=csc)
        if ls.bsr:
            pattern = torch.ones((), dtype=torch.bool, device=dev).expand(ls.weight_shape)
        else:
            pattern = ~mod.mask
        if conv is None:
            return ops.sddmm(dy, x, pattern.reshape(ls.shape2d), topo, br, bc)
        return ops.conv2d_sddmm(dy, x, pattern, topo, br, bc, *conv)

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

    @staticmethod
    def _flat_dense(ls: LayerState) -> bool:
        """Element units on a weight stored densely: the update works on flat indices."""
        return not ls.blocked and not ls.bsr and tuple(ls.module.weight.shape) == ls.weight_shape

    def _active_magnitude(self, ls: LayerState, active: Tensor) -> Tensor:
        """``|W|`` of the active units (block mean), in ``active``'s order."""
        if self._flat_dense(ls):
            w = ls.module.weight.detach().reshape(-1)
            return w.index_select(0, active.to(w.device)).to(acc_dtype(w.dtype)).abs()
        mag = ls.magnitude().flatten()
        return mag.index_select(0, active.to(mag.device))

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
        unit = ls.module.mask.flatten(1) if not (ls.blocked or ls.bsr) else ls.unit_mask()
        active = self.active_units(ls)
        n_active = active.numel()
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
        grown = subset[top_positions(scores, k).cpu()]
        drop_pos = top_positions(self._active_magnitude(ls, active), k, largest=False)
        self.last_subsets[ls.name] = {"subset": subset, "scores": scores.cpu(), "grown": grown}
        self._swap(ls, unit, active, drop_pos.to(active.device), grown)

    def _swap(self, ls: LayerState, unit: Tensor, active: Tensor, drop_pos: Tensor,
              grown: Tensor) -> None:
        """Install ``unit`` with ``active[drop_pos]`` cleared and ``grown`` (inactive before)
        set, with the resets and metrics of :meth:`DSTMethod._install`. Element units on a
        dense weight take a path with ``O(k)`` resets and counts instead of passes over the
        dense mask, and hand the new sorted active list to ``set_mask`` for the topology."""
        k, n_active = grown.numel(), active.numel()
        new_unit = unit.clone()
        flat = new_unit.view(-1)
        flat.index_fill_(0, active.index_select(0, drop_pos).to(flat.device), False)
        flat.index_fill_(0, grown.to(flat.device), True)
        if not self._flat_dense(ls):
            g = torch.zeros_like(new_unit)
            g.view(-1)[grown.to(g.device)] = True
            self._install(ls, new_unit, grown=g, n_dropped=k)
            return
        mod = ls.module
        kept = torch.ones(n_active, dtype=torch.bool, device=active.device)
        kept[drop_pos] = False
        units = _sorted(torch.cat([active.masked_select(kept), grown.to(active.device)]))
        mod.set_mask(new_unit.reshape(ls.weight_shape), units=units)
        w = mod.weight
        idx, newly = grown.to(w.device), None
        for tensor in (w.data, w.grad, *self.optimizer.state.get(w, {}).values()):
            if not (torch.is_tensor(tensor) and tensor.shape == w.shape):
                continue
            if tensor.is_contiguous():
                tensor.view(-1).index_fill_(0, idx, 0)
            else:
                if newly is None:
                    newly = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
                    newly[idx] = True
                    newly = newly.view(w.shape)
                tensor.masked_fill_(newly, 0)
        ls.density = n_active / flat.numel()
        inter, union = n_active - k, n_active + k
        ls.last = {"step": self._t, "n_dropped": k, "n_grown": k, "n_net_swapped": k,
                   "iou": inter / union if union else None}
        for key in self.totals:
            self.totals[key] += ls.last[key]
        self._update_stats[0] += inter
        self._update_stats[1] += union
        ls.ever.view(-1)[grown.to(ls.ever.device)] = True

    def _step_cost(self, ls: LayerState, due: bool) -> float:
        """A training step plus, on update steps, the SDDMM over ``S``."""
        extra = self._subset_density.pop(ls.index, 0.0) if due else 0.0
        return 3.0 * ls.density + extra

    def _after_load(self) -> None:
        self._arm(self._t + 1)
