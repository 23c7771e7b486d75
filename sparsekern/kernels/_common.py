"""Pieces shared by the Triton kernels: operand loaders (plain 2-D or implicit-GEMM conv), the
masked weight-tile loader, the topology slot search, the weight-side GEMM tile, and the host-side
geometry that feeds them.

Operand views (``G = dyᵀ x`` is the weight gradient on the 2-D view ``[M, K]``):

* ``x`` as ``[NP, K]``: linear ``x[b, k]``; conv: the implicit im2col of ``x`` (row = output
  pixel ``(n, oh, ow)``, column = ``(ci, ky, kx)`` in PyTorch's weight order, the channel offset
  of the group added), never materialised.
* ``dy`` (or the forward output ``y``) as ``[NP, M]``: linear ``dy[b, m]``; conv
  ``dy[n, m, oh, ow]``.

Argument names: strides are ``stride_<tensor><dim>`` (tensors ``x``, ``y``, ``dy``, ``dx``, ``w``,
``mask``, ``excl``, ``cnt``; dims ``b``/``m``/``k`` of a 2-D view, ``n``/``c``/``h``/``w`` of an
NCHW tensor); conv sizes ``CIN_G``/``COUT_G`` (channels per group), ``KH, KW, H, W, OH, OW``, and
``conv_stride_*``, ``conv_pad_*``, ``conv_dil_*``. Launchers pass every int by keyword
(:meth:`Geometry.kwargs`), so a wrong or missing name raises a ``TypeError`` instead of shifting
the arguments after it.

Offsets: every ``index x stride`` product that can pass 2^31 is formed in int64 (rows x row
strides, columns x column strides of 2-D operands, images x image strides, slots x block size).
Offsets inside one image (channel, row, column of an NCHW tensor) stay int32: one image must
hold fewer than 2^31 elements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._util import conv_out_hw  # noqa: F401  (re-exported for the launchers)
from . import configs

# Conv geometry ints that change per layer but not the generated code: not specialised, so layers
# of different shapes share compiled kernels.
NO_SPECIALIZE = ("CIN_G", "COUT_G", "KH", "KW", "H", "W", "OH", "OW", "conv_stride_h",
                 "conv_stride_w", "conv_pad_h", "conv_pad_w", "conv_dil_h", "conv_dil_w")


# --------------------------------------------------------------------------- host side
@dataclass(frozen=True)
class Geometry:
    """How a kernel addresses ``x`` (as ``[NP, K]``) and the ``[NP, M]`` operand (``dy``, or the
    forward's output ``y``): 2-D strides for linear ops; NCHW strides and the conv shape (the
    2-D strides unused) for convolutions."""

    conv: bool
    np: int
    groups: int
    x_strides: tuple[int, int]  # x [B, K]
    d_strides: tuple[int, int]  # dy / y [B, M]
    x_strides_nchw: tuple[int, int, int, int] = (0, 0, 0, 0)
    d_strides_nchw: tuple[int, int, int, int] = (0, 0, 0, 0)
    cin_g: int = 1  # input channels per group
    cout_g: int = 1  # output channels per group
    kernel_hw: tuple[int, int] = (1, 1)
    input_hw: tuple[int, int] = (1, 1)
    output_hw: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def kwargs(self, d: str) -> dict:
        """The kernel arguments of this geometry by name; ``d`` is the kernel's name for the
        ``[NP, M]`` operand (``"y"`` or ``"dy"``)."""
        (xb, xk), (db, dm) = self.x_strides, self.d_strides
        xn, xc, xh, xw = self.x_strides_nchw
        dn, dc, dh, dw = self.d_strides_nchw
        named_d = {"b": db, "m": dm, "n": dn, "c": dc, "h": dh, "w": dw}
        return {"stride_xb": xb, "stride_xk": xk,
                "stride_xn": xn, "stride_xc": xc, "stride_xh": xh, "stride_xw": xw,
                **{f"stride_{d}{dim}": v for dim, v in named_d.items()},
                "CIN_G": self.cin_g, "COUT_G": self.cout_g,
                "KH": self.kernel_hw[0], "KW": self.kernel_hw[1],
                "H": self.input_hw[0], "W": self.input_hw[1],
                "OH": self.output_hw[0], "OW": self.output_hw[1],
                "conv_stride_h": self.stride[0], "conv_stride_w": self.stride[1],
                "conv_pad_h": self.padding[0], "conv_pad_w": self.padding[1],
                "conv_dil_h": self.dilation[0], "conv_dil_w": self.dilation[1]}


def linear_geometry(x: torch.Tensor, d: torch.Tensor) -> Geometry:
    """``x [B, K]`` and ``d [B, M]`` (``dy`` or the output ``y``)."""
    return Geometry(False, x.shape[0], 1, (x.stride(0), x.stride(1)), (d.stride(0), d.stride(1)))


def conv_geometry(x: torch.Tensor, d: torch.Tensor, weight_shape, stride, padding, dilation,
                  groups: int) -> Geometry:
    """``x [N, C_in, H, W]``, ``d [N, C_out, OH, OW]``, weight ``[C_out, C_in/g, kh, kw]``."""
    cout, cin_g, kh, kw = (int(v) for v in weight_shape)
    n, _, h, w = x.shape
    oh, ow = d.shape[2], d.shape[3]
    return Geometry(True, n * oh * ow, groups, (0, 0), (0, 0), tuple(x.stride()),
                    tuple(d.stride()), cin_g, cout // groups, (kh, kw), (h, w), (oh, ow),
                    (stride[0], stride[1]), (padding[0], padding[1]),
                    (dilation[0], dilation[1]))


def topo_nnzb(topo) -> int:
    """Number of active blocks of a topology ``[row_ptr, col_idx, col_ptr, row_idx, slot_t]``."""
    _, col_idx, _, _, _ = topo
    return col_idx.numel()


def slot_search_iters(nbc: int) -> int:
    """Binary-search steps that find any column in a block row of ``nbc`` columns."""
    return max(1, int(nbc).bit_length())


def tile_flags(topo: list[torch.Tensor], t: configs.Tiling, m: int, k: int) -> torch.Tensor:
    """``[n_tr * n_tc]`` int8: 1 where a tile of tiling ``t`` holds an active block of the
    topology. O(nnzb) work, no host sync."""
    row_ptr, col_idx, _, row_idx, slot_t = topo
    n_tr, n_tc = t.grid(m, k)
    flags = torch.zeros(n_tr * n_tc, dtype=torch.int8, device=row_ptr.device)
    if row_idx.numel():
        cols = col_idx.long()[slot_t.long()]
        flags[(row_idx.long() // t.tmb) * n_tc + cols // t.tkb] = 1
    return flags


def mask_u8(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8, the form kernels read through its strides: contiguous, or a
    constant expanded from one element (every stride 0, e.g. a ``bsr`` layer's all-true view),
    which is read in place so that no ``M·K`` temporary exists."""
    if mask.numel() == 0 or any(s != 0 for s in mask.stride()):
        mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# --------------------------------------------------------------------------- device side
@triton.jit
def _pixel_base(offs_p, OH, OW, stride_n, stride_h, stride_w):
    """int64 offset of output pixel ``p = (n, oh, ow)`` in an ``[N, C, OH, OW]`` tensor."""
    ohw = OH * OW
    n = offs_p // ohw
    rem = offs_p - n * ohw
    oh = rem // OW
    ow = rem - oh * OW
    return n.to(tl.int64) * stride_n + oh * stride_h + ow * stride_w


@triton.jit
def _x_tile(x_ptr, offs_p, p_ok, offs_k, k_ok, grp, stride_xb, stride_xk, stride_xn, stride_xc,
            stride_xh, stride_xw, CIN_G, KH, KW, H, W, OH, OW, conv_stride_h, conv_stride_w,
            conv_pad_h, conv_pad_w, conv_dil_h, conv_dil_w, CONV: tl.constexpr):
    """``x`` viewed as ``[NP, K]``, rows ``offs_p`` x columns ``offs_k`` (0 outside)."""
    ok = p_ok[:, None] & k_ok[None, :]
    if CONV:
        ohw = OH * OW
        n = offs_p // ohw
        rem = offs_p - n * ohw
        oh = rem // OW
        ow = rem - oh * OW
        khw = KH * KW
        ci = offs_k // khw
        t = offs_k - ci * khw
        ky = t // KW
        kx = t - ky * KW
        ih = (oh * conv_stride_h - conv_pad_h)[:, None] + (ky * conv_dil_h)[None, :]
        iw = (ow * conv_stride_w - conv_pad_w)[:, None] + (kx * conv_dil_w)[None, :]
        ok = ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = (x_ptr + (n.to(tl.int64) * stride_xn)[:, None]
                + ((grp * CIN_G + ci) * stride_xc)[None, :] + ih * stride_xh + iw * stride_xw)
    else:
        ptrs = (x_ptr + (offs_p.to(tl.int64) * stride_xb)[:, None]
                + (offs_k.to(tl.int64) * stride_xk)[None, :])
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _dy_tile_t(dy_ptr, offs_m, m_ok, offs_p, p_ok, stride_dyb, stride_dym, stride_dyn,
               stride_dyc, stride_dyh, stride_dyw, OH, OW, CONV: tl.constexpr):
    """``dy`` viewed as ``[NP, M]``, loaded transposed: ``[len(offs_m), len(offs_p)]``."""
    ok = m_ok[:, None] & p_ok[None, :]
    if CONV:
        base = _pixel_base(offs_p, OH, OW, stride_dyn, stride_dyh, stride_dyw)
        ptrs = dy_ptr + base[None, :] + (offs_m * stride_dyc)[:, None]
    else:
        ptrs = (dy_ptr + (offs_p.to(tl.int64) * stride_dyb)[None, :]
                + (offs_m.to(tl.int64) * stride_dym)[:, None])
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _slot_lookup(row_ptr, col_idx, rb, cb, valid, n_iter):
    """CSR slot of block ``(rb, cb)`` (element-wise over same-shaped int tensors): lower bound
    of ``cb`` in the block row's sorted column list. Returns ``(slot, found)``."""
    lo = tl.load(row_ptr + rb, mask=valid, other=0)
    hi = tl.load(row_ptr + rb + 1, mask=valid, other=0)
    base = lo
    n = hi - lo
    for _ in range(n_iter):
        half = n // 2
        v = tl.load(col_idx + base + half, mask=n > 0, other=0)
        go = (n > 0) & (v < cb)
        base = tl.where(go, base + half + 1, base)
        n = tl.where(go, n - half - 1, half)
    hit = valid & (base < hi)
    v = tl.load(col_idx + base, mask=hit, other=-1)
    return base, hit & (v == cb)


@triton.jit
def _weff_tile(w_ptr, m_ptr, row_ptr, col_idx, offs_r, r_ok, offs_c, c_ok, slot,
               stride_wm, stride_wk, stride_maskm, stride_maskk, n_iter,
               BR: tl.constexpr, BC: tl.constexpr, W_MODE: tl.constexpr):
    """``(W ⊙ mask)[offs_r, offs_c]``: exact zeros where inactive (values are selected, never
    multiplied by the mask, so dormant NaN/inf weights cannot leak into products).

    W_MODE 0: dense storage ``w[M, K]``; 1: ``bsr`` values, the tile is block ``slot``;
    2: ``bsr`` values, each element's slot found by binary search in the topology."""
    ok = r_ok[:, None] & c_ok[None, :]
    rows64 = offs_r.to(tl.int64)
    m_offs = (rows64 * stride_maskm)[:, None] + (offs_c.to(tl.int64) * stride_maskk)[None, :]
    on = tl.load(m_ptr + m_offs, mask=ok, other=0)
    on = ok & (on != 0)
    # W_MODE 0/1 load under the bounds mask (vectorisable) and then select
    if W_MODE == 0:
        w_offs = (rows64 * stride_wm)[:, None] + (offs_c.to(tl.int64) * stride_wk)[None, :]
        w = tl.load(w_ptr + w_offs, mask=ok, other=0.0)
        w = tl.where(on, w, tl.zeros_like(w))
    else:
        inner = ((offs_r % BR) * BC)[:, None] + (offs_c % BC)[None, :]
        if W_MODE == 1:
            # ``slot`` may be a plain int under the interpreter: multiply by an int64 constant
            w = tl.load(w_ptr + slot * tl.full((), BR * BC, tl.int64) + inner, mask=ok,
                        other=0.0)
            w = tl.where(on, w, tl.zeros_like(w))
        else:
            rb = tl.broadcast_to((offs_r // BR)[:, None], on.shape)
            cb = tl.broadcast_to((offs_c // BC)[None, :], on.shape)
            s, found = _slot_lookup(row_ptr, col_idx, rb, cb, on, n_iter)
            w = tl.load(w_ptr + s.to(tl.int64) * (BR * BC) + inner, mask=found, other=0.0)
    return w


@triton.jit
def _dot_x(acc, other, offs_r, g_lo, g_hi, x_ptr, offs_p, p_ok, offs_k, k_ok, stride_xb,
           stride_xk, stride_xn, stride_xc, stride_xh, stride_xw, CIN_G, COUT_G, KH, KW, H, W,
           OH, OW, conv_stride_h, conv_stride_w, conv_pad_h, conv_pad_w, conv_dil_h,
           conv_dil_w, X_LEFT: tl.constexpr, CONV: tl.constexpr, GROUPED: tl.constexpr,
           DOT: tl.constexpr, PREC: tl.constexpr):
    """``acc += x[offs_p, offs_k] @ otherᵀ`` (``X_LEFT``) or ``acc += other @ x[offs_p, offs_k]``,
    where row ``i`` of ``other`` belongs to weight row ``offs_r[i]``. Grouped convolutions read a
    different ``x`` slice per group, so the product runs once per group in ``[g_lo, g_hi]`` with
    the rows of other groups zeroed."""
    if GROUPED:
        rgrp = offs_r // COUT_G
        for grp in range(g_lo, g_hi + 1):
            xt = _x_tile(x_ptr, offs_p, p_ok, offs_k, k_ok, grp, stride_xb=stride_xb,
                         stride_xk=stride_xk, stride_xn=stride_xn, stride_xc=stride_xc,
                         stride_xh=stride_xh, stride_xw=stride_xw, CIN_G=CIN_G, KH=KH, KW=KW,
                         H=H, W=W, OH=OH, OW=OW, conv_stride_h=conv_stride_h,
                         conv_stride_w=conv_stride_w, conv_pad_h=conv_pad_h,
                         conv_pad_w=conv_pad_w, conv_dil_h=conv_dil_h, conv_dil_w=conv_dil_w,
                         CONV=CONV).to(DOT)
            og = tl.where((rgrp == grp)[:, None], other, tl.zeros_like(other))
            if X_LEFT:
                acc = tl.dot(xt, tl.trans(og), acc, input_precision=PREC)
            else:
                acc = tl.dot(og, xt, acc, input_precision=PREC)
    else:
        xt = _x_tile(x_ptr, offs_p, p_ok, offs_k, k_ok, 0, stride_xb=stride_xb,
                     stride_xk=stride_xk, stride_xn=stride_xn, stride_xc=stride_xc,
                     stride_xh=stride_xh, stride_xw=stride_xw, CIN_G=CIN_G, KH=KH, KW=KW, H=H,
                     W=W, OH=OH, OW=OW, conv_stride_h=conv_stride_h,
                     conv_stride_w=conv_stride_w, conv_pad_h=conv_pad_h, conv_pad_w=conv_pad_w,
                     conv_dil_h=conv_dil_h, conv_dil_w=conv_dil_w, CONV=CONV).to(DOT)
        if X_LEFT:
            acc = tl.dot(xt, tl.trans(other), acc, input_precision=PREC)
        else:
            acc = tl.dot(other, xt, acc, input_precision=PREC)
    return acc


@triton.jit
def _wgrad_gemm(dy_ptr, x_ptr, offs_r, r_ok, offs_c, c_ok, g_lo, g_hi, NP, stride_xb,
                stride_xk, stride_xn, stride_xc, stride_xh, stride_xw, stride_dyb, stride_dym,
                stride_dyn, stride_dyc, stride_dyh, stride_dyw, CIN_G, COUT_G, KH, KW, H, W, OH,
                OW, conv_stride_h, conv_stride_w, conv_pad_h, conv_pad_w, conv_dil_h,
                conv_dil_w, PM: tl.constexpr, PK: tl.constexpr, BP: tl.constexpr,
                CONV: tl.constexpr, GROUPED: tl.constexpr, DOT: tl.constexpr,
                PREC: tl.constexpr):
    """``G[offs_r, offs_c] = dyᵀ x`` over all ``NP`` rows, fp32, in a fixed order (no split)."""
    acc = tl.zeros((PM, PK), dtype=tl.float32)
    for p0 in range(0, NP, BP):
        offs_p = p0 + tl.arange(0, BP)
        p_ok = offs_p < NP
        a = _dy_tile_t(dy_ptr, offs_r, r_ok, offs_p, p_ok, stride_dyb=stride_dyb,
                       stride_dym=stride_dym, stride_dyn=stride_dyn, stride_dyc=stride_dyc,
                       stride_dyh=stride_dyh, stride_dyw=stride_dyw, OH=OH, OW=OW,
                       CONV=CONV).to(DOT)
        acc = _dot_x(acc, a, offs_r, g_lo, g_hi, x_ptr, offs_p, p_ok, offs_c, c_ok,
                     stride_xb=stride_xb, stride_xk=stride_xk, stride_xn=stride_xn,
                     stride_xc=stride_xc, stride_xh=stride_xh, stride_xw=stride_xw, CIN_G=CIN_G,
                     COUT_G=COUT_G, KH=KH, KW=KW, H=H, W=W, OH=OH, OW=OW,
                     conv_stride_h=conv_stride_h, conv_stride_w=conv_stride_w,
                     conv_pad_h=conv_pad_h, conv_pad_w=conv_pad_w, conv_dil_h=conv_dil_h,
                     conv_dil_w=conv_dil_w, X_LEFT=False, CONV=CONV, GROUPED=GROUPED, DOT=DOT,
                     PREC=PREC)
    return acc


@triton.jit
def _group_range(r0, r_end, M, COUT_G, GROUPED: tl.constexpr):
    """First and last conv group of weight rows ``[r0, min(r_end, M))``."""
    if GROUPED:
        g_lo = r0 // COUT_G
        g_hi = (tl.minimum(r_end, M) - 1) // COUT_G
    else:
        g_lo = 0
        g_hi = 0
    return g_lo, g_hi
