"""Exact growth top-k of ``|dyᵀx| (+ bonus)`` without the dense gradient: radix select over
distinct int64 composite keys, recomputing the GEMM tiles in each pass.

Every valid (not excluded) score ``s`` gets the composite ``c = key32(s) << 31 | (2^31-1-flat)``:
all ``c`` differ, so the top-k of ``c`` is unique and breaks score ties toward the lower flat
index; NaN keys sit above ``+inf``. Pass 1 histograms the top 11 bits of ``c`` and records each
tile's ``[min c, max c]``; the host finds the bucket holding the k-th largest key (its exact
size is known). When everything above the bucket plus the bucket fits the candidate buffer, one
collect pass appends them and ``torch.topk`` over those (distinct) keys finishes; otherwise a
histogram pass of the next 11 bits inside the bucket narrows it (at most 6 digit levels for 63
bits). Later passes skip tiles whose ``[min, max]`` misses the range. All passes run the same
kernel and config (no split-K, no float atomics), so scores are bit-identical across passes.

Extra memory: 8 KB histogram + 16 B per tile + 8 B x (k + buffer). Never ``M x K``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from . import configs
from ._common import Geometry, linear_geometry, mask_u8, topo_nnzb
from .bsr_mm import supported
from .sddmm import INT64_MAX, Selection, launch_sddmm, launch_wgrad

IDX_BITS = 31
KEY_BITS = 32 + IDX_BITS  # composites are < 2^63


def decode(c: Tensor) -> tuple[Tensor, Tensor]:
    """``(flat indices int64, fp32 scores)`` of composite keys."""
    low = (1 << IDX_BITS) - 1
    flat = low - (c & low)
    key = c >> IDX_BITS
    bits = torch.where(key >= (1 << 31), key - (1 << 31), ((1 << 32) - 1) - key)
    bits = bits - (bits >= (1 << 31)).long() * (1 << 32)
    return flat, bits.to(torch.int32).view(torch.float32)


def select(run, sel: Selection, k: int) -> tuple[Tensor, Tensor]:
    """Drive the passes: ``run(pass_id, lo_bound, hi_bound, shift_lo, digit_mask)`` launches the
    tile kernel. Returns ``(flat indices, scores)``, descending, ties to the lower index."""
    lo, hi, shift_hi, above, level = 0, INT64_MAX, KEY_BITS, 0, 0
    while True:
        shift_lo = max(shift_hi - configs.HIST_BITS, 0)
        sel.hist.zero_()
        run(1 if level == 0 else 2, lo, hi, shift_lo, (1 << (shift_hi - shift_lo)) - 1)
        h = sel.hist.tolist()
        if level == 0:
            total = sum(h)
            if k > total:
                raise ValueError(f"grow_topk: k={k} exceeds the {total} entries not excluded")
        need, cum, b = k - above, 0, len(h) - 1
        while cum + h[b] < need:
            cum += h[b]
            b -= 1
        above += cum
        lo += b << shift_lo
        hi = lo + (1 << shift_lo) - 1
        shift_hi = shift_lo
        level += 1
        if above + h[b] <= sel.cap or shift_hi == 0:
            n = above + h[b]
            break
    sel.ncand.zero_()
    run(3, lo, INT64_MAX, 0, 0)
    top = torch.topk(sel.cand[:n], k, sorted=True).values
    return decode(top)


def _check_select(name: str, exclude: Tensor, counter: Optional[Tensor], grid: tuple[int, int],
                  k: int):
    torch._check(tuple(exclude.shape) == tuple(grid),
                 lambda: f"{name}: exclude must have shape {tuple(grid)}, "
                         f"got {tuple(exclude.shape)}")
    torch._check(exclude.dtype == torch.bool,
                 lambda: f"{name}: exclude must be bool, got {exclude.dtype}")
    if counter is not None:
        torch._check(tuple(counter.shape) == tuple(grid),
                     lambda: f"{name}: counter must have shape {tuple(grid)}, "
                             f"got {tuple(counter.shape)}")
    torch._check(k >= 0, lambda: f"{name}: k must be >= 0, got {k}")


def weight_side(dy: Tensor, x: Tensor, shape: tuple[int, int], mask2d: Optional[Tensor],
                topo: Optional[list[Tensor]], t: configs.Tiling, geo: Geometry, exclude: Tensor,
                k: int, counter: Optional[Tensor], bonus_scale: float, eps: float,
                buffer: Optional[int] = None):
    """Top-k over the ``[M, K] = shape`` weight view and, when ``mask2d``/``topo`` are given,
    the SDDMM values written by the same first pass: ``(values or None, indices, scores)``."""
    dev = x.device
    want_values = topo is not None
    if k == 0:
        vals = launch_sddmm(dy, x, mask2d, topo, t, geo) if want_values else None
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return vals, empty, torch.empty(0, dtype=torch.float32, device=dev)
    vals = None
    if want_values:
        vals = torch.zeros(topo_nnzb(topo), t.br, t.bc, dtype=configs.store_dtype(x.dtype),
                           device=dev)
    n_tr, n_tc = t.grid(*shape)
    cap = min(configs.topk_capacity(k, buffer), exclude.numel())
    sel = Selection(mask_u8(exclude), counter, float(bonus_scale), float(eps), cap, n_tr * n_tc,
                    dev)

    def run(pass_id, lo, hi, shift_lo, digit_mask):
        launch_wgrad(dy, x, shape, mask2d, topo, t, geo, pass_id=pass_id,
                     vals=vals if pass_id == 1 and want_values and vals.numel() else None,
                     sel=sel, lo_bound=lo, hi_bound=hi, shift_lo=shift_lo,
                     digit_mask=digit_mask)

    idx, scores = select(run, sel, k)
    return (vals.to(x.dtype) if want_values else None), idx, scores


def _score_grid(m: int, k: int, br: int, bc: int) -> tuple[int, int]:
    return (m, k) if (br, bc) == (1, 1) else (-(-m // br), -(-k // bc))


def _fits(grid) -> bool:
    return grid[0] * grid[1] < 2**IDX_BITS


def grow_topk(dy: Tensor, x: Tensor, exclude: Tensor, k: int, counter: Optional[Tensor],
              bonus_scale: float, eps: float, br: int, bc: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of ``|dyᵀx|`` (block mean) ``+ bonus_scale/(counter+eps)`` over entries
    where ``exclude`` is False -> ``(flat_indices int64 [k], scores fp32 [k])``."""
    return grow_topk_impl(dy, x, exclude, k, counter, bonus_scale, eps, br, bc)


def grow_topk_impl(dy, x, exclude, k, counter, bonus_scale, eps, br, bc, *,
                   buffer: Optional[int] = None):
    """:func:`grow_topk` with a chosen candidate-buffer size (``buffer`` entries beyond ``k``)."""
    torch._check(dy.dim() == 2 and x.dim() == 2 and dy.shape[0] == x.shape[0],
                 lambda: f"grow_topk: dy [B, M] and x [B, K] expected, got {tuple(dy.shape)} "
                         f"and {tuple(x.shape)}")
    m, kk = dy.shape[1], x.shape[1]
    grid = _score_grid(m, kk, br, bc)
    _check_select("grow_topk", exclude, counter, grid, k)
    t = configs.tiling(br, bc, allow_block_path=False)
    if t is None or not supported(dy, x) or not _fits(grid) or m * kk == 0:
        return ref.grow_topk(dy, x, exclude, k, counter, bonus_scale, eps, br, bc)
    _, idx, scores = weight_side(dy, x, (m, kk), None, None, t, linear_geometry(x, dy),
                                 exclude, k, counter, bonus_scale, eps, buffer)
    return idx, scores


def fused_weight_grad(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                      exclude: Tensor, k: int, counter: Optional[Tensor], bonus_scale: float,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``sddmm`` values and ``grow_topk`` from one pass: ``(values, flat_indices, scores)``."""
    return fused_weight_grad_impl(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale,
                                  eps)


def fused_weight_grad_impl(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps, *,
                           buffer: Optional[int] = None):
    torch._check(dy.dim() == 2 and x.dim() == 2 and dy.shape[0] == x.shape[0],
                 lambda: f"fused_weight_grad: dy [B, M] and x [B, K] expected, got "
                         f"{tuple(dy.shape)} and {tuple(x.shape)}")
    m, kk = dy.shape[1], x.shape[1]
    torch._check(tuple(mask.shape) == (m, kk),
                 lambda: f"fused_weight_grad: mask must have shape {(m, kk)}, "
                         f"got {tuple(mask.shape)}")
    grid = _score_grid(m, kk, br, bc)
    _check_select("fused_weight_grad", exclude, counter, grid, k)
    t = configs.tiling(br, bc, allow_block_path=False)
    if t is None or not supported(dy, x) or not _fits(grid) or m * kk == 0:
        return ref.fused_weight_grad(dy, x, mask, topo, br, bc, exclude, k, counter,
                                     bonus_scale, eps)
    return weight_side(dy, x, (m, kk), mask, topo, t, linear_geometry(x, dy), exclude, k,
                       counter, bonus_scale, eps, buffer)
