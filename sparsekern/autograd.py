"""The eager autograd path for steps on which a DST method armed a request.

Without a request, the layers call the custom ops directly (their autograd is registered in
:mod:`sparsekern.ops`, and the path traces under ``torch.compile(fullgraph=True)``). With one,
:class:`SparseRequestFn` runs the same forward and a backward that computes, from one pass over
``dy`` and ``x``:

- ``GrowRequest`` (one-shot): ``fused_weight_grad`` gives the active weight gradient and the
  exact top-k growth candidates together; the candidates go to the layer through ``sink``.
- ``CandidateRequest`` (persistent, BiDST): one ``sddmm`` over the candidate pattern
  ``C ∪ M`` gives ``G`` on it; the active weight gradient is ``G`` restricted to ``M`` and
  ``scores.grad = reference.psi_grad(G_C, W, M, C, lam, phi)``.

``weight.grad`` is zero outside the active entries either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import ops
from . import reference as ref


@dataclass
class GrowSpec:
    """A resolved :class:`~sparsekern.nn.request.GrowRequest` (tensors on the layer's device)."""

    k: int
    exclude: Tensor  # bool, 2-D weight view or block grid
    counter: Optional[Tensor]
    bonus_scale: float
    eps: float
    sink: Callable[[Tensor, Tensor], None]  # receives (flat_indices, scores)


@dataclass
class CandidateSpec:
    """A resolved :class:`~sparsekern.nn.request.CandidateRequest`."""

    pattern: Tensor  # bool, the op's mask shape: active ∪ candidates
    topo: list[Tensor]  # topology of ``pattern``
    candidates: Tensor  # bool [M, K]
    lam: float
    phi: str


@dataclass
class RequestPlan:
    grow: Optional[GrowSpec] = None
    cand: Optional[CandidateSpec] = None
    scores: Optional[Tensor] = None  # BiDST's ψ (receives its gradient) when ``cand`` is set


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
        pattern, ptopo = (cand.pattern, cand.topo) if cand is not None else (mask, topo)
        conv_args = () if conv is None else tuple(conv)
        vals = None
        if grow is not None:
            fused = ops.fused_weight_grad if conv is None else ops.conv2d_fused_weight_grad
            vals, idx, scores = fused(dy, x, pattern, ptopo, br, bc, grow.exclude, grow.k,
                                      grow.counter, grow.bonus_scale, grow.eps, *conv_args)
            grow.sink(idx, scores)
        elif cand is not None or need_w:
            sddmm = ops.sddmm if conv is None else ops.conv2d_sddmm
            vals = sddmm(dy, x, pattern, ptopo, br, bc, *conv_args)

        if cand is None:
            if need_w:
                dw = ops.weight_grad_from_blocks(vals, w, topo, w.shape)
        else:
            m = mask.shape[0]
            k = mask[0].numel()
            g = ref.scatter_blocks(vals, ptopo[0], ptopo[1], (m, k))  # G on C ∪ M, 0 elsewhere
            active = mask.reshape(m, k)
            if need_w:
                g_active = g * active
                if w.dim() == 3:
                    dw = ref.gather_blocks(g_active, topo[0], topo[1], br, bc)
                else:
                    dw = g_active.reshape(w.shape)
                dw = dw.to(w.dtype)
            if need_s:
                w2d = (ref.scatter_blocks(w, topo[0], topo[1], (m, k)) if w.dim() == 3
                       else w.reshape(m, k))
                acc = ref.acc_dtype(g.dtype)
                dpsi = ref.psi_grad(g.to(acc), w2d.to(acc), active, cand.candidates, cand.lam,
                                    cand.phi)
                shape, dtype = ctx.scores_meta
                dpsi = dpsi.reshape(shape).to(dtype)
        return dx, dw, dpsi, None, None, None, None, None, None


def request_forward(x: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                    conv: Optional[tuple], plan: RequestPlan) -> Tensor:
    """Run :class:`SparseRequestFn` (no bias; ``conv`` is None for linear)."""
    return SparseRequestFn.apply(x, w, plan.scores, mask, topo, br, bc, conv, plan)
