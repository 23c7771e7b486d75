"""Weight-side kernels: ``G = dyᵀ x`` on a pattern (SDDMM), and the tile kernel that also scores
``G`` for the exact growth top-k (``topk.py`` drives its passes) without writing ``G``.

* ``_sddmm_block_kernel`` (block path, ``br, bc`` in 16..128): one program per active block
  (the topology's CSC list: row, slot), reduction over the batch (conv: over output pixels,
  implicit im2col), the block masked and stored to its slot.
* ``_wgrad_kernel``: one program per ``RT x CT`` tile of the weight view. ``PASS`` 0: SDDMM on
  the tile path (tiles without a pattern block exit at once; each element finds its slot by a
  binary search in the topology, so no dense slot map exists). ``PASS`` 1-3: the top-k passes
  (histogram + per-tile min/max of the composite key, histogram of a finer digit, collect);
  ``STORE_VALUES`` lets pass 1 write the SDDMM values too (the fused op).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference as ref
from . import configs
from ._common import (NO_SPECIALIZE, Geometry, _group_range, _slot_lookup, _wgrad_gemm,
                      linear_geometry, mask_u8, slot_search_iters, tile_flags)
from .bsr_mm import _autotune, supported

INT64_MAX = 2**63 - 1
HIST_BINS = 1 << configs.HIST_BITS
_BINS = tl.constexpr(HIST_BINS)  # the histogram width inside the kernel


@_autotune(configs.sddmm_block_configs, key=["NP_KEY", "M", "K", "BR", "BC", "CONV", "GROUPED"],
           prune=configs.prune_by_block)
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _sddmm_block_kernel(dy_ptr, x_ptr, m_ptr, vals_ptr, col_idx, row_idx, slot_t,
                        NP, M, K, stride_maskm, stride_maskk,
                        stride_xb, stride_xk, stride_xn, stride_xc, stride_xh, stride_xw,
                        stride_dyb, stride_dym, stride_dyn, stride_dyc, stride_dyh, stride_dyw,
                        CIN_G, COUT_G, KH, KW, H, W, OH, OW, conv_stride_h, conv_stride_w,
                        conv_pad_h, conv_pad_w, conv_dil_h, conv_dil_w, NP_KEY,
                        BR: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
                        CONV: tl.constexpr, GROUPED: tl.constexpr, DOT: tl.constexpr,
                        PREC: tl.constexpr):
    """``vals[slot] = (dyᵀ x)[block] ⊙ mask[block]`` for the active block of CSC entry
    ``program_id(0)``; ``vals`` is ``[nnzb, BR, BC]`` (ragged edges stored as 0)."""
    q = tl.program_id(0)
    rb = tl.load(row_idx + q)
    slot = tl.load(slot_t + q)
    cb = tl.load(col_idx + slot)
    lr = tl.arange(0, BR)
    lc = tl.arange(0, BC)
    offs_r = rb * BR + lr
    offs_c = cb * BC + lc
    r_ok = offs_r < M
    c_ok = offs_c < K
    g_lo, g_hi = _group_range(rb * BR, rb * BR + BR, M, COUT_G, GROUPED)
    acc = _wgrad_gemm(dy_ptr, x_ptr, offs_r, r_ok, offs_c, c_ok, g_lo, g_hi, NP,
                      stride_xb=stride_xb, stride_xk=stride_xk, stride_xn=stride_xn,
                      stride_xc=stride_xc, stride_xh=stride_xh, stride_xw=stride_xw,
                      stride_dyb=stride_dyb, stride_dym=stride_dym, stride_dyn=stride_dyn,
                      stride_dyc=stride_dyc, stride_dyh=stride_dyh, stride_dyw=stride_dyw,
                      CIN_G=CIN_G, COUT_G=COUT_G, KH=KH, KW=KW, H=H, W=W, OH=OH, OW=OW,
                      conv_stride_h=conv_stride_h, conv_stride_w=conv_stride_w,
                      conv_pad_h=conv_pad_h, conv_pad_w=conv_pad_w, conv_dil_h=conv_dil_h,
                      conv_dil_w=conv_dil_w, PM=BR, PK=BC, BP=BP, CONV=CONV, GROUPED=GROUPED,
                      DOT=DOT, PREC=PREC)
    ok = r_ok[:, None] & c_ok[None, :]
    m_offs = ((offs_r.to(tl.int64) * stride_maskm)[:, None]
              + (offs_c.to(tl.int64) * stride_maskk)[None, :])
    on = tl.load(m_ptr + m_offs, mask=ok, other=0) != 0
    out = tl.where(ok & on, acc, 0.0)
    tl.store(vals_ptr + slot.to(tl.int64) * (BR * BC) + (lr * BC)[:, None] + lc[None, :],
             out.to(vals_ptr.dtype.element_ty))


@triton.jit
def _store_block_values(vals_ptr, m_ptr, row_ptr, col_idx, acc, tr, tc, offs_r, r_ok, offs_c,
                        c_ok, stride_maskm, stride_maskk, n_iter, BR: tl.constexpr,
                        BC: tl.constexpr, RT: tl.constexpr, CT: tl.constexpr):
    """Store ``acc ⊙ mask`` at the topology slots of the tile's elements (pattern only)."""
    ok = r_ok[:, None] & c_ok[None, :]
    m_offs = ((offs_r.to(tl.int64) * stride_maskm)[:, None]
              + (offs_c.to(tl.int64) * stride_maskk)[None, :])
    on = ok & (tl.load(m_ptr + m_offs, mask=ok, other=0) != 0)
    inner = ((offs_r % BR) * BC)[:, None] + (offs_c % BC)[None, :]
    if RT == BR and CT == BC:
        # the tile is one block: one search per row (a vector: the interpreter mistypes scalar
        # masks built from scalar loads)
        rows = tl.zeros_like(offs_r) + tr
        slot_r, found_r = _slot_lookup(row_ptr, col_idx, rows, tc, rows >= 0, n_iter)
        slot = slot_r[:, None]
        store = on & found_r[:, None]
    else:
        rb = tl.broadcast_to((offs_r // BR)[:, None], on.shape)
        cb = tl.broadcast_to((offs_c // BC)[None, :], on.shape)
        slot, store = _slot_lookup(row_ptr, col_idx, rb, cb, on, n_iter)
    tl.store(vals_ptr + slot.to(tl.int64) * (BR * BC) + inner,
             acc.to(vals_ptr.dtype.element_ty), mask=store)


@triton.jit
def _growth_scores(acc, excl_ptr, cnt_ptr, tr, tc, offs_r, r_ok, offs_c, c_ok, M, K, NBR, NBC,
                   stride_exclm, stride_exclk, stride_cntm, stride_cntk, bonus_scale, eps,
                   BR: tl.constexpr, BC: tl.constexpr, RT: tl.constexpr, CT: tl.constexpr,
                   PM: tl.constexpr, PK: tl.constexpr, SM: tl.constexpr, SK: tl.constexpr,
                   HAS_COUNTER: tl.constexpr):
    """Growth scores of the tile on the score grid ``[NBR, NBC]`` (entries, or blocks):
    ``|G|`` (block mean by true block size) ``+ bonus_scale * (1 / (counter + eps))``, exactly as
    the reference rounds it. Returns ``(scores [SM, SK], flat index int64, valid)``."""
    if BR * BC == 1:
        s = tl.abs(acc)
        rows = offs_r
        cols = offs_c
        ok = r_ok[:, None] & c_ok[None, :]
    else:
        ls = tl.arange(0, SM)
        lk = tl.arange(0, SK)
        if RT == BR and CT == BC:
            # the tile is one block: a full reduction, the sum placed at score [0, 0]
            total = tl.sum(tl.sum(tl.abs(acc), axis=1), axis=0)
            corner = (ls == 0)[:, None] & (lk == 0)[None, :]
            ssum = tl.where(corner, total, 0.0)
        else:
            # whole blocks in the tile: two one-hot products (0/1 weights, fp32 FMA). A reshape
            # + reduce is shorter but trips an sm_90 compiler assertion (Triton 3.9).
            lr = tl.arange(0, PM)
            lc = tl.arange(0, PK)
            rsel = ((lr // BR)[None, :] == ls[:, None]) & (lr < RT)[None, :]
            csel = ((lc // BC)[:, None] == lk[None, :]) & (lc < CT)[:, None]
            part = tl.dot(rsel.to(tl.float32), tl.abs(acc), input_precision="ieee")
            ssum = tl.dot(part, csel.to(tl.float32), input_precision="ieee")
        rows = tr * (RT // BR) + ls
        cols = tc * (CT // BC) + lk
        ok = (((ls < RT // BR) & (rows < NBR))[:, None]
              & ((lk < CT // BC) & (cols < NBC))[None, :])
        rcnt = tl.minimum(M - rows * BR, BR)
        ccnt = tl.minimum(K - cols * BC, BC)
        cnt = (rcnt[:, None] * ccnt[None, :]).to(tl.float32)
        s = tl.div_rn(ssum, tl.where(ok, cnt, 1.0))
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ex = tl.load(excl_ptr + (rows64 * stride_exclm)[:, None] + (cols64 * stride_exclk)[None, :],
                 mask=ok, other=1)
    valid = ok & (ex == 0)
    if HAS_COUNTER:
        n = tl.load(cnt_ptr + (rows64 * stride_cntm)[:, None] + (cols64 * stride_cntk)[None, :],
                    mask=valid, other=0).to(tl.float32)
        s = s + bonus_scale * tl.div_rn(tl.zeros_like(n) + 1.0, n + eps)
    flat = (rows64 * NBC)[:, None] + cols[None, :]
    return s, flat, valid


@triton.jit
def _composite(s, flat):
    """Distinct int64 sort key: 32-bit order-preserving key of ``s`` (``-0`` folded to ``+0``,
    every NaN above ``+inf``) over 31 bits of ``2^31 - 1 - flat`` (ties: lower index wins)."""
    one = tl.full((), 1, tl.int64)
    low32 = (one << 32) - 1
    top = one << 31
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where((bits & 0x7FFFFFFF) == 0, 0, bits)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    u = bits.to(tl.int64) & low32
    key = tl.where(bits < 0, low32 - u, u + top)
    key = tl.where(nan, low32, key)
    return (key << 31) | ((top - 1) - flat)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _wgrad_kernel(dy_ptr, x_ptr, m_ptr, vals_ptr, row_ptr, col_idx, tflags_ptr,
                  excl_ptr, cnt_ptr, hist_ptr, tlo_ptr, thi_ptr, ncand_ptr, cand_ptr,
                  NP, M, K, NBR, NBC, n_tc, n_iter, cap, stride_maskm, stride_maskk,
                  stride_exclm, stride_exclk, stride_cntm, stride_cntk,
                  stride_xb, stride_xk, stride_xn, stride_xc, stride_xh, stride_xw,
                  stride_dyb, stride_dym, stride_dyn, stride_dyc, stride_dyh, stride_dyw,
                  CIN_G, COUT_G, KH, KW, H, W, OH, OW, conv_stride_h, conv_stride_w, conv_pad_h,
                  conv_pad_w, conv_dil_h, conv_dil_w,
                  bonus_scale, eps, lo_bound, hi_bound, shift_lo, digit_mask,
                  BR: tl.constexpr, BC: tl.constexpr, RT: tl.constexpr, CT: tl.constexpr,
                  PM: tl.constexpr, PK: tl.constexpr, SM: tl.constexpr, SK: tl.constexpr,
                  BP: tl.constexpr, PASS: tl.constexpr, STORE_VALUES: tl.constexpr,
                  HAS_COUNTER: tl.constexpr, CONV: tl.constexpr, GROUPED: tl.constexpr,
                  DOT: tl.constexpr, PREC: tl.constexpr):
    """One program per ``RT x CT`` tile of ``G = dyᵀ x`` (``[M, K]`` weight view), grid
    ``n_tile_rows * n_tile_cols`` on axis 0. ``G`` stays in registers.

    PASS 0: SDDMM (pattern tiles only). PASS 1: histogram of the top ``HIST_BITS`` bits of the
    composite keys ``c`` of valid (not excluded) scores + per-tile ``min/max c``. PASS 2:
    histogram of ``(c >> shift_lo) & digit_mask`` over ``lo_bound <= c <= hi_bound`` (tiles whose
    ``[min, max]`` misses that range skip the GEMM). PASS 3: append every ``c >= lo_bound`` to
    ``cand`` (atomic counter + cumsum slots)."""
    pid = tl.program_id(0)
    tr = pid // n_tc
    tc = pid - tr * n_tc
    lr = tl.arange(0, PM)
    lc = tl.arange(0, PK)
    offs_r = tr * RT + lr
    offs_c = tc * CT + lc
    r_ok = (lr < RT) & (offs_r < M)
    c_ok = (lc < CT) & (offs_c < K)
    if PASS == 0:
        run = tl.load(tflags_ptr + pid) != 0
    elif PASS == 1:
        run = True
    else:
        run = (tl.load(thi_ptr + pid) >= lo_bound) & (tl.load(tlo_ptr + pid) <= hi_bound)
    if run:
        g_lo, g_hi = _group_range(tr * RT, tr * RT + RT, M, COUT_G, GROUPED)
        acc = _wgrad_gemm(dy_ptr, x_ptr, offs_r, r_ok, offs_c, c_ok, g_lo, g_hi, NP,
                          stride_xb=stride_xb, stride_xk=stride_xk, stride_xn=stride_xn,
                          stride_xc=stride_xc, stride_xh=stride_xh, stride_xw=stride_xw,
                          stride_dyb=stride_dyb, stride_dym=stride_dym, stride_dyn=stride_dyn,
                          stride_dyc=stride_dyc, stride_dyh=stride_dyh, stride_dyw=stride_dyw,
                          CIN_G=CIN_G, COUT_G=COUT_G, KH=KH, KW=KW, H=H, W=W, OH=OH, OW=OW,
                          conv_stride_h=conv_stride_h, conv_stride_w=conv_stride_w,
                          conv_pad_h=conv_pad_h, conv_pad_w=conv_pad_w, conv_dil_h=conv_dil_h,
                          conv_dil_w=conv_dil_w, PM=PM, PK=PK, BP=BP, CONV=CONV, GROUPED=GROUPED,
                          DOT=DOT, PREC=PREC)
        if STORE_VALUES:
            _store_block_values(vals_ptr, m_ptr, row_ptr, col_idx, acc, tr, tc, offs_r, r_ok,
                                offs_c, c_ok, stride_maskm, stride_maskk, n_iter, BR, BC, RT, CT)
        if PASS >= 1:
            s, flat, valid = _growth_scores(acc, excl_ptr, cnt_ptr, tr, tc, offs_r, r_ok,
                                            offs_c, c_ok, M, K, NBR, NBC, stride_exclm,
                                            stride_exclk, stride_cntm, stride_cntk, bonus_scale,
                                            eps, BR, BC, RT, CT, PM, PK, SM, SK, HAS_COUNTER)
            c = _composite(s, flat)
            if PASS == 1:
                tl.store(tlo_ptr + pid, tl.min(tl.where(valid, c, 9223372036854775807)))
                tl.store(thi_ptr + pid, tl.max(tl.where(valid, c, -1)))
            if PASS <= 2:
                sel = valid & (c >= lo_bound) & (c <= hi_bound)
                digit = ((c >> shift_lo) & digit_mask).to(tl.int32)
                h = tl.histogram(tl.reshape(digit, (SM * SK,)), _BINS,
                                 mask=tl.reshape(sel, (SM * SK,)))
                tl.atomic_add(hist_ptr + tl.arange(0, _BINS), h, mask=h > 0)
            else:
                sel = tl.reshape((valid & (c >= lo_bound)).to(tl.int32), (SM * SK,))
                base = tl.atomic_add(ncand_ptr, tl.sum(sel, axis=0))
                pos = base + tl.cumsum(sel, axis=0) - 1
                tl.store(cand_ptr + pos, tl.reshape(c, (SM * SK,)), mask=(sel != 0) & (pos < cap))


# --------------------------------------------------------------------------- host side
@dataclass
class Selection:
    """Buffers and scoring inputs of a top-k select (all O(k + tiles))."""

    exclude: Tensor  # uint8 view of the bool exclude grid [NBR, NBC]
    counter: Optional[Tensor]
    bonus_scale: float
    eps: float
    cap: int
    n_tiles: int
    device: torch.device
    hist: Tensor = field(init=False)
    tile_lo: Tensor = field(init=False)
    tile_hi: Tensor = field(init=False)
    ncand: Tensor = field(init=False)
    cand: Tensor = field(init=False)

    def __post_init__(self):
        dev = self.device
        self.hist = torch.zeros(HIST_BINS, dtype=torch.int32, device=dev)
        self.tile_lo = torch.empty(self.n_tiles, dtype=torch.int64, device=dev)
        self.tile_hi = torch.empty(self.n_tiles, dtype=torch.int64, device=dev)
        self.ncand = torch.zeros(1, dtype=torch.int32, device=dev)
        self.cand = torch.empty(self.cap, dtype=torch.int64, device=dev)


def _dummy(device, dtype):
    return torch.zeros(1, dtype=dtype, device=device)


def launch_wgrad(dy: Tensor, x: Tensor, shape: tuple[int, int], mask2d: Optional[Tensor],
                 topo: Optional[list[Tensor]], t: configs.Tiling, geo: Geometry, *,
                 pass_id: int, vals: Optional[Tensor] = None, sel: Optional[Selection] = None,
                 lo_bound: int = 0, hi_bound: int = INT64_MAX, shift_lo: int = 0,
                 digit_mask: int = 0) -> None:
    """One launch of ``_wgrad_kernel`` over every tile of the ``[M, K] = shape`` weight view.
    ``mask2d`` and ``topo`` are needed only when values are stored (pass 0, or pass 1 with
    ``vals``)."""
    m, k = shape
    n_tr, n_tc = t.grid(m, k)
    dev = x.device
    store = vals is not None and pass_id <= 1
    if store:
        row_ptr, col_idx, _, _, _ = topo
        mk = mask_u8(mask2d)
        stride_maskm, stride_maskk = mk.stride(0), mk.stride(1)
    else:
        mk, row_ptr, col_idx = (_dummy(dev, torch.uint8), _dummy(dev, torch.int32),
                                _dummy(dev, torch.int32))
        stride_maskm = stride_maskk = 0
    flags = tile_flags(topo, t, m, k) if pass_id == 0 else _dummy(dev, torch.int8)
    if sel is None:
        excl, cnt = _dummy(dev, torch.uint8).view(1, 1), _dummy(dev, torch.int32).view(1, 1)
        bufs = dict(hist_ptr=_dummy(dev, torch.int32), tlo_ptr=_dummy(dev, torch.int64),
                    thi_ptr=_dummy(dev, torch.int64), ncand_ptr=_dummy(dev, torch.int32),
                    cand_ptr=_dummy(dev, torch.int64))
        nbr, nbc, cap, bonus, eps = m, k, 0, 0.0, 1.0
    else:
        excl = sel.exclude
        cnt = sel.counter if sel.counter is not None else _dummy(dev, torch.int32).view(1, 1)
        bufs = dict(hist_ptr=sel.hist, tlo_ptr=sel.tile_lo, thi_ptr=sel.tile_hi,
                    ncand_ptr=sel.ncand, cand_ptr=sel.cand)
        nbr, nbc = excl.shape
        cap, bonus, eps = sel.cap, sel.bonus_scale, sel.eps
    cfg = configs.wgrad_config(t)
    _wgrad_kernel[(n_tr * n_tc,)](
        dy, x, mk, vals if store else _dummy(dev, x.dtype), row_ptr, col_idx, flags,
        excl, cnt, **bufs, NP=geo.np, M=m, K=k, NBR=nbr, NBC=nbc, n_tc=n_tc,
        n_iter=slot_search_iters(triton.cdiv(k, t.bc)), cap=cap, stride_maskm=stride_maskm,
        stride_maskk=stride_maskk, stride_exclm=excl.stride(0), stride_exclk=excl.stride(1),
        stride_cntm=cnt.stride(0), stride_cntk=cnt.stride(1), **geo.kwargs("dy"),
        bonus_scale=float(bonus), eps=float(eps), lo_bound=lo_bound, hi_bound=hi_bound,
        shift_lo=shift_lo, digit_mask=digit_mask, **t.constexprs(), SM=t.sm, SK=t.sk,
        BP=cfg["BP"], PASS=pass_id, STORE_VALUES=store,
        HAS_COUNTER=sel is not None and sel.counter is not None, CONV=geo.conv,
        GROUPED=geo.groups > 1, DOT=configs.dot_dtype(dy.dtype, x.dtype),
        PREC=configs.dot_precision(), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], enable_fp_fusion=False)


def launch_sddmm(dy: Tensor, x: Tensor, mask2d: Tensor, topo: list[Tensor], t: configs.Tiling,
                 geo: Geometry) -> Tensor:
    """``[nnzb, br, bc]`` values of ``(dyᵀ x) ⊙ mask`` on the topology's blocks."""
    _, col_idx, _, row_idx, slot_t = topo
    m, k = mask2d.shape
    nnzb = col_idx.numel()
    store = configs.store_dtype(x.dtype)
    if not t.block_path:
        vals = torch.zeros(nnzb, t.br, t.bc, dtype=store, device=x.device)
        if nnzb:
            launch_wgrad(dy, x, (m, k), mask2d, topo, t, geo, pass_id=0, vals=vals)
        return vals.to(x.dtype)
    vals = torch.empty(nnzb, t.br, t.bc, dtype=store, device=x.device)
    if nnzb == 0:
        return vals.to(x.dtype)
    mk = mask_u8(mask2d)
    _sddmm_block_kernel[(nnzb,)](
        dy, x, mk, vals, col_idx, row_idx, slot_t, NP=geo.np, M=m, K=k,
        stride_maskm=mk.stride(0), stride_maskk=mk.stride(1), **geo.kwargs("dy"),
        NP_KEY=configs.next_pow2(geo.np), BR=t.br, BC=t.bc, CONV=geo.conv,
        GROUPED=geo.groups > 1, DOT=configs.dot_dtype(dy.dtype, x.dtype),
        PREC=configs.dot_precision(), enable_fp_fusion=True)
    return vals.to(x.dtype)


def sddmm(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int) -> Tensor:
    """``(dyᵀ x) ⊙ mask`` on the topology's blocks -> ``[nnzb, br, bc]`` (``x``'s dtype)."""
    torch._check(dy.dim() == 2 and x.dim() == 2,
                 lambda: f"sddmm: dy and x must be 2-D, got {dy.dim()}-D and {x.dim()}-D")
    torch._check(dy.shape[0] == x.shape[0],
                 lambda: f"sddmm: dy and x disagree on the batch: {dy.shape[0]} vs {x.shape[0]}")
    torch._check(tuple(mask.shape) == (dy.shape[1], x.shape[1]),
                 lambda: f"sddmm: mask must have shape {(dy.shape[1], x.shape[1])}, "
                         f"got {tuple(mask.shape)}")
    t = configs.tiling(br, bc)
    if t is None or not supported(dy, x):
        return ref.sddmm(dy, x, mask, topo, br, bc)
    return launch_sddmm(dy, x, mask, topo, t, linear_geometry(x, dy))
