"""The eager autograd path for steps on which a DST method armed a request.

Without a request, the layers call the custom ops directly (their autograd is registered in
:mod:`sparsekern.ops`, and the path traces under ``torch.compile(fullgraph=True)``). With one,
:class:`SparseRequestFn` runs the same forward and a backward that computes, from one pass over
``dy`` and ``x``:

- ``GrowRequest`` (armed until the layer's candidates are taken): every backward adds its
  ``(x, dy)`` to the layer's :class:`GrowthStash`; the first one runs ``fused_weight_grad`` (the
  active weight gradient and the exact top-k together), later ones (gradient accumulation, a
  layer called more than once) a plain ``sddmm``. :func:`stash_topk` then ranks the gradient the
  optimizer step uses, ``Σ_i dy_iᵀ x_i``, by one top-k over the batch-concatenated stash (the
  first backward's result is reused when it was the only one).
- ``CandidateRequest`` (persistent, BiDST): one ``sddmm`` over the candidate pattern
  ``C ∪ M`` gives ``G`` on it; the active weight gradient is ``G`` restricted to ``M`` and
  ``scores.grad = reference.psi_grad(G_C, W, M, C, lam, phi)`` (under a GradScaler of scale
  ``s``: ``s·psi_grad(G_C/s, ...)``, so that unscaling it like any gradient is exact although
  ``φ`` may be quadratic).
- A step whose optimizer step is skipped (GSE's update step; :meth:`SparseModule.skip_weight_grad`):
  no request, and ``weight.grad`` is zeros — the active SDDMM is not computed.

``weight.grad`` is zero outside the active entries either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from ._util import acc_dtype, conv_out_hw, psi_grad
from .topology import TopoTensors, as_topo, gather_blocks, scatter_blocks


@dataclass
class GrowSpec:
    """A resolved :class:`~sparsekern.nn.request.GrowRequest` (tensors on the layer's device)."""

    k: int
    exclude: Tensor  # bool, 2-D weight view or block grid
    counter: Optional[Tensor]
    bonus_scale: float
    eps: float
    stash: "GrowthStash"  # the layer's: receives (x, dy) of every backward


@dataclass
class CandidateSpec:
    """A resolved :class:`~sparsekern.nn.request.CandidateRequest`."""

    pattern: Tensor  # bool, the op's mask shape: active ∪ candidates
    topo: TopoTensors  # topology of ``pattern``
    candidates: Tensor  # bool [M, K]
    lam: float
    phi: str


class GrowthStash:
    """What a layer's backwards produced while a :class:`GrowRequest` was armed: the op inputs
    ``x`` and output gradients ``dy`` of each backward (kept until the candidates are taken:
    memory of about one forward's activations of the layer, on growth steps only), the conv
    arguments, and the first backward's fused top-k."""

    def __init__(self) -> None:
        self.x: list[Tensor] = []
        self.dy: list[Tensor] = []
        self.conv: Optional[tuple] = None
        self.first: Optional[tuple[Tensor, Tensor]] = None

    def __len__(self) -> int:
        return len(self.x)

    def add(self, x: Tensor, dy: Tensor, conv: Optional[tuple],
            result: Optional[tuple[Tensor, Tensor]]) -> None:
        if not self.x:
            self.first = result
        self.x.append(x.detach())
        self.dy.append(dy.detach())
        self.conv = conv


@dataclass
class RequestPlan:
    grow: Optional[GrowSpec] = None
    cand: Optional[CandidateSpec] = None
    scores: Optional[Tensor] = None  # BiDST's ψ (receives its gradient) when ``cand`` is set
    grad_scale: float = 1.0  # the factor dy carries (GradScaler): dψ = s·ψ_grad(G/s)
    weight_grad: bool = True  # False: the step does not use weight.grad (it gets zeros, no SDDMM)


class SparseRequestFn(torch.autograd.Function):
    """``y = x ⊛ (W ⊙ mask)`` (linear: ``x [B, K]``; conv: ``x [N, C, H, W]`` with ``conv`` =
    ``(stride, padding, dilation, groups)``) with the request-aware backward.

    ``scores`` is an input only so that autograd accumulates ``dψ`` into ``scores.grad``; the
    forward does not read it.
    """

    @staticmethod
    def forward(ctx, x, w, scores, mask, topo, br, bc, conv, plan):
        ctx.save_for_backward(x, w)
        ctx.mask, ctx.topo, ctx.br, ctx.bc, ctx.conv, ctx.plan = mask, topo, br, bc, conv, plan
        ctx.scores_meta = None if scores is None else (scores.shape, scores.dtype)
        if conv is None:
            return ops.bsr_mm(x, w, mask, topo, br, bc)
        return ops.conv2d(x, w, mask, topo, br, bc, *conv)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        mask, topo, br, bc, conv, plan = ctx.mask, ctx.topo, ctx.br, ctx.bc, ctx.conv, ctx.plan
        need_x, need_w, need_s = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        dx = dw = dpsi = None
        if need_x:
            if conv is None:
                dx = ops.bsr_mm_t(dy, w, mask, topo, br, bc)
            else:
                dx = ops.conv2d_grad_input(dy, w, mask, topo, br, bc, list(x.shape[2:]), *conv)

        cand, grow = plan.cand, plan.grow
        if cand is None and grow is None and not plan.weight_grad:
            return dx, (torch.zeros_like(w) if need_w else None), None, *([None] * 6)
        pattern, ptopo = (cand.pattern, cand.topo) if cand is not None else (mask, topo)
        conv_args = () if conv is None else tuple(conv)
        vals = None
        if grow is not None and len(grow.stash) == 0:
            fused = ops.fused_weight_grad if conv is None else ops.conv2d_fused_weight_grad
            vals, idx, scores = fused(dy, x, pattern, ptopo, br, bc, grow.exclude, grow.k,
                                      grow.counter, grow.bonus_scale, grow.eps, *conv_args)
            grow.stash.add(x, dy, conv, (idx, scores))
        else:
            if grow is not None:
                grow.stash.add(x, dy, conv, None)
            if cand is not None or need_w:
                sddmm = ops.sddmm if conv is None else ops.conv2d_sddmm
                vals = sddmm(dy, x, pattern, ptopo, br, bc, *conv_args)

        if cand is None:
            if need_w:
                dw = ops.weight_grad_from_blocks(vals, w, topo, w.shape)
        else:
            m = mask.shape[0]
            k = mask[0].numel()
            ptopo, topo = as_topo(ptopo), as_topo(topo)
            g = scatter_blocks(vals, ptopo.row_ptr, ptopo.col_idx, (m, k))  # G on C ∪ M
            active = mask.reshape(m, k)
            if need_w:
                g_active = g * active
                if w.dim() == 3:
                    dw = gather_blocks(g_active, topo.row_ptr, topo.col_idx, br, bc)
                else:
                    dw = g_active.reshape(w.shape)
                dw = dw.to(w.dtype)
            if need_s:
                w2d = (scatter_blocks(w, topo.row_ptr, topo.col_idx, (m, k)) if w.dim() == 3
                       else w.reshape(m, k))
                acc = acc_dtype(g.dtype)
                s = plan.grad_scale
                g = g.to(acc) if s == 1.0 else g.to(acc) / s
                dpsi = psi_grad(g, w2d.to(acc), active, cand.candidates, cand.lam, cand.phi)
                if s != 1.0:
                    dpsi = dpsi * s
                shape, dtype = ctx.scores_meta
                dpsi = dpsi.reshape(shape).to(dtype)
        return dx, dw, dpsi, None, None, None, None, None, None


def request_forward(x: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                    conv: Optional[tuple], plan: RequestPlan) -> Tensor:
    """Run :class:`SparseRequestFn` (no bias; ``conv`` is None for linear)."""
    return SparseRequestFn.apply(x, w, plan.scores, mask, topo, br, bc, conv, plan)


def _cat_conv(xs: list[Tensor], dys: list[Tensor], conv: tuple,
              weight_shape: list[int]) -> tuple[Tensor, Tensor]:
    """Concatenate conv op inputs along the batch. Inputs of different spatial sizes are
    zero-extended at the bottom/right to the largest, and each ``dy`` to the output size of that
    extended input. Exact: an added ``dy`` entry is 0, and every original ``dy`` entry reads the
    same ``x`` values (an added ``x`` position holds the 0 the op's padding gave it before)."""
    if len(xs) == 1:
        return xs[0], dys[0]
    if len({tuple(x.shape[2:]) for x in xs}) > 1:
        hw = [max(x.shape[2 + i] for x in xs) for i in range(2)]
        stride, padding, dilation, _ = conv
        ohw = conv_out_hw(hw, weight_shape[2:], stride, padding, dilation)
        xs = [F.pad(x, (0, hw[1] - x.shape[3], 0, hw[0] - x.shape[2])) for x in xs]
        dys = [F.pad(d, (0, ohw[1] - d.shape[3], 0, ohw[0] - d.shape[2])) for d in dys]
    return torch.cat(xs), torch.cat(dys)


def stash_topk(stash: GrowthStash, exclude: Tensor, k: int, counter: Optional[Tensor],
               bonus_scale: float, eps: float, br: int, bc: int, weight_shape,
               grad_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` growth candidates of ``Σ_i dy_iᵀ x_i / grad_scale`` over a stash.

    ``grad_scale`` (a GradScaler's scale, the ``dy`` being scaled by it) is divided out of the
    scores; the DST-EE bonus is multiplied by it instead so that one top-k on the scaled ``dy``
    ranks the unscaled scores (exactly for a power-of-two scale). The first backward's fused
    result is reused when it was the only backward and needs no bonus rescaling."""
    if len(stash) == 0:
        raise RuntimeError("growth request: no backward ran since it was armed")
    if len(stash) == 1 and (grad_scale == 1.0 or counter is None) and stash.first is not None:
        idx, scores = stash.first
        return idx, scores if grad_scale == 1.0 else scores / grad_scale
    dtype = stash.x[0].dtype
    for t in stash.x + stash.dy:
        dtype = torch.promote_types(dtype, t.dtype)
    xs = [x.to(dtype) for x in stash.x]
    dys = [d.to(dtype) for d in stash.dy]
    bonus = bonus_scale * grad_scale
    if stash.conv is None:
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        dy = dys[0] if len(dys) == 1 else torch.cat(dys)
        idx, scores = ops.grow_topk(dy, x, exclude, k, counter, bonus, eps, br, bc)
    else:
        x, dy = _cat_conv(xs, dys, stash.conv, list(weight_shape))
        idx, scores = ops.conv2d_grow_topk(dy, x, exclude, k, counter, bonus, eps, br, bc,
                                           list(weight_shape), *stash.conv)
    return idx, scores if grad_scale == 1.0 else scores / grad_scale
