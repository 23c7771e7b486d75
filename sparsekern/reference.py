"""Plain-PyTorch meaning of every sparsekern op: the oracle for every kernel, and the
``reference`` backend.

``topo`` holds ``(row_ptr, col_idx, col_ptr, row_idx, slot_t)`` of a
:class:`~sparsekern.topology.Topology` (its ``.tensors``, or a list in that order). Linear ops work on the 2-D view: ``x [B, K]``, ``dy [B, M]``, weight ``W [M, K]`` (``dense``
layout) or ``values [nnzb, br, bc]`` (``bsr`` layout, one block per topology slot), bool
``mask [M, K]``. Conv ops take the 4-D conv weight and mask and view them as
``[C_out, C_in/groups * kh * kw]``. Products accumulate in fp32 (fp64 for fp64 inputs).

Meaning of the weight operand: the effective weight is ``W`` on the entries that are both in
``mask`` and inside one of the topology's blocks, and exactly zero elsewhere — by selection,
never by multiplication, so NaN/inf stored in dormant entries never reaches a result. The
activations (``x``, ``dy``) are used as in the dense op: a NaN/inf in them propagates as in
``F.linear`` / ``F.conv2d`` on the effective weight (NaN·0 = NaN).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PHI_CHOICES = ("sq_active", "abs", "signed")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- layout helpers
# The oracle's own copies: production code has its versions in sparsekern.topology/_util.
def grid_shape(shape: tuple[int, int], block_size: tuple[int, int]) -> tuple[int, int]:
    """Number of block rows and block columns of an ``[M, K]`` matrix (ragged edges count)."""
    (m, k), (br, bc) = shape, block_size
    return -(-m // br), -(-k // bc)


def _block_mean(t: Tensor, br: int, bc: int) -> Tensor:
    """``[nbr, nbc]`` mean of each ``br x bc`` block of a 2-D tensor, by its true size."""
    m, k = t.shape
    nbr, nbc = grid_shape((m, k), (br, bc))
    padded = t.new_zeros(nbr * br, nbc * bc)
    padded[:m, :k] = t
    sums = padded.view(nbr, br, nbc, bc).sum(dim=(1, 3))
    rows = (m - torch.arange(nbr, device=t.device) * br).clamp(max=br).to(t.dtype)
    cols = (k - torch.arange(nbc, device=t.device) * bc).clamp(max=bc).to(t.dtype)
    return sums / (rows[:, None] * cols[None, :])


def block_coords(row_ptr: Tensor, col_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Block row and block column of every CSR slot (int64)."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts)
    return rows, col_idx.long()


def gather_blocks(g: Tensor, row_ptr: Tensor, col_idx: Tensor, br: int, bc: int) -> Tensor:
    """``[nnzb, br, bc]`` copies of the blocks of ``g [M, K]`` at the topology's slots,
    zero-padded where a block passes the matrix edge."""
    m, k = g.shape
    nbr, nbc = grid_shape((m, k), (br, bc))
    padded = g.new_zeros(nbr * br, nbc * bc)
    padded[:m, :k] = g
    tiles = padded.view(nbr, br, nbc, bc).permute(0, 2, 1, 3)
    rows, cols = block_coords(row_ptr, col_idx)
    return tiles[rows, cols].contiguous()


def scatter_blocks(values: Tensor, row_ptr: Tensor, col_idx: Tensor, shape: tuple[int, int]) -> Tensor:
    """Dense ``[M, K]`` matrix holding ``values [nnzb, br, bc]`` at the topology's slots."""
    _, br, bc = values.shape
    m, k = shape
    nbr, nbc = grid_shape((m, k), (br, bc))
    tiles = values.new_zeros(nbr, nbc, br, bc)
    rows, cols = block_coords(row_ptr, col_idx)
    tiles[rows, cols] = values
    return tiles.permute(0, 2, 1, 3).reshape(nbr * br, nbc * bc)[:m, :k]


def topology_cover(row_ptr: Tensor, col_idx: Tensor, br: int, bc: int,
                   shape: tuple[int, int]) -> Tensor:
    """Bool ``[M, K]``: the entries inside the topology's blocks."""
    nbr, nbc = grid_shape(shape, (br, bc))
    bmask = torch.zeros(nbr, nbc, dtype=torch.bool, device=row_ptr.device)
    rows, cols = block_coords(row_ptr, col_idx)
    bmask[rows, cols] = True
    return bmask.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:shape[0], :shape[1]]


def effective_weight(w: Tensor, mask: Tensor, row_ptr: Tensor, col_idx: Tensor, br: int,
                     bc: int) -> Tensor:
    """The effective weight as a dense ``[M, K]`` matrix, from either layout: ``W`` where
    ``mask`` is set inside a topology block, exactly 0 elsewhere (selected, not multiplied)."""
    shape = tuple(mask.shape)
    if w.dim() == 3:
        w = scatter_blocks(w, row_ptr, col_idx, shape)
        keep = mask
    else:
        keep = mask & topology_cover(row_ptr, col_idx, br, bc, shape)
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


def check_topo(op: str, topo, shape: tuple[int, int], br: int, bc: int) -> None:
    """Raise ``ValueError`` unless ``topo`` is a well-formed topology of an ``[M, K]`` matrix
    in ``br x bc`` blocks (the checks the C++ kernels make)."""
    if not (isinstance(br, int) and isinstance(bc, int) and br > 0 and bc > 0):
        raise ValueError(f"{op}: br and bc must be positive ints, got ({br!r}, {bc!r})")
    if len(topo) != 5:
        raise ValueError(f"{op}: topo must be [row_ptr, col_idx, col_ptr, row_idx, slot_t] "
                         f"(5 tensors), got {len(topo)}")
    names = ("row_ptr", "col_idx", "col_ptr", "row_idx", "slot_t")
    for name, t in zip(names, topo):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: topo {name} must be a 1-D int32/int64 tensor, got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
    nbr, nbc = grid_shape(shape, (br, bc))
    row_ptr, col_idx, col_ptr, row_idx, slot_t = (t.long() for t in topo)
    nnzb = col_idx.numel()
    if row_ptr.numel() != nbr + 1 or col_ptr.numel() != nbc + 1:
        raise ValueError(f"{op}: topo row_ptr/col_ptr must have {nbr + 1}/{nbc + 1} entries for "
                         f"an {shape[0]}x{shape[1]} matrix in {br}x{bc} blocks, got "
                         f"{row_ptr.numel()}/{col_ptr.numel()}")
    if row_idx.numel() != nnzb or slot_t.numel() != nnzb:
        raise ValueError(f"{op}: topo col_idx, row_idx and slot_t must have the same length")
    for name, ptr in (("row_ptr", row_ptr), ("col_ptr", col_ptr)):
        if ptr[0] != 0 or ptr[-1] != nnzb or bool((ptr[1:] < ptr[:-1]).any()):
            raise ValueError(f"{op}: topo {name} must be non-decreasing from 0 to nnzb={nnzb}")
    for name, idx, n in (("col_idx", col_idx, nbc), ("row_idx", row_idx, nbr),
                         ("slot_t", slot_t, nnzb)):
        if nnzb and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"{op}: topo {name} out of range [0, {n})")
    rows, _ = block_coords(row_ptr, col_idx)
    flat = rows * nbc + col_idx
    if nnzb > 1 and bool((flat[1:] <= flat[:-1]).any()):
        raise ValueError(f"{op}: topo col_idx must be strictly increasing within each block row")


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    acc = acc_dtype(out_dtype)
    return (a.to(acc) @ b.to(acc)).to(out_dtype)


def _csr(topo) -> tuple[Tensor, Tensor]:
    """``(row_ptr, col_idx)`` of a checked ``topo`` (a named tuple or a list in field order)."""
    row_ptr, col_idx, _col_ptr, _row_idx, _slot_t = topo
    return row_ptr, col_idx


# --------------------------------------------------------------------------- linear ops
def bsr_mm(x, w, mask, topo, br, bc):
    """``y [B, M] = x @ (W ⊙ mask)ᵀ``."""
    check_topo("bsr_mm", topo, tuple(mask.shape), br, bc)
    return _mm(x, effective_weight(w, mask, *_csr(topo), br, bc).t(), x.dtype)


def bsr_mm_t(dy, w, mask, topo, br, bc):
    """``dx [B, K] = dy @ (W ⊙ mask)``."""
    check_topo("bsr_mm_t", topo, tuple(mask.shape), br, bc)
    return _mm(dy, effective_weight(w, mask, *_csr(topo), br, bc), dy.dtype)


def dense_grad(dy: Tensor, x: Tensor) -> Tensor:
    """The dense candidate gradient ``G = dyᵀ x`` in the accumulation dtype (oracle only)."""
    acc = acc_dtype(x.dtype)
    return dy.to(acc).t() @ x.to(acc)


def sddmm(dy, x, mask, topo, br, bc):
    """``(dyᵀ x) ⊙ mask`` on the topology's blocks: ``[nnzb, br, bc]`` in ``x``'s dtype."""
    check_topo("sddmm", topo, tuple(mask.shape), br, bc)
    g = masked(dense_grad(dy, x), mask)
    return gather_blocks(g, *_csr(topo), br, bc).to(x.dtype)


def masked(g: Tensor, mask: Tensor) -> Tensor:
    """``g`` where ``mask`` is set, exactly 0 elsewhere (NaN/inf off the mask do not survive)."""
    return torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))


def stable_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of a 1-D tensor: descending, NaN highest, ties to the lower index."""
    s = scores + 0.0
    key = torch.where(torch.isnan(s), torch.full_like(s, math.inf), s)
    nan_first = torch.isnan(s).to(torch.int8)
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(nan_first[order], descending=True, stable=True)]
    idx = order[:k]
    return idx, s[idx]


def growth_scores(g: Tensor, counter, bonus_scale: float, eps: float, br: int, bc: int) -> Tensor:
    """Growth score per entry (or per block when ``(br, bc) != (1, 1)``): ``|G|`` reduced by
    block mean, plus ``bonus_scale / (counter + eps)`` when a counter is given."""
    s = g.abs()
    if (br, bc) != (1, 1):
        s = _block_mean(s, br, bc)
    if counter is not None:
        s = s + bonus_scale / (counter.to(s.dtype) + eps)
    return s


def topk_from_grad(g, exclude, k, counter, bonus_scale, eps, br, bc):
    """Top-``k`` growth candidates of a dense gradient: ``(flat_indices, scores)``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"grow_topk: k must be a non-negative int, got {k!r}")
    s = growth_scores(g, counter, bonus_scale, eps, br, bc).flatten()
    allowed = (~exclude).flatten().nonzero().flatten()
    if k > allowed.numel():
        raise ValueError(f"grow_topk: k={k} exceeds the {allowed.numel()} entries not excluded")
    pos, vals = stable_topk(s[allowed], k)
    return allowed[pos], vals


def grow_topk(dy, x, exclude, k, counter, bonus_scale, eps, br, bc):
    """Exact top-``k`` of ``|dyᵀx| (+ bonus_scale/(counter+eps))`` over entries (blocks) where
    ``exclude`` is False; ties to the lower flat index, NaN highest."""
    return topk_from_grad(dense_grad(dy, x), exclude, k, counter, bonus_scale, eps, br, bc)


def fused_weight_grad(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps):
    """``sddmm`` and ``grow_topk`` together (one pass over ``dy``/``x`` in a kernel)."""
    check_topo("fused_weight_grad", topo, tuple(mask.shape), br, bc)
    g = dense_grad(dy, x)
    vals = gather_blocks(masked(g, mask), *_csr(topo), br, bc).to(x.dtype)
    idx, scores = topk_from_grad(g, exclude, k, counter, bonus_scale, eps, br, bc)
    return vals, idx, scores


def psi_grad(g: Tensor, w: Tensor, active: Tensor, candidates: Tensor, lam: float, phi: str) -> Tensor:
    """BiDST's mask-score gradient ``dψ = G⊙W − λ·φ(G)`` on the candidate set, 0 elsewhere.

    ``φ``: ``"sq_active"`` = ``M⊙G²``, ``"abs"`` = ``|G|``, ``"signed"`` = ``G``.
    """
    if phi == "sq_active":
        reg = g * g * active
    elif phi == "abs":
        reg = g.abs()
    elif phi == "signed":
        reg = g
    else:
        raise ValueError(f"psi_grad: phi must be one of {PHI_CHOICES}, got {phi!r}")
    return torch.where(candidates, g * w - lam * reg, torch.zeros_like(g))


# --------------------------------------------------------------------------- conv ops
def conv_out_hw(hw, kernel, stride, padding, dilation) -> list[int]:
    """Output height and width of a convolution."""
    return [(hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
            for i in range(2)]


def conv_weight_4d(op: str, w: Tensor, mask: Tensor, topo, br: int, bc: int) -> Tensor:
    """The effective weight (see :func:`effective_weight`) in the conv weight's 4-D shape."""
    m2 = mask.flatten(1)
    check_topo(op, topo, tuple(m2.shape), br, bc)
    return effective_weight(w.flatten(1) if w.dim() == 4 else w, m2, *_csr(topo),
                            br, bc).view(mask.shape)


def conv2d(x, w, mask, topo, br, bc, stride, padding, dilation, groups):
    """Convolution of ``x`` with ``W ⊙ mask`` (no bias)."""
    acc = acc_dtype(x.dtype)
    wd = conv_weight_4d("conv2d", w, mask, topo, br, bc)
    return F.conv2d(x.to(acc), wd.to(acc), None, stride, padding, dilation, groups).to(x.dtype)


def conv2d_grad_input(dy, w, mask, topo, br, bc, input_hw, stride, padding, dilation, groups):
    """Gradient of the convolution's input: a transposed convolution with ``W ⊙ mask``."""
    acc = acc_dtype(dy.dtype)
    wd = conv_weight_4d("conv2d_grad_input", w, mask, topo, br, bc)
    shape = (dy.shape[0], wd.shape[1] * groups, *input_hw)
    return torch.nn.grad.conv2d_input(shape, wd.to(acc), dy.to(acc), stride, padding,
                                      dilation, groups).to(dy.dtype)


def conv_dense_grad(dy, x, weight_shape, stride, padding, dilation, groups) -> Tensor:
    """Dense weight gradient of a convolution on the 2-D view ``[C_out, C_in/g·kh·kw]``."""
    acc = acc_dtype(x.dtype)
    g = torch.nn.grad.conv2d_weight(x.to(acc), list(weight_shape), dy.to(acc), stride, padding,
                                    dilation, groups)
    return g.flatten(1)


def conv2d_sddmm(dy, x, mask, topo, br, bc, stride, padding, dilation, groups):
    """Convolution weight gradient on the topology's blocks: ``[nnzb, br, bc]``."""
    check_topo("conv2d_sddmm", topo, (mask.shape[0], mask[0].numel()), br, bc)
    g = masked(conv_dense_grad(dy, x, mask.shape, stride, padding, dilation, groups),
               mask.flatten(1))
    return gather_blocks(g, *_csr(topo), br, bc).to(x.dtype)


def conv2d_grow_topk(dy, x, exclude, k, counter, bonus_scale, eps, br, bc, weight_shape,
                     stride, padding, dilation, groups):
    """``grow_topk`` for a convolution's weight gradient (2-D view)."""
    g = conv_dense_grad(dy, x, weight_shape, stride, padding, dilation, groups)
    return topk_from_grad(g, exclude, k, counter, bonus_scale, eps, br, bc)


def conv2d_fused_weight_grad(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps,
                             stride, padding, dilation, groups):
    """``conv2d_sddmm`` and ``conv2d_grow_topk`` together."""
    check_topo("conv2d_fused_weight_grad", topo, (mask.shape[0], mask[0].numel()), br, bc)
    g = conv_dense_grad(dy, x, mask.shape, stride, padding, dilation, groups)
    vals = gather_blocks(masked(g, mask.flatten(1)), *_csr(topo), br, bc).to(x.dtype)
    idx, scores = topk_from_grad(g, exclude, k, counter, bonus_scale, eps, br, bc)
    return vals, idx, scores
