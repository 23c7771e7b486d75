"""Block-sparse forward ``y = x @ (W ⊙ mask)ᵀ`` and grad_input ``dx = dy @ (W ⊙ mask)``.

One program per (batch tile, weight tile row) — (batch tile, weight tile column) for grad_input
— that loops only over the active tiles of its row (column): the topology's CSR (CSC, with the
slot indirection, no data transpose) on the block path, or the per-tile flags on the tile path.
The mask is applied inside each tile, so element masks work at tile granularity. The forward
kernel also runs convolutions (``CONV``): its ``x`` operand is then the implicit im2col of the
input and its output is written NCHW.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference as ref
from . import configs
from ._common import (NO_SPECIALIZE, Geometry, _dot_x, _group_range, _pixel_base, _weff_tile,
                      linear_geometry, mask_u8, slot_search_iters, tile_flags, topo_nnzb)


def _autotune(configs_fn, key, prune=None):
    """``triton.autotune`` over ``configs_fn()`` (one config under the interpreter)."""
    def wrap(fn):
        extra = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}
        return triton.autotune(configs=configs_fn(), key=key, **extra)(fn)
    return wrap


@_autotune(configs.spmm_configs, key=["NP_KEY", "M", "K", "BR", "BC", "USE_CSR", "W_MODE",
                                       "CONV", "GROUPED"], prune=configs.prune_spmm)
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _spmm_kernel(x_ptr, w_ptr, m_ptr, y_ptr, row_ptr, col_idx, flags_ptr,
                 NP, M, K, n_tc, n_iter, stride_wm, stride_wk, stride_maskm, stride_maskk,
                 stride_xb, stride_xk, stride_xn, stride_xc, stride_xh, stride_xw,
                 stride_yb, stride_ym, stride_yn, stride_yc, stride_yh, stride_yw,
                 CIN_G, COUT_G, KH, KW, H, W, OH, OW, conv_stride_h, conv_stride_w, conv_pad_h,
                 conv_pad_w, conv_dil_h, conv_dil_w, NP_KEY,
                 BR: tl.constexpr, BC: tl.constexpr, RT: tl.constexpr, CT: tl.constexpr,
                 PM: tl.constexpr, PK: tl.constexpr, BM: tl.constexpr,
                 USE_CSR: tl.constexpr, W_MODE: tl.constexpr, CONV: tl.constexpr,
                 GROUPED: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``y[NP, M] = x[NP, K] @ (W ⊙ mask)ᵀ`` (conv: ``x`` is the implicit im2col, ``y`` NCHW).

    Grid ``(cdiv(NP, BM), n_tile_rows)``; each program owns a ``BM x RT`` output tile and loops
    over the active ``RT x CT`` weight tiles of its tile row; fp32 accumulation."""
    pid_a = tl.program_id(0)
    tr = tl.program_id(1)
    offs_a = pid_a * BM + tl.arange(0, BM)
    a_ok = offs_a < NP
    lr = tl.arange(0, PM)
    offs_r = tr * RT + lr
    r_ok = (lr < RT) & (offs_r < M)
    lc = tl.arange(0, PK)
    g_lo, g_hi = _group_range(tr * RT, tr * RT + RT, M, COUT_G, GROUPED)
    acc = tl.zeros((BM, PM), dtype=tl.float32)
    if USE_CSR:
        start = tl.load(row_ptr + tr)
        end = tl.load(row_ptr + tr + 1)
    else:
        start = 0
        end = n_tc
    for q in range(start, end):
        if USE_CSR:
            tc = tl.load(col_idx + q)
            active = True
        else:
            tc = q
            active = tl.load(flags_ptr + tr * n_tc + q) != 0
        if active:
            offs_c = tc * CT + lc
            c_ok = (lc < CT) & (offs_c < K)
            wt = _weff_tile(w_ptr, m_ptr, row_ptr, col_idx, offs_r, r_ok, offs_c, c_ok, q,
                            stride_wm, stride_wk, stride_maskm, stride_maskk, n_iter, BR, BC,
                            W_MODE).to(DOT)
            acc = _dot_x(acc, wt, offs_r, g_lo, g_hi, x_ptr, offs_a, a_ok, offs_c, c_ok,
                         stride_xb=stride_xb, stride_xk=stride_xk, stride_xn=stride_xn,
                         stride_xc=stride_xc, stride_xh=stride_xh, stride_xw=stride_xw,
                         CIN_G=CIN_G, COUT_G=COUT_G, KH=KH, KW=KW, H=H, W=W, OH=OH, OW=OW,
                         conv_stride_h=conv_stride_h, conv_stride_w=conv_stride_w,
                         conv_pad_h=conv_pad_h, conv_pad_w=conv_pad_w, conv_dil_h=conv_dil_h,
                         conv_dil_w=conv_dil_w, X_LEFT=True, CONV=CONV, GROUPED=GROUPED,
                         DOT=DOT, PREC=PREC)
    ok = a_ok[:, None] & r_ok[None, :]
    if CONV:
        ptrs = (y_ptr + _pixel_base(offs_a, OH, OW, stride_yn, stride_yh, stride_yw)[:, None]
                + (offs_r * stride_yc)[None, :])
    else:
        ptrs = (y_ptr + (offs_a.to(tl.int64) * stride_yb)[:, None]
                + (offs_r.to(tl.int64) * stride_ym)[None, :])
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@_autotune(configs.spmm_configs, key=["NP_KEY", "M", "K", "BR", "BC", "USE_CSR", "W_MODE"],
           prune=configs.prune_spmm)
@triton.jit
def _spmm_t_kernel(dy_ptr, w_ptr, m_ptr, dx_ptr, row_ptr, col_idx, col_ptr, row_idx, slot_t,
                   flags_ptr, NP, M, K, n_tr, n_tc, n_iter, stride_wm, stride_wk, stride_maskm,
                   stride_maskk, stride_dyb, stride_dym, stride_dxb, stride_dxk, NP_KEY,
                   BR: tl.constexpr, BC: tl.constexpr, RT: tl.constexpr, CT: tl.constexpr,
                   PM: tl.constexpr, PK: tl.constexpr, BM: tl.constexpr,
                   USE_CSR: tl.constexpr, W_MODE: tl.constexpr, DOT: tl.constexpr,
                   PREC: tl.constexpr):
    """``dx[NP, K] = dy[NP, M] @ (W ⊙ mask)``.

    Grid ``(cdiv(NP, BM), n_tile_cols)``; each program owns a ``BM x CT`` tile of ``dx`` and walks
    the active tiles of its tile column (CSC + slot indirection, or flags)."""
    pid_b = tl.program_id(0)
    tc = tl.program_id(1)
    offs_b = pid_b * BM + tl.arange(0, BM)
    b_ok = offs_b < NP
    lc = tl.arange(0, PK)
    offs_c = tc * CT + lc
    c_ok = (lc < CT) & (offs_c < K)
    lr = tl.arange(0, PM)
    acc = tl.zeros((BM, PK), dtype=tl.float32)
    if USE_CSR:
        start = tl.load(col_ptr + tc)
        end = tl.load(col_ptr + tc + 1)
    else:
        start = 0
        end = n_tr
    for q in range(start, end):
        if USE_CSR:
            tr = tl.load(row_idx + q)
            slot = tl.load(slot_t + q)
            active = True
        else:
            tr = q
            slot = q
            active = tl.load(flags_ptr + q * n_tc + tc) != 0
        if active:
            offs_r = tr * RT + lr
            r_ok = (lr < RT) & (offs_r < M)
            wt = _weff_tile(w_ptr, m_ptr, row_ptr, col_idx, offs_r, r_ok, offs_c, c_ok, slot,
                            stride_wm, stride_wk, stride_maskm, stride_maskk, n_iter, BR, BC,
                            W_MODE).to(DOT)
            d_offs = ((offs_b.to(tl.int64) * stride_dyb)[:, None]
                      + (offs_r.to(tl.int64) * stride_dym)[None, :])
            d = tl.load(dy_ptr + d_offs, mask=b_ok[:, None] & r_ok[None, :], other=0.0).to(DOT)
            acc = tl.dot(d, wt, acc, input_precision=PREC)
    tl.store(dx_ptr + (offs_b.to(tl.int64) * stride_dxb)[:, None]
             + (offs_c.to(tl.int64) * stride_dxk)[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=b_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------- launch helpers
def supported(*tensors: Tensor) -> bool:
    """Triton runs fp32/fp16/bf16; other dtypes (fp64) go to the reference."""
    return all(t.dtype in configs.SUPPORTED_DTYPES for t in tensors)


def weight_operand(w: Tensor, t: configs.Tiling, m: int, k: int, nnzb: int):
    """``(W_MODE, tensor, stride_m, stride_k)`` for a dense-layout weight (any shape holding
    ``m * k`` entries) or ``bsr`` values ``[nnzb, br, bc]``."""
    if w.dim() == 3:
        if tuple(w.shape) != (nnzb, t.br, t.bc):
            raise ValueError(f"bsr values must have shape {(nnzb, t.br, t.bc)}, "
                             f"got {tuple(w.shape)}")
        return (1 if t.block_path else 2), w.contiguous(), 0, 0
    w2 = w.reshape(m, k)
    return 0, w2, w2.stride(0), w2.stride(1)


def _flags(topo, t, m, k, device):
    if t.block_path:
        return torch.zeros(1, dtype=torch.int8, device=device)
    return tile_flags(topo, t, m, k)


def launch_spmm(a: Tensor, w: Tensor, mask2d: Tensor, topo: list[Tensor], t: configs.Tiling,
                y: Tensor, geo: Geometry) -> Tensor:
    """Fill ``y`` with ``a @ (W ⊙ mask)ᵀ`` (``a``/``y`` addressed through ``geo``)."""
    row_ptr, col_idx, _, _, _ = topo
    m, k = mask2d.shape
    w_mode, w_arg, stride_wm, stride_wk = weight_operand(w, t, m, k, col_idx.numel())
    n_tr, n_tc = t.grid(m, k)
    dot = configs.dot_dtype(a.dtype, w.dtype)
    mk = mask_u8(mask2d)
    grid = lambda meta: (triton.cdiv(geo.np, meta["BM"]), n_tr)  # noqa: E731
    _spmm_kernel[grid](
        a, w_arg, mk, y, row_ptr, col_idx, _flags(topo, t, m, k, a.device),
        NP=geo.np, M=m, K=k, n_tc=n_tc, n_iter=slot_search_iters(triton.cdiv(k, t.bc)),
        stride_wm=stride_wm, stride_wk=stride_wk, stride_maskm=mk.stride(0),
        stride_maskk=mk.stride(1), **geo.kwargs("y"), NP_KEY=configs.next_pow2(geo.np),
        **t.constexprs(), USE_CSR=t.block_path, W_MODE=w_mode, CONV=geo.conv,
        GROUPED=geo.groups > 1, DOT=dot, PREC=configs.dot_precision(), enable_fp_fusion=True)
    return y


def _check_linear(name: str, a: Tensor, w: Tensor, mask: Tensor, topo, a_dim: int):
    torch._check(a.dim() == 2, lambda: f"{name}: input must be 2-D, got {a.dim()}-D")
    torch._check(mask.dim() == 2, lambda: f"{name}: mask must be 2-D, got {mask.dim()}-D")
    torch._check(a.shape[1] == mask.shape[a_dim],
                 lambda: f"{name}: input has {a.shape[1]} features, mask shape is "
                         f"{tuple(mask.shape)}")
    torch._check(len(topo) == 5, lambda: f"{name}: topo must hold 5 tensors, got {len(topo)}")
    if w.dim() == 2:
        torch._check(w.shape == mask.shape, lambda: f"{name}: weight must have the mask's shape "
                                                    f"{tuple(mask.shape)}, got {tuple(w.shape)}")


# --------------------------------------------------------------------------- launchers
def bsr_mm(x: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int) -> Tensor:
    """``x [B, K] @ (W ⊙ mask)ᵀ`` -> ``[B, M]`` (``w``: ``[M, K]`` or ``bsr`` values)."""
    _check_linear("bsr_mm", x, w, mask, topo, 1)
    t = configs.tiling(br, bc)
    if t is None or not supported(x, w):
        return ref.bsr_mm(x, w, mask, topo, br, bc)
    m, k = mask.shape
    y = torch.empty(x.shape[0], m, dtype=configs.store_dtype(x.dtype), device=x.device)
    if y.numel() == 0 or topo_nnzb(topo) == 0 or k == 0:
        return y.zero_().to(x.dtype)
    return launch_spmm(x, w, mask, topo, t, y, linear_geometry(x, y)).to(x.dtype)


def bsr_mm_t(dy: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int,
             bc: int) -> Tensor:
    """``dy [B, M] @ (W ⊙ mask)`` -> ``[B, K]``."""
    _check_linear("bsr_mm_t", dy, w, mask, topo, 0)
    t = configs.tiling(br, bc)
    if t is None or not supported(dy, w):
        return ref.bsr_mm_t(dy, w, mask, topo, br, bc)
    row_ptr, col_idx, col_ptr, row_idx, slot_t = topo
    m, k = mask.shape
    dx = torch.empty(dy.shape[0], k, dtype=configs.store_dtype(dy.dtype), device=dy.device)
    if dx.numel() == 0 or col_idx.numel() == 0 or m == 0:
        return dx.zero_().to(dy.dtype)
    w_mode, w_arg, stride_wm, stride_wk = weight_operand(w, t, m, k, col_idx.numel())
    n_tr, n_tc = t.grid(m, k)
    mk = mask_u8(mask)
    grid = lambda meta: (triton.cdiv(dy.shape[0], meta["BM"]), n_tc)  # noqa: E731
    _spmm_t_kernel[grid](
        dy, w_arg, mk, dx, row_ptr, col_idx, col_ptr, row_idx, slot_t,
        _flags(topo, t, m, k, dy.device), NP=dy.shape[0], M=m, K=k, n_tr=n_tr, n_tc=n_tc,
        n_iter=slot_search_iters(triton.cdiv(k, bc)), stride_wm=stride_wm, stride_wk=stride_wk,
        stride_maskm=mk.stride(0), stride_maskk=mk.stride(1), stride_dyb=dy.stride(0),
        stride_dym=dy.stride(1), stride_dxb=dx.stride(0), stride_dxk=dx.stride(1),
        NP_KEY=configs.next_pow2(dy.shape[0]), **t.constexprs(), USE_CSR=t.block_path,
        W_MODE=w_mode, DOT=configs.dot_dtype(dy.dtype, w.dtype), PREC=configs.dot_precision(),
        enable_fp_fusion=True)
    return dx.to(dy.dtype)
