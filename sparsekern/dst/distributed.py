"""Data parallelism for the DST methods: growth scores of the global batch, identical masks on
every rank, and BiDST's mask-score gradients averaged like the weights' (DDP semantics).

An exact global top-k needs the global gradient ``Σ_r dY_rᵀ X_r`` (per-rank top-k lists do not
combine). On a growth step every sparse layer's input ``X`` and output gradient ``dY`` are
captured by hooks that exist only on that step; after the backward either

* ``gather``: ``X`` and ``dY`` are all-gathered (cost ``B_global·(|x| + |dy|)`` per layer) and the
  layer's own fused backward runs once more on the global batch with the growth request armed
  (so the kernel backend computes the top-k without a dense gradient), or
* ``allreduce``: the dense candidate gradient is computed and all-reduced in row chunks (cost
  ``M·K`` per layer, memory one chunk) and its exact top-k is kept by a streaming merge,

whichever moves fewer elements (``dp_growth="auto"``). ``dY`` is divided by the world size, as
DDP averages gradients, so scores (and DST-EE's bonus) equal those of one process that sees the
concatenated batch with the mean loss. Masks are broadcast from rank 0 after every update as a
safety net.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..nn.request import GrowRequest
from .._util import acc_dtype, stable_topk
from ..topology import block_reduce

DP_GROWTH = ("auto", "gather", "allreduce")
CHUNK_ELEMENTS = 1 << 22


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world()[1] > 1


def _comm_device(t: Tensor) -> Tensor:
    """gloo handles CPU tensors only; NCCL needs CUDA ones."""
    if dist.get_backend() == "gloo":
        return t.cpu()
    return t


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average ``t`` over ranks in place."""
    size = world()[1]
    if size == 1:
        return t
    buf = _comm_device(t)
    dist.all_reduce(buf)
    buf.div_(size)
    if buf is not t:
        t.copy_(buf)
    return t


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate ``t`` of every rank along dim 0, in rank order (ranks may hold different
    numbers of rows)."""
    _, size = world()
    src = _comm_device(t.contiguous())
    n = torch.tensor([src.shape[0]], dtype=torch.int64, device=src.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    biggest = max(sizes)
    if src.shape[0] < biggest:
        pad = src.new_zeros(biggest - src.shape[0], *src.shape[1:])
        src = torch.cat([src, pad])
    parts = [torch.empty_like(src) for _ in range(size)]
    dist.all_gather(parts, src)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Broadcast ``t`` from rank ``src`` in place."""
    buf = _comm_device(t)
    dist.broadcast(buf, src)
    if buf is not t:
        t.copy_(buf)
    return t


def broadcast_unit_masks(units: list[Tensor]) -> list[Optional[Tensor]]:
    """Broadcast bool masks from rank 0: for each, rank 0's mask where this rank's differs,
    else None."""
    out = []
    for u in units:
        b = u.to(torch.uint8)
        broadcast_(b)
        theirs = b.bool()
        out.append(None if torch.equal(theirs, u) else theirs)
    return out


class Capture:
    """Forward hooks that record, for every call of each layer whose output receives a
    gradient, the call's input and that output gradient (recorded together by a hook on the
    output, so a forward recomputed by activation checkpointing, whose output is not in the
    graph, adds nothing). Installed on growth steps only; every backward until the update
    counts (gradient accumulation, a layer called several times)."""

    def __init__(self, layers):
        self.x: dict[int, list[Tensor]] = {ls.index: [] for ls in layers}
        self.dy: dict[int, list[Tensor]] = {ls.index: [] for ls in layers}
        self.paused = False
        self.handles = [ls.module.register_forward_hook(self._hook(ls.index)) for ls in layers]

    def _hook(self, i: int):
        def hook(module, args, out):
            if self.paused or not torch.is_grad_enabled():
                return
            x = args[0].detach()
            if isinstance(out, Tensor) and out.requires_grad:
                def record(g):
                    self.x[i].append(x)
                    self.dy[i].append(g.detach())
                out.register_hook(record)
        return hook

    def tensors(self, i: int, name: str) -> tuple[Tensor, Tensor]:
        xs, dys = self.x[i], self.dy[i]
        if not xs:
            raise RuntimeError(
                f"{name}: no input/output gradient was captured for layer {i} on a growth step; "
                "run a forward and backward through the model between step() calls")
        if len(xs) == 1:
            return xs[0], dys[0]
        try:
            return torch.cat(xs), torch.cat(dys)
        except RuntimeError as e:
            raise RuntimeError(f"{name}: layer {i} ran several times on a growth step with "
                               f"inputs that cannot be concatenated ({e})") from None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def choose_mode(mode: str, x: Tensor, dy: Tensor, shape2d: tuple[int, int]) -> str:
    """``gather`` when all-gathering X and dY moves fewer elements than the dense gradient."""
    if mode != "auto":
        return mode
    size = world()[1]
    gathered = size * (x.numel() + dy.numel())
    return "gather" if gathered <= shape2d[0] * shape2d[1] else "allreduce"


def _weight_shape(layer) -> tuple[int, ...]:
    """The nn weight shape of a sparse layer (without building a ``bsr`` layer's mask)."""
    shape = getattr(layer, "weight_shape", None)
    return tuple(shape) if shape is not None else tuple(layer.mask.shape)


def global_topk(layer, x: Tensor, dy: Tensor, req: GrowRequest, mode: str,
                capture: Capture) -> tuple[Tensor, Tensor]:
    """Top-``req.k`` growth candidates of ``layer`` over the global batch, identical on every
    rank: ``(flat_indices, scores)`` on the layer's 2-D view (or block grid)."""
    size = world()[1]
    shape2d = (_weight_shape(layer)[0], math.prod(_weight_shape(layer)[1:]))
    if len(_weight_shape(layer)) == 2:  # flatten batch dims as nn.Linear does
        x, dy = x.reshape(-1, shape2d[1]), dy.reshape(-1, shape2d[0])
    elif x.dim() == 3:  # unbatched conv input
        x, dy = x.unsqueeze(0), dy.unsqueeze(0)
    if choose_mode(mode, x, dy, shape2d) == "gather":
        xg = all_gather_rows(x)
        dyg = all_gather_rows(dy) / size
        return _rerun_with_request(layer, xg, dyg, req, capture)
    return _allreduce_topk(layer, x, dy, req, shape2d)


def _topk_from_operands(layer, x: Tensor, dy: Tensor, req: GrowRequest
                        ) -> tuple[Tensor, Tensor]:
    """The exact top-k of ``|dyᵀx|`` (plus DST-EE's bonus) from the operands alone, without
    the layer's weight: for a weight sharded by FSDP2 (a ``DTensor`` outside the forward)."""
    from ..autograd import GrowthStash, stash_topk

    conv = None
    if len(_weight_shape(layer)) == 4:
        x, stride, padding, dilation, groups = _conv_args(layer, x)
        conv = (list(stride), list(padding), list(dilation), groups)
        if dy.dim() == 3:
            dy = dy.unsqueeze(0)
    stash = GrowthStash()
    stash.add(x, dy, conv, None)
    dev = layer.weight.device
    counter = None if req.counter is None else req.counter.to(dev)
    br, bc = tuple(layer.block_size)
    return stash_topk(stash, req.exclude.to(dev), int(req.k), counter, float(req.bonus_scale),
                      float(req.eps), br, bc, _weight_shape(layer))


def _rerun_with_request(layer, x: Tensor, dy: Tensor, req: GrowRequest,
                        capture: Capture) -> tuple[Tensor, Tensor]:
    """The layer's own forward and fused backward on ``(x, dy)``, the request armed; the
    weight gradient is returned by ``autograd.grad``, not accumulated. A sharded weight
    (FSDP2) takes :func:`_topk_from_operands` instead."""
    if callable(getattr(layer.weight, "to_local", None)):
        return _topk_from_operands(layer, x, dy, req)
    capture.paused = True
    try:
        layer.grow_candidates = None
        layer.request(req)
        with torch.enable_grad():
            y = layer(x)
            torch.autograd.grad(y, layer.weight, dy.to(y.dtype))
    finally:
        capture.paused = False
    cands = layer.grow_candidates
    layer.grow_candidates = None
    if cands is None:
        raise RuntimeError("data-parallel growth: the layer's backward left no grow_candidates")
    return cands


def _conv_args(layer, x: Tensor):
    """``(x, stride, padding, dilation, groups)`` with the layer's padding mode (and an
    asymmetric ``'same'``) applied to ``x`` as its forward does."""
    from .. import functional as skF

    kernel = tuple(_weight_shape(layer)[2:])
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        x = F.pad(x, skF.same_padding_pad(layer.padding, kernel, layer.dilation),
                  mode=layer.padding_mode)
        pad = (0, 0)
    else:
        pad, extra = skF.resolve_conv_padding(layer.padding, kernel, layer.dilation)
        if any(extra):
            x = F.pad(x, extra)
    return x, tuple(layer.stride), tuple(pad), tuple(layer.dilation), layer.groups


def _dense_grad_rows(layer, x: Tensor, dy: Tensor, r0: int, r1: int) -> Tensor:
    """Rows ``r0:r1`` of the dense weight gradient ``dyᵀx`` on the 2-D view (accumulation
    dtype). Data-parallel fallback only: the single-process path never forms it."""
    acc = acc_dtype(x.dtype)
    if len(_weight_shape(layer)) == 2:
        k = _weight_shape(layer)[1]
        x2 = x.reshape(-1, k).to(acc)
        dy2 = dy.reshape(-1, dy.shape[-1])[:, r0:r1].to(acc)
        return dy2.t() @ x2
    w_shape = _weight_shape(layer)
    x, stride, padding, dilation, groups = _conv_args(layer, x)
    if dy.dim() == 3:
        dy = dy.unsqueeze(0)
    cout_g, cin_g = w_shape[0] // groups, w_shape[1]
    parts = []
    r = r0
    while r < r1:
        g = r // cout_g
        e = min(r1, (g + 1) * cout_g)
        xs = x[:, g * cin_g:(g + 1) * cin_g].to(acc)
        part = torch.nn.grad.conv2d_weight(xs, [e - r, cin_g, *w_shape[2:]], dy[:, r:e].to(acc),
                                           stride, padding, dilation, 1)
        parts.append(part.flatten(1))
        r = e
    return torch.cat(parts)


def _allreduce_topk(layer, x: Tensor, dy: Tensor, req: GrowRequest,
                    shape2d: tuple[int, int]) -> tuple[Tensor, Tensor]:
    size = world()[1]
    br, bc = tuple(layer.block_size)
    m, k_cols = shape2d
    nbc = -(-k_cols // bc)
    rows = max(br, (CHUNK_ELEMENTS // max(k_cols, 1)) // br * br)
    best_idx = torch.empty(0, dtype=torch.int64, device=x.device)
    best_val = None
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        g = _dense_grad_rows(layer, x, dy, r0, r1)
        all_reduce_mean_(g)
        s = g.abs()
        if (br, bc) != (1, 1):
            s = block_reduce(s, (br, bc), "mean")
        u0, u1 = (r0, r1) if (br, bc) == (1, 1) else (r0 // br, -(-r1 // br))
        ncols = k_cols if (br, bc) == (1, 1) else nbc
        if req.counter is not None:
            s = s + req.bonus_scale / (req.counter[u0:u1].to(s.dtype) + req.eps)
        allowed = ~req.exclude[u0:u1]
        flat = allowed.flatten().nonzero().flatten()
        vals = s.flatten()[flat]
        idx = flat + u0 * ncols
        if best_val is not None:
            idx, vals = torch.cat([best_idx, idx]), torch.cat([best_val, vals])
        pos, best_val = stable_topk(vals, min(req.k, vals.numel()))
        best_idx = idx[pos]
    if best_idx.numel() < req.k:
        raise ValueError(f"data-parallel growth: k={req.k} exceeds the {best_idx.numel()} "
                         "entries not excluded")
    return best_idx, best_val


def warn_fixed(name: str, n: int) -> None:
    warnings.warn(f"{name}: the masks of {n} layer(s) differed from rank 0's after an update and "
                  "were replaced by rank 0's (check that every rank runs the same model, data "
                  "order and seed)", stacklevel=3)
