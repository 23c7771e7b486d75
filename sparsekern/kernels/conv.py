"""Convolutions by implicit GEMM (no unfold buffer), every conv argument (stride, padding,
dilation, groups). The weight's 2-D view is ``[C_out, C_in/g * kh * kw]`` in PyTorch's
``(ci, ky, kx)`` column order, the order the mask and its topology use.

* forward: ``bsr_mm``'s kernel with ``CONV``: rows are output pixels, the ``x`` tile is gathered
  from the input per (pixel, column) (tap shift and bounds mask), the group's channel offset
  added; weight tile rows that straddle groups are split by a per-group loop.
* grad_input: ``_conv_dgrad_kernel``, a gather-form transposed convolution: one program per
  (input-pixel tile, group x input-channel tile) reduces over (output-channel tile, tap), each
  (tile, tap) pair skipped when its mask slice is all inactive (per-call flags from the mask).
  Stride > 1 is handled by a divisibility mask (taps that miss the stride grid load nothing).
* weight side (SDDMM, growth top-k, fused): the linear kernels with the implicit-GEMM loaders.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference as ref
from . import configs
from ._common import (NO_SPECIALIZE, _weff_tile, conv_geometry, conv_out_hw, mask_u8,
                      slot_search_iters, topo_nnzb)
from .bsr_mm import _autotune, launch_spmm, supported, weight_operand
from .sddmm import launch_sddmm
from .topk import _check_select, _fits, _score_grid, weight_side


@_autotune(configs.conv_dgrad_configs, key=["NPIX_KEY", "M", "K", "CIN_G", "COUT_G", "BR",
                                            "BC", "W_MODE", "TCO", "TCI"])
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _conv_dgrad_kernel(dy_ptr, w_ptr, m_ptr, dx_ptr, row_ptr, col_idx, flags_ptr,
                       NPIX, M, K, n_cot, n_cit, n_iter, stride_wm, stride_wk, stride_maskm,
                       stride_maskk, CIN_G, COUT_G, KH, KW, H, W, OH, OW, conv_stride_h,
                       conv_stride_w, conv_pad_h, conv_pad_w, conv_dil_h, conv_dil_w,
                       stride_dyn, stride_dyc, stride_dyh, stride_dyw,
                       stride_dxn, stride_dxc, stride_dxh, stride_dxw, NPIX_KEY,
                       BR: tl.constexpr, BC: tl.constexpr, TCO: tl.constexpr,
                       TCI: tl.constexpr, BP: tl.constexpr, W_MODE: tl.constexpr,
                       DOT: tl.constexpr, PREC: tl.constexpr):
    """``dx[n, g*CIN_G + ci, ih, iw] = Σ_{co in g, ky, kx} dy[n, co, oh, ow] ·
    Weff[co, ci, ky, kx]`` with ``ih = oh*conv_stride_h - conv_pad_h + ky*conv_dil_h`` (same
    for w). Grid ``(cdiv(N*H*W, BP), groups * n_cit)``."""
    pid_p = tl.program_id(0)
    pid_g = tl.program_id(1)
    grp = pid_g // n_cit
    cit = pid_g - grp * n_cit
    offs_p = pid_p * BP + tl.arange(0, BP)
    p_ok = offs_p < NPIX
    hw = H * W
    n = offs_p // hw
    rem = offs_p - n * hw
    ih = rem // W
    iw = rem - ih * W
    dy_base = n.to(tl.int64) * stride_dyn
    ci = cit * TCI + tl.arange(0, TCI)
    ci_ok = ci < CIN_G
    lco = tl.arange(0, TCO)
    khw = KH * KW
    acc = tl.zeros((BP, TCI), dtype=tl.float32)
    for q in range(n_cot * khw):
        t = q // khw
        tap = q - t * khw
        if tl.load(flags_ptr + ((grp * n_cot + t) * n_cit + cit) * khw + tap) != 0:
            ky = tap // KW
            kx = tap - ky * KW
            th = ih + conv_pad_h - ky * conv_dil_h
            tw = iw + conv_pad_w - kx * conv_dil_w
            oh = th // conv_stride_h
            ow = tw // conv_stride_w
            v = (p_ok & (th >= 0) & (tw >= 0) & (th - oh * conv_stride_h == 0)
                 & (tw - ow * conv_stride_w == 0) & (oh < OH) & (ow < OW))
            co_l = t * TCO + lco
            co_ok = co_l < COUT_G
            co = grp * COUT_G + co_l
            d = tl.load(dy_ptr + (dy_base + oh * stride_dyh + ow * stride_dyw)[:, None]
                        + (co * stride_dyc)[None, :],
                        mask=v[:, None] & co_ok[None, :], other=0.0).to(DOT)
            wt = _weff_tile(w_ptr, m_ptr, row_ptr, col_idx, co, co_ok, ci * khw + tap, ci_ok, 0,
                            stride_wm, stride_wk, stride_maskm, stride_maskk, n_iter, BR, BC,
                            W_MODE).to(DOT)
            acc = tl.dot(d, wt, acc, input_precision=PREC)
    ptrs = (dx_ptr + (n.to(tl.int64) * stride_dxn + ih * stride_dxh + iw * stride_dxw)[:, None]
            + ((grp * CIN_G + ci) * stride_dxc)[None, :])
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=p_ok[:, None] & ci_ok[None, :])


def dgrad_flags(mask4d: Tensor, groups: int, tco: int, tci: int) -> Tensor:
    """``[groups, n_cot, n_cit, kh*kw]`` int8: 1 where the (output-channel tile, input-channel
    tile, tap) slice of the mask holds an active entry."""
    cout, cg, kh, kw = mask4d.shape
    cog = cout // groups
    n_cot, n_cit = triton.cdiv(cog, tco), triton.cdiv(cg, tci)
    m = mask4d.reshape(groups, cog, cg, kh * kw)
    if cog % tco or cg % tci:
        padded = torch.zeros(groups, n_cot * tco, n_cit * tci, kh * kw, dtype=torch.bool,
                             device=mask4d.device)
        padded[:, :cog, :cg] = m
        m = padded
    m = m.view(groups, n_cot, tco, n_cit, tci, kh * kw)
    return m.any(dim=4).any(dim=2).to(torch.int8).contiguous()


# --------------------------------------------------------------------------- checks
def _pairs(name: str, **vals) -> None:
    for key, v in vals.items():
        torch._check(len(v) == 2, lambda: f"{name}: {key} must have 2 entries, got {list(v)}")


def _check_conv(name: str, x: Tensor, mask: Tensor, groups: int, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: f"{name}: input must be 4-D [N, C, H, W], got {x.dim()}-D")
    torch._check(mask.dim() == 4, lambda: f"{name}: mask must be 4-D, got {mask.dim()}-D")
    torch._check(groups >= 1 and mask.shape[0] % groups == 0,
                 lambda: f"{name}: groups={groups} must divide C_out={mask.shape[0]}")
    _pairs(name, stride=stride, padding=padding, dilation=dilation)


def _tiling(br, bc, *tensors):
    t = configs.tiling(br, bc)
    return t if t is not None and supported(*tensors) else None


# --------------------------------------------------------------------------- launchers
def conv2d(x: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
           stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """Convolution of ``x [N, C_in, H, W]`` with ``W ⊙ mask`` (no bias) ->
    ``[N, C_out, OH, OW]``."""
    _check_conv("conv2d", x, mask, groups, stride, padding, dilation)
    torch._check(x.shape[1] == mask.shape[1] * groups,
                 lambda: f"conv2d: input has {x.shape[1]} channels, mask expects "
                         f"{mask.shape[1] * groups}")
    t = _tiling(br, bc, x, w)
    if t is None:
        return ref.conv2d(x, w, mask, topo, br, bc, stride, padding, dilation, groups)
    oh, ow = conv_out_hw(x.shape[2:], mask.shape[2:], stride, padding, dilation)
    y = torch.empty(x.shape[0], mask.shape[0], oh, ow, dtype=configs.store_dtype(x.dtype),
                    device=x.device)
    if y.numel() == 0 or topo_nnzb(topo) == 0 or mask[0].numel() == 0:
        return y.zero_().to(x.dtype)
    geo = conv_geometry(x, y, mask.shape, stride, padding, dilation, groups)
    return launch_spmm(x, w, mask.reshape(mask.shape[0], -1), topo, t, y, geo).to(x.dtype)


def conv2d_grad_input(dy: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                      input_hw: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int) -> Tensor:
    """Gradient of :func:`conv2d`'s input -> ``[N, C_in, *input_hw]``."""
    _check_conv("conv2d_grad_input", dy, mask, groups, stride, padding, dilation)
    t = _tiling(br, bc, dy, w)
    if t is None:
        return ref.conv2d_grad_input(dy, w, mask, topo, br, bc, input_hw, stride, padding,
                                     dilation, groups)
    cout, cg, kh, kw = mask.shape
    h, wd = int(input_hw[0]), int(input_hw[1])
    dx = torch.empty(dy.shape[0], cg * groups, h, wd, dtype=configs.store_dtype(dy.dtype),
                     device=dy.device)
    row_ptr, col_idx, _, _, _ = topo
    if dx.numel() == 0 or col_idx.numel() == 0 or dy.numel() == 0:
        return dx.zero_().to(dy.dtype)
    m, k = cout, cg * kh * kw
    w_mode, w_arg, stride_wm, stride_wk = weight_operand(w, t, m, k, col_idx.numel())
    w_mode = 0 if w_mode == 0 else 2  # tiles here are (channels x one tap): slots by search
    mk = mask_u8(mask.reshape(m, k))
    cog = cout // groups
    tco, tci = configs.conv_dgrad_channels(cg, cog)
    flags = dgrad_flags(mask, groups, tco, tci)
    n_cot, n_cit = flags.shape[1], flags.shape[2]
    npix = dy.shape[0] * h * wd
    grid = lambda meta: (triton.cdiv(npix, meta["BP"]), groups * n_cit)  # noqa: E731
    _conv_dgrad_kernel[grid](
        dy, w_arg, mk, dx, row_ptr, col_idx, flags, NPIX=npix, M=m, K=k, n_cot=n_cot,
        n_cit=n_cit, n_iter=slot_search_iters(triton.cdiv(k, bc)), stride_wm=stride_wm,
        stride_wk=stride_wk, stride_maskm=mk.stride(0), stride_maskk=mk.stride(1), CIN_G=cg,
        COUT_G=cog, KH=kh, KW=kw, H=h, W=wd, OH=dy.shape[2], OW=dy.shape[3],
        conv_stride_h=stride[0], conv_stride_w=stride[1], conv_pad_h=padding[0],
        conv_pad_w=padding[1], conv_dil_h=dilation[0], conv_dil_w=dilation[1],
        stride_dyn=dy.stride(0), stride_dyc=dy.stride(1), stride_dyh=dy.stride(2),
        stride_dyw=dy.stride(3), stride_dxn=dx.stride(0), stride_dxc=dx.stride(1),
        stride_dxh=dx.stride(2), stride_dxw=dx.stride(3), NPIX_KEY=configs.next_pow2(npix),
        BR=br, BC=bc, TCO=tco, TCI=tci, W_MODE=w_mode,
        DOT=configs.dot_dtype(dy.dtype, w.dtype), PREC=configs.dot_precision(),
        enable_fp_fusion=True)
    return dx.to(dy.dtype)


def conv2d_sddmm(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                 stride: list[int], padding: list[int], dilation: list[int],
                 groups: int) -> Tensor:
    """:func:`conv2d`'s weight gradient on the topology's blocks -> ``[nnzb, br, bc]``."""
    _check_conv("conv2d_sddmm", x, mask, groups, stride, padding, dilation)
    t = _tiling(br, bc, dy, x)
    if t is None:
        return ref.conv2d_sddmm(dy, x, mask, topo, br, bc, stride, padding, dilation, groups)
    geo = conv_geometry(x, dy, mask.shape, stride, padding, dilation, groups)
    return launch_sddmm(dy, x, mask.reshape(mask.shape[0], -1), topo, t, geo)


def _weight_side_conv(name, dy, x, weight_shape, mask, topo, br, bc, exclude, k, counter,
                      bonus_scale, eps, stride, padding, dilation, groups):
    """Shared body of the conv top-k ops; None when the reference must run."""
    cout = int(weight_shape[0])
    kk = int(weight_shape[1]) * int(weight_shape[2]) * int(weight_shape[3])
    grid = _score_grid(cout, kk, br, bc)
    _check_select(name, exclude, counter, grid, k)
    t = configs.tiling(br, bc, allow_block_path=False)
    if t is None or not supported(dy, x) or not _fits(grid) or cout * kk == 0:
        return None
    geo = conv_geometry(x, dy, weight_shape, stride, padding, dilation, groups)
    m2 = mask.reshape(cout, kk) if mask is not None else None
    return weight_side(dy, x, (cout, kk), m2, topo, t, geo, exclude, k, counter, bonus_scale,
                       eps)


def conv2d_grow_topk(dy: Tensor, x: Tensor, exclude: Tensor, k: int, counter: Optional[Tensor],
                     bonus_scale: float, eps: float, br: int, bc: int, weight_shape: list[int],
                     stride: list[int], padding: list[int], dilation: list[int],
                     groups: int) -> tuple[Tensor, Tensor]:
    """:func:`grow_topk` for :func:`conv2d`'s weight gradient on its 2-D view."""
    torch._check(x.dim() == 4 and dy.dim() == 4,
                 lambda: f"conv2d_grow_topk: x and dy must be 4-D, got {x.dim()}-D, {dy.dim()}-D")
    _pairs("conv2d_grow_topk", stride=stride, padding=padding, dilation=dilation)
    out = _weight_side_conv("conv2d_grow_topk", dy, x, weight_shape, None, None, br, bc, exclude,
                            k, counter, bonus_scale, eps, stride, padding, dilation, groups)
    if out is None:
        return ref.conv2d_grow_topk(dy, x, exclude, k, counter, bonus_scale, eps, br, bc,
                                    weight_shape, stride, padding, dilation, groups)
    return out[1], out[2]


def conv2d_fused_weight_grad(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int,
                             bc: int, exclude: Tensor, k: int, counter: Optional[Tensor],
                             bonus_scale: float, eps: float, stride: list[int],
                             padding: list[int], dilation: list[int],
                             groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`conv2d_sddmm` and :func:`conv2d_grow_topk` from one pass."""
    _check_conv("conv2d_fused_weight_grad", x, mask, groups, stride, padding, dilation)
    out = _weight_side_conv("conv2d_fused_weight_grad", dy, x, mask.shape, mask, topo, br, bc,
                            exclude, k, counter, bonus_scale, eps, stride, padding, dilation,
                            groups)
    if out is None:
        return ref.conv2d_fused_weight_grad(dy, x, mask, topo, br, bc, exclude, k, counter,
                                            bonus_scale, eps, stride, padding, dilation, groups)
    return out
