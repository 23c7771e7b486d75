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
from typing import NamedTuple, Optional

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


def block_sizes(shape: tuple[int, int], block_size: tuple[int, int],
                device=None) -> tuple[Tensor, Tensor]:
    """``(rows [nbr], cols [nbc])`` int64: the true height of each block row and width of each
    block column (the last ones are smaller on ragged edges)."""
    (m, k), (br, bc) = shape, block_size
    nbr, nbc = grid_shape(shape, block_size)
    rows = torch.full((nbr,), br, dtype=torch.int64, device=device)
    cols = torch.full((nbc,), bc, dtype=torch.int64, device=device)
    if nbr:
        rows[-1] = m - (nbr - 1) * br
    if nbc:
        cols[-1] = k - (nbc - 1) * bc
    return rows, cols


def block_entries(block_mask: Tensor, shape: tuple[int, int],
                  block_size: tuple[int, int]) -> int:
    """Number of matrix entries inside the active blocks of ``block_mask`` (true sizes)."""
    rows, cols = block_sizes(shape, block_size, block_mask.device)
    return int(((block_mask.to(torch.int64) * cols).sum(1) * rows).sum())


def random_block_mask(grid: tuple[int, int], keep: int,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Bool ``[nbr, nbc]`` grid with ``keep`` active units drawn uniformly without replacement
    (one ``torch.randperm`` of the grid size on the CPU ``generator``, or the global RNG)."""
    n = grid[0] * grid[1]
    if keep in (0, n):  # nothing to draw
        return torch.full(grid, keep == n, dtype=torch.bool)
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=generator)[:keep]] = True
    return out.view(grid)


def block_values(w2d: Tensor, rows: Tensor, cols: Tensor,
                 block_size: tuple[int, int]) -> Tensor:
    """``[n, br, bc]`` copies of the blocks ``(rows[i], cols[i])`` of ``w2d [M, K]``, zero where
    a block passes the matrix edge; reads only those blocks (no padded copy of ``w2d``)."""
    br, bc = block_size
    m, k = w2d.shape
    r = rows.long()[:, None] * br + torch.arange(br, device=w2d.device)
    c = cols.long()[:, None] * bc + torch.arange(bc, device=w2d.device)
    inside = (r < m)[:, :, None] & (c < k)[:, None, :]
    vals = w2d[r.clamp(max=max(m - 1, 0))[:, :, None], c.clamp(max=max(k - 1, 0))[:, None, :]]
    return torch.where(inside, vals, torch.zeros((), dtype=w2d.dtype, device=w2d.device))


def expand_blocks(block_mask: Tensor, block_size: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """Inverse of :func:`block_reduce_any`: an ``[M, K]`` tensor constant on each block."""
    br, bc = block_size
    m, k = shape
    return block_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:m, :k]


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


def scatter_blocks(values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                   shape: tuple[int, int]) -> Tensor:
    """Dense ``[M, K]`` matrix holding ``values [nnzb, br, bc]`` at the topology's slots, 0
    elsewhere (the inverse of :func:`gather_blocks` on the blocks)."""
    _, br, bc = values.shape
    m, k = shape
    nbr, nbc = grid_shape((m, k), (br, bc))
    tiles = values.new_zeros(nbr, nbc, br, bc)
    rows, cols = block_coords(row_ptr, col_idx)
    tiles[rows, cols] = values
    return tiles.permute(0, 2, 1, 3).reshape(nbr * br, nbc * bc)[:m, :k]


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


def build_topology(mask2d: Tensor, block_size: tuple[int, int] = (1, 1),
                   units: Optional[Tensor] = None) -> Topology:
    """Topology of the blocks of ``mask2d`` (bool ``[M, K]``) holding any active entry
    (``units``: see :func:`topology_from_block_mask`)."""
    if mask2d.dim() != 2:
        raise ValueError(f"build_topology: mask must be 2-D, got {mask2d.dim()}-D")
    if tuple(block_size) == (1, 1) and mask2d.dtype == torch.bool:
        bmask = mask2d  # element masks: the block mask is the mask (no reduction pass)
    else:
        bmask = block_reduce_any(mask2d, block_size)
    return topology_from_block_mask(bmask, tuple(mask2d.shape), block_size, units)


def index_tensors(units: Tensor, grid: tuple[int, int], csc: bool = True) -> TopoTensors:
    """The five int32 index tensors of the blocks at the sorted flat indices ``units``
    (``r·nbc + c``, strictly increasing) of an ``[nbr, nbc]`` grid, in
    ``O(nnzb log nnzb + nbr + nbc)``: the CSR part from the sorted list directly (row bounds by
    one ``searchsorted`` of the ``nbr + 1`` row starts), the CSC order by a stable sort of the
    columns (the row-major listing breaks ties; int16 keys where they fit, ~2.5x faster than
    int32).

    ``csc=False``: for an op that reads only the CSR part (the C++ and reference SDDMMs), the
    CSC tensors are placeholders of the right lengths (``col_ptr = [0, …, 0, nnzb]``, zeros),
    which an op that checks the CSC part rejects."""
    nbr, nbc = grid
    dev, n = units.device, units.numel()
    starts = torch.arange(nbr + 1, device=dev, dtype=torch.int64) * nbc
    row_ptr = torch.searchsorted(units, starts.to(units.dtype), out_int32=True)
    rows = torch.repeat_interleave(torch.arange(nbr, device=dev, dtype=torch.int32),
                                   row_ptr.diff(), output_size=n)
    if nbr * nbc < 2 ** 31:
        cols = units.to(torch.int32) - rows * nbc
    else:
        cols = (units - rows.long() * nbc).to(torch.int32)
    if not csc:
        col_ptr = torch.zeros(nbc + 1, device=dev, dtype=torch.int32)
        col_ptr[-1] = n
        zeros = torch.zeros(n, device=dev, dtype=torch.int32)
        return TopoTensors(row_ptr, cols, col_ptr, zeros, zeros)
    key = cols.to(torch.int16) if nbc <= 2 ** 15 else cols  # narrower keys sort faster
    by_col, order = torch.sort(key, stable=True)
    col_ptr = torch.searchsorted(by_col.to(torch.int32),
                                 torch.arange(nbc + 1, device=dev, dtype=torch.int32),
                                 out_int32=True)
    return TopoTensors(row_ptr, cols, col_ptr, rows.index_select(0, order),
                       order.to(torch.int32))


def check_units(units: Tensor, bmask: Tensor, who: str) -> None:
    """Raise unless ``units`` is a 1-D int64 tensor of the strictly increasing flat indices of
    exactly the True cells of ``bmask`` (``O(|units|)`` plus one count over ``bmask``)."""
    if not isinstance(units, Tensor) or units.dim() != 1 or units.dtype != torch.int64:
        got = (f"{units.dtype} of shape {tuple(units.shape)}" if isinstance(units, Tensor)
               else type(units).__name__)
        raise TypeError(f"{who}: units must be a 1-D int64 tensor, got {got}")
    flat = bmask.reshape(-1)
    n = units.numel()
    if units.device != flat.device:
        raise ValueError(f"{who}: units must be on {flat.device}, got {units.device}")
    ok = n == int(torch.count_nonzero(flat))
    if ok and n:
        ok = (int(units[0]) >= 0 and int(units[-1]) < flat.numel()
              and bool((units[1:] > units[:-1]).all())
              and bool(flat.index_select(0, units).all()))
    if not ok:
        raise ValueError(f"{who}: units must list the {int(torch.count_nonzero(flat))} active "
                         f"units of the mask as strictly increasing flat indices of its "
                         f"{tuple(bmask.shape)} unit grid")


def topology_from_block_mask(bmask: Tensor, shape: tuple[int, int],
                             block_size: tuple[int, int],
                             units: Optional[Tensor] = None) -> Topology:
    """Topology from an ``[nbr, nbc]`` block mask (on the meta device: shapes only, with as
    many blocks as :func:`meta_topology` is given; use that). ``units``: the sorted flat
    indices of its True cells when the caller holds them (checked, :func:`check_units`), which
    replaces the pass over the grid that finds them."""
    if units is None:
        units = bmask.reshape(-1).nonzero().flatten()
    else:
        check_units(units, bmask, "topology")
    return Topology(tuple(shape), tuple(block_size), bmask.clone(),
                    *index_tensors(units, tuple(bmask.shape)))


def meta_topology(shape: tuple[int, int], block_size: tuple[int, int], nnzb: int) -> Topology:
    """A topology of ``nnzb`` blocks on the meta device (shapes only): what a layer built with
    ``device="meta"`` holds until ``reset_parameters()`` draws its mask."""
    nbr, nbc = grid_shape(shape, block_size)
    e = lambda n: torch.empty(n, dtype=torch.int32, device="meta")  # noqa: E731
    return Topology(tuple(shape), tuple(block_size),
                    torch.empty(nbr, nbc, dtype=torch.bool, device="meta"),
                    e(nbr + 1), e(nnzb), e(nbc + 1), e(nnzb), e(nnzb))
