"""Block topology of a mask: the compressed, kernel-ready index of its active blocks.

A weight is viewed as a 2-D matrix ``[M, K]`` split into ``br x bc`` blocks (edges may be
ragged). The topology lists the blocks that hold at least one active entry, row-major
(CSR: ``row_ptr``/``col_idx``; a block's position in that list is its *slot*) and
column-major (CSC: ``col_ptr``/``row_idx`` with ``slot_t`` pointing back at the CSR slot),
so that ``x @ Wᵀ`` walks rows and ``dy @ W`` walks columns without moving data.
It is built when a mask changes, never per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


def grid_shape(shape: tuple[int, int], block_size: tuple[int, int]) -> tuple[int, int]:
    """Number of block rows and block columns of an ``[M, K]`` matrix (ragged edges count)."""
    (m, k), (br, bc) = shape, block_size
    return -(-m // br), -(-k // bc)


def block_reduce_any(mask2d: Tensor, block_size: tuple[int, int]) -> Tensor:
    """``[nbr, nbc]`` bool: which blocks of ``mask2d`` hold at least one True."""
    return block_reduce(mask2d.to(torch.float32), block_size, "sum") > 0


def block_reduce(t: Tensor, block_size: tuple[int, int], how: str = "sum") -> Tensor:
    """Reduce a 2-D tensor per block: ``how`` is ``"sum"``, ``"mean"`` (by true block size) or
    ``"all"``; returns ``[nbr, nbc]``."""
    br, bc = block_size
    m, k = t.shape
    nbr, nbc = grid_shape((m, k), block_size)
    if how == "all":
        return ~block_reduce_any(~t, block_size)
    padded = t.new_zeros(nbr * br, nbc * bc)
    padded[:m, :k] = t
    out = padded.view(nbr, br, nbc, bc).sum(dim=(1, 3))
    if how == "mean":
        rows = torch.full((nbr,), br, dtype=out.dtype, device=t.device)
        cols = torch.full((nbc,), bc, dtype=out.dtype, device=t.device)
        if nbr:
            rows[-1] = m - (nbr - 1) * br
        if nbc:
            cols[-1] = k - (nbc - 1) * bc
        out = out / (rows[:, None] * cols[None, :])
    return out


def expand_blocks(block_mask: Tensor, block_size: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """Inverse of :func:`block_reduce_any`: an ``[M, K]`` tensor constant on each block."""
    br, bc = block_size
    m, k = shape
    return block_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:m, :k]


class TopoTensors(NamedTuple):
    """The index tensors of a :class:`Topology`, the form every op takes as its ``topo``
    argument (``Tensor[]`` in the op schemas; a plain list in this order is accepted too).
    Inside an op ``topo`` arrives as a list: unpack it by name,
    ``row_ptr, col_idx, col_ptr, row_idx, slot_t = topo``, or call :func:`as_topo`."""

    row_ptr: Tensor  # [nbr + 1]: CSR slots of block row r are row_ptr[r]:row_ptr[r + 1]
    col_idx: Tensor  # [nnzb]: block column of each CSR slot
    col_ptr: Tensor  # [nbc + 1]: CSC entries of block column c are col_ptr[c]:col_ptr[c + 1]
    row_idx: Tensor  # [nnzb]: block row of each CSC entry
    slot_t: Tensor  # [nnzb]: CSR slot of each CSC entry


def as_topo(topo) -> TopoTensors:
    """``topo`` (a :class:`TopoTensors` or a list of its five tensors in order) as
    :class:`TopoTensors`. A sequence of another length is returned unchanged, for the op's
    checks to report."""
    if isinstance(topo, TopoTensors) or len(topo) != len(TopoTensors._fields):
        return topo
    return TopoTensors(*topo)


@dataclass(frozen=True)
class Topology:
    """Active blocks of a 2-D mask in CSR and CSC form (int32 index tensors)."""

    shape: tuple[int, int]
    block_size: tuple[int, int]
    block_mask: Tensor  # [nbr, nbc] bool
    row_ptr: Tensor  # [nbr + 1]
    col_idx: Tensor  # [nnzb]
    col_ptr: Tensor  # [nbc + 1]
    row_idx: Tensor  # [nnzb]
    slot_t: Tensor  # [nnzb]: CSR slot of each CSC entry

    @property
    def tensors(self) -> TopoTensors:
        """The index tensors, named: the form every op takes."""
        return TopoTensors(self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.slot_t)

    @property
    def nnzb(self) -> int:
        return self.col_idx.numel()

    def to(self, device) -> "Topology":
        move = lambda t: t.to(device)  # noqa: E731
        return Topology(self.shape, self.block_size, move(self.block_mask), move(self.row_ptr),
                        move(self.col_idx), move(self.col_ptr), move(self.row_idx),
                        move(self.slot_t))


def build_topology(mask2d: Tensor, block_size: tuple[int, int] = (1, 1)) -> Topology:
    """Topology of the blocks of ``mask2d`` (bool ``[M, K]``) holding any active entry."""
    if mask2d.dim() != 2:
        raise ValueError(f"build_topology: mask must be 2-D, got {mask2d.dim()}-D")
    if tuple(block_size) == (1, 1) and mask2d.dtype == torch.bool:
        bmask = mask2d  # element masks: the block mask is the mask (no reduction pass)
    else:
        bmask = block_reduce_any(mask2d, block_size)
    return topology_from_block_mask(bmask, tuple(mask2d.shape), block_size)


def topology_from_block_mask(bmask: Tensor, shape: tuple[int, int],
                             block_size: tuple[int, int]) -> Topology:
    """Topology from an ``[nbr, nbc]`` block mask."""
    nbr, nbc = bmask.shape
    dev = bmask.device
    rows, cols = bmask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(nbr + 1, dtype=torch.int64, device=dev)
    row_ptr[1:] = torch.bincount(rows, minlength=nbr).cumsum(0)
    order = torch.argsort(cols * max(nbr, 1) + rows, stable=True)
    col_ptr = torch.zeros(nbc + 1, dtype=torch.int64, device=dev)
    col_ptr[1:] = torch.bincount(cols, minlength=nbc).cumsum(0)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return Topology(tuple(shape), tuple(block_size), bmask.clone(), i32(row_ptr), i32(cols),
                    i32(col_ptr), i32(rows[order]), i32(order))
