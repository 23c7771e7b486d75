"""Block topology: grids, block reductions with ragged edges, CSR/CSC consistency."""
import pytest
import torch

from sparsekern.topology import (Topology, block_reduce, block_reduce_any, build_topology,
                                 expand_blocks, grid_shape, topology_from_block_mask)


def test_grid_shape():
    assert grid_shape((5, 7), (2, 3)) == (3, 3)
    assert grid_shape((4, 6), (2, 3)) == (2, 2)
    assert grid_shape((1, 1), (32, 32)) == (1, 1)


def test_block_reduce_ragged():
    t = torch.arange(35, dtype=torch.float64).view(5, 7)
    s = block_reduce(t, (2, 3), "sum")
    m = block_reduce(t, (2, 3), "mean")
    for r in range(3):
        for c in range(3):
            blk = t[2 * r:2 * r + 2, 3 * c:3 * c + 3]
            assert s[r, c] == blk.sum()
            assert m[r, c] == blk.sum() / blk.numel()  # mean by the true (ragged) size
    mask = t > 10
    assert torch.equal(block_reduce(mask, (2, 3), "all"),
                       torch.tensor([[False, False, False], [True, True, True],
                                     [True, True, True]]))
    assert torch.equal(block_reduce_any(mask, (2, 3)),
                       torch.tensor([[False, True, True], [True, True, True],
                                     [True, True, True]]))  # 11, 12, 13 sit in blocks 1, 2


def test_expand_blocks_inverts_any():
    bm = torch.rand(3, 4) < 0.5
    full = expand_blocks(bm, (4, 3), (10, 11))
    assert full.shape == (10, 11)
    assert torch.equal(block_reduce_any(full, (4, 3)), bm)


@pytest.mark.parametrize("block_size", [(1, 1), (2, 3), (4, 4)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_build_topology_csr_csc(block_size, density):
    mask = torch.rand(9, 13) < density
    topo = build_topology(mask, block_size)
    bm = block_reduce_any(mask, block_size)
    nbr, nbc = bm.shape
    assert torch.equal(topo.block_mask, bm) and topo.nnzb == int(bm.sum())
    for t in topo.tensors:
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert topo.row_ptr.shape == (nbr + 1,) and topo.col_ptr.shape == (nbc + 1,)
    # CSR: slots in row-major order
    rows = torch.repeat_interleave(torch.arange(nbr), (topo.row_ptr[1:] - topo.row_ptr[:-1]).long())
    expect = bm.nonzero()
    assert torch.equal(torch.stack([rows, topo.col_idx.long()], 1), expect)
    # CSC: column-major walk; slot_t points back at the CSR slot of the same block
    cols = torch.repeat_interleave(torch.arange(nbc), (topo.col_ptr[1:] - topo.col_ptr[:-1]).long())
    expect_t = bm.t().nonzero().flip(1)  # (row, col) pairs in column-major order
    assert torch.equal(torch.stack([topo.row_idx.long(), cols], 1), expect_t)
    slot = topo.slot_t.long()
    assert torch.equal(rows[slot], topo.row_idx.long())
    assert torch.equal(topo.col_idx[slot].long(), cols)


def test_topology_from_block_mask_and_to():
    bm = torch.tensor([[True, False], [True, True]])
    topo = topology_from_block_mask(bm, (3, 4), (2, 2))
    assert isinstance(topo, Topology) and topo.shape == (3, 4) and topo.nnzb == 3
    assert topo.row_ptr.tolist() == [0, 1, 3] and topo.col_idx.tolist() == [0, 0, 1]
    assert topo.col_ptr.tolist() == [0, 2, 3] and topo.row_idx.tolist() == [0, 1, 1]
    assert topo.slot_t.tolist() == [0, 1, 2]
    moved = topo.to("cpu")
    assert torch.equal(moved.col_idx, topo.col_idx) and moved.block_size == (2, 2)


def test_build_topology_rejects_non_2d():
    with pytest.raises(ValueError, match="mask must be 2-D"):
        build_topology(torch.ones(2, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("layout", ["dense", "bsr"])
def test_set_mask_units_match_the_pass_over_the_grid(layout):
    from sparsekern.nn import SparseLinear
    torch.manual_seed(0)
    bs = (1, 1) if layout == "dense" else (2, 3)
    a, b = (SparseLinear(13, 17, sparsity=0.7, block_size=bs, layout=layout) for _ in range(2))
    b.load_state_dict(a.state_dict())
    grid = a.unit_mask().shape
    unit = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    unit[torch.randperm(unit.numel())[:a.topology.nnzb]] = True
    unit = unit.view(grid)
    units = unit.flatten().nonzero().flatten()
    newly_a, newly_b = a.set_mask(unit), b.set_mask(unit, units=units)
    assert torch.equal(newly_a, newly_b)
    for x, y in zip(a.topology.tensors, b.topology.tensors):
        assert torch.equal(x, y)
    if layout == "bsr":
        assert torch.equal(a.slot_map, b.slot_map)


def test_set_mask_rejects_units_that_do_not_list_the_mask():
    from sparsekern.nn import SparseLinear
    lin = SparseLinear(8, 8, sparsity=0.5)
    mask = torch.rand(8, 8) < 0.5
    units = mask.flatten().nonzero().flatten()
    before = [t.clone() for t in lin.topology.tensors]
    with pytest.raises(TypeError, match="units must be a 1-D int64 tensor"):
        lin.set_mask(mask, units=units.int())
    off = (~mask).flatten().nonzero().flatten()[:1]
    for bad in (units[1:], units.flip(0), torch.cat([units[:-1], off]).sort().values):
        with pytest.raises(ValueError, match="units must list the"):
            lin.set_mask(mask, units=bad)
    assert all(torch.equal(x, y) for x, y in zip(before, lin.topology.tensors))


def test_csr_only_index_tensors_serve_the_sddmm_and_fail_csc_checks():
    """``index_tensors(csc=False)``: the same CSR part; the C++ and reference SDDMMs (CSR
    readers) give the full topology's values; an op that checks the CSC part rejects it."""
    from sparsekern import ops
    from sparsekern.topology import index_tensors
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(13, 17, generator=g) < 0.3
    units = mask.flatten().nonzero().flatten()
    full, csr = index_tensors(units, (13, 17)), index_tensors(units, (13, 17), csc=False)
    assert torch.equal(full.row_ptr, csr.row_ptr) and torch.equal(full.col_idx, csr.col_idx)
    dy, x = torch.randn(5, 13, generator=g), torch.randn(5, 17, generator=g)
    for name in ("reference", "auto"):
        with ops.backend(name):
            want = ops.sddmm(dy, x, mask, full, 1, 1)
            assert torch.equal(ops.sddmm(dy, x, mask, csr, 1, 1), want)
    if ops.resolve_backend(torch.device("cpu")) == "cpp":
        with pytest.raises(RuntimeError, match="topo (col_ptr|row_idx|slot_t)"):
            ops.bsr_mm_t(dy, torch.randn(13, 17), mask, csr, 1, 1)
