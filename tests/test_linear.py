"""SparseLinear and sparse_linear against a dense nn.Linear holding W ⊙ mask: outputs and every
gradient, every dtype, sparsity, block size and layout; layout and mask management."""
import io
import warnings

import pytest
import torch
from torch import nn

import sparsekern as sk
import sparsekern.functional as skF
from sparsekern.topology import block_reduce_any, expand_blocks

pytestmark = pytest.mark.usefixtures("each_backend")

BLOCKS = [(1, 1), (4, 4), (16, 8), (32, 32)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
LAYOUTS = ["dense", "bsr"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
WORK = torch.float64
"""dtype of the tests that pick none (conftest's each_backend: float32 on kernel backends)."""
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
BF16_ATOL = 1e-2


def dense_twin(layer: sk.SparseLinear, dtype=torch.float64) -> nn.Linear:
    """An nn.Linear holding W ⊙ mask (and the bias) in ``dtype``."""
    lin = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(layer.dense_weight().to(dtype))
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.to(dtype))
    return lin


def run(module, x, dy):
    """Output and (input, weight, bias) gradients of ``module`` at ``x`` with upstream ``dy``."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    dw = module.weight.grad
    if isinstance(module, sk.SparseLinear):
        dw = module.values_to_dense(dw)
    db = None if module.bias is None else module.bias.grad
    return y.detach(), x.grad, dw, db


def check_against_dense(layer, x, dy):
    """Compare ``layer`` (any dtype) with nn.Linear on W ⊙ mask: exact-ish for fp64/fp32, and
    for bf16 at most 2× PyTorch's own bf16 error against fp64 (plus a small atol)."""
    dtype = x.dtype
    mask = layer.mask
    ours = run(layer, x, dy)
    ref64 = run(dense_twin(layer), x.double(), dy.double())
    ref64 = (*ref64[:2], ref64[2] * mask, ref64[3])  # the weight gradient lives on the mask
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    if dtype in TOL:
        for name, a, b in zip(names, ours, ref64):
            if b is not None:
                torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=name)
        return
    theirs = run(dense_twin(layer, dtype), x, dy)
    theirs = (*theirs[:2], theirs[2] * mask, theirs[3])
    for name, a, t, b in zip(names, ours, theirs, ref64):
        if b is None:
            continue
        assert a.dtype == dtype, name
        err = (a.double() - b).abs().max().item() if b.numel() else 0.0
        err_torch = (t.double() - b).abs().max().item() if b.numel() else 0.0
        assert err <= 2 * err_torch + BF16_ATOL, (name, err, err_torch)


def inputs(batch, k, m, dtype):
    x = torch.randn(*batch, k, dtype=torch.float64).to(dtype)
    dy = torch.randn(*batch, m, dtype=torch.float64).to(dtype)
    return x, dy


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_dense_linear(dtype, sparsity, block_size, layout):
    # 45 x 67 weight: every block size has ragged edges
    layer = sk.SparseLinear(67, 45, sparsity=sparsity, block_size=block_size, layout=layout,
                            dtype=WORK).to(dtype)
    x, dy = inputs((3, 5), 67, 45, dtype)
    check_against_dense(layer, x, dy)
    # weight.grad is zero outside the active entries (and on unused bsr slots)
    g = layer.values_to_dense(layer.weight.grad)
    assert not g[~layer.mask].any()


@pytest.mark.parametrize("batch", [(), (1,), (7,), (2, 3), (0,), (2, 0)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_shapes(batch, layout):
    layer = sk.SparseLinear(13, 11, sparsity=0.5, block_size=(4, 4), layout=layout,
                            dtype=WORK)
    x, dy = inputs(batch, 13, 11, WORK)
    y = layer(x)
    assert y.shape == (*batch, 11)
    check_against_dense(layer, x, dy)


@pytest.mark.parametrize("bias", [True, False])
def test_no_bias_and_grad_flags(bias):
    layer = sk.SparseLinear(9, 5, bias=bias, sparsity=0.4, dtype=WORK)
    x, dy = inputs((4,), 9, 5, WORK)
    check_against_dense(layer, x, dy)
    layer.zero_grad(set_to_none=True)
    layer.weight.requires_grad_(False)
    xr = x.clone().requires_grad_(True)
    layer(xr).backward(dy)
    assert xr.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.float64_only
def test_gradcheck(layout):
    layer = sk.SparseLinear(7, 6, sparsity=0.5, block_size=(2, 2), layout=layout,
                            dtype=torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def fn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("block_size", [(1, 1), (3, 2)])
@pytest.mark.float64_only
def test_functional_dense_and_bsr(block_size):
    from sparsekern.reference import gather_blocks
    from sparsekern.topology import build_topology

    w = torch.randn(8, 11, dtype=torch.float64)
    mask = torch.rand(8, 11) < 0.4
    b = torch.randn(8, dtype=torch.float64)
    x = torch.randn(2, 4, 11, dtype=torch.float64)
    expect = x @ (w * mask).t() + b
    torch.testing.assert_close(skF.sparse_linear(x, w, mask, b, block_size=block_size), expect)
    topo = build_topology(mask, block_size)
    vals = gather_blocks(w * mask, topo.row_ptr, topo.col_idx, *block_size)
    got = skF.sparse_linear(x, vals, mask, b, block_size=block_size, topology=topo)
    torch.testing.assert_close(got, expect)
    got = skF.sparse_linear(x, vals, mask, b, block_size=block_size)  # topology built here
    torch.testing.assert_close(got, expect)
    xs = x.detach().requires_grad_(True)
    ws = w.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, c: skF.sparse_linear(a, c, mask, block_size=block_size), (xs, ws))


# --------------------------------------------------------------------------- construction
def test_exact_counts_and_zero_dormant():
    layer = sk.SparseLinear(13, 7, sparsity=0.5)
    assert int(layer.mask.sum()) == 91 - 45
    assert not layer.weight[~layer.mask].any()
    assert layer.mask.dtype == torch.bool and layer.mask.shape == (7, 13)
    assert abs(layer.density - 46 / 91) < 1e-12 and abs(layer.sparsity - 45 / 91) < 1e-12
    blk = sk.SparseLinear(13, 7, sparsity=0.5, block_size=(4, 4))  # a 2 x 4 block grid
    assert int(block_reduce_any(blk.mask, (4, 4)).sum()) == 4
    assert torch.equal(expand_blocks(block_reduce_any(blk.mask, (4, 4)), (4, 4), (7, 13)), blk.mask)
    bsr = sk.SparseLinear(13, 7, sparsity=0.5, block_size=(4, 4), layout="bsr")
    assert bsr.weight.shape == (4, 4, 4)
    assert sk.SparseLinear(13, 7, sparsity=1.0).mask.sum() == 0
    empty = sk.SparseLinear(13, 7, sparsity=1.0, block_size=(4, 4), layout="bsr")
    assert empty.weight.shape[0] == 0


def test_seeded_by_global_rng():
    torch.manual_seed(3)
    a = sk.SparseLinear(20, 10, sparsity=0.8)
    torch.manual_seed(3)
    b = sk.SparseLinear(20, 10, sparsity=0.8)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


def test_repr():
    r = repr(sk.SparseLinear(8, 4, sparsity=0.5, block_size=(2, 4), layout="bsr"))
    assert "in_features=8" in r and "sparsity=0.500" in r and "block_size=(2, 4)" in r
    assert "layout='bsr'" in r


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", [(1, 1), (2, 3)])
def test_from_dense_magnitude(layout, block_size):
    lin = nn.Linear(7, 5, dtype=WORK)
    with torch.no_grad():  # distinct magnitudes, with a tie between flat 3 and 4
        lin.weight.copy_(torch.arange(35, dtype=WORK).view(5, 7) - 17)
    layer = sk.SparseLinear.from_dense(lin, sparsity=0.6, block_size=block_size, layout=layout)
    score = lin.weight.abs()
    if block_size == (1, 1):
        keep = 35 - 21
        order = sorted(range(35), key=lambda i: (-score.flatten()[i].item(), i))[:keep]
        expect = torch.zeros(35, dtype=torch.bool)
        expect[order] = True
        assert torch.equal(layer.mask.flatten(), expect)
    else:
        assert int(block_reduce_any(layer.mask, block_size).sum()) == 9 - 5
    torch.testing.assert_close(layer.dense_weight(), lin.weight * layer.mask)
    torch.testing.assert_close(layer.bias, lin.bias)
    x = torch.randn(3, 7, dtype=WORK)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))
    assert isinstance(layer.to_dense(), nn.Linear)


def test_from_dense_random_is_seeded_and_leaves_global_rng():
    lin = nn.Linear(30, 20)
    state = torch.get_rng_state()
    a = sk.SparseLinear.from_dense(lin, sparsity=0.7, init="random", seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = sk.SparseLinear.from_dense(lin, sparsity=0.7, init="random", seed=5)
    c = sk.SparseLinear.from_dense(lin, sparsity=0.7, init="random", seed=6)
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)
    assert int(a.mask.sum()) == 600 - 420


def test_reset_parameters_keeps_mask():
    layer = sk.SparseLinear(12, 8, sparsity=0.5, block_size=(4, 4), layout="bsr")
    mask = layer.mask.clone()
    before = layer.dense_weight().detach().clone()
    layer.reset_parameters()
    assert torch.equal(layer.mask, mask)
    assert not torch.equal(layer.dense_weight(), before)
    assert not layer.dense_weight()[~mask].any()


# --------------------------------------------------------------------------- set_mask
def test_set_mask_dense_returns_newly_active():
    layer = sk.SparseLinear(6, 4, sparsity=0.5, dtype=WORK)
    old = layer.mask.clone()
    new = ~old
    new[0] = old[0]  # row 0 unchanged
    version = layer.mask_version
    newly = layer.set_mask(new)
    assert newly.shape == layer.weight.shape and newly.dtype == torch.bool
    assert torch.equal(newly, new & ~old)
    assert torch.equal(layer.mask, new) and layer.mask_version == version + 1
    x, dy = inputs((3,), 6, 4, WORK)
    check_against_dense(layer, x, dy)


def _bsr_layer():
    # 10 x 14 weight, 4 x 4 blocks: a ragged 3 x 4 grid; 6 of 12 blocks active
    layer = sk.SparseLinear(14, 10, sparsity=0.5, block_size=(4, 4), layout="bsr",
                            dtype=WORK)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, layer.weight.numel() + 1,
                                        dtype=WORK).view(layer.weight.shape))
    return layer


def test_set_mask_bsr_reuses_slots():
    layer = _bsr_layer()
    old_bm = block_reduce_any(layer.mask, (4, 4)).flatten()
    active, inactive = old_bm.nonzero().flatten(), (~old_bm).nonzero().flatten()
    drop, grow = active[[1, 4]], inactive[[0, 5]]
    new_bm = old_bm.clone()
    new_bm[drop] = False
    new_bm[grow] = True
    values_before = layer.weight.detach().clone()
    dense_before = layer.dense_weight().detach().clone()
    param = layer.weight
    newly = layer.set_mask(expand_blocks(new_bm.view(3, 4), (4, 4), (10, 14)))
    assert layer.weight is param and layer.weight.shape == values_before.shape
    # the dropped blocks' slots (1 and 4, since slots start in row-major order) now hold
    # the grown blocks, zeroed; every other slot is untouched
    reused = torch.tensor([1, 4])
    kept = torch.tensor([0, 2, 3, 5])
    assert torch.equal(layer.weight[kept], values_before[kept])
    assert not layer.weight[reused].any()
    expect_newly = torch.zeros_like(newly)
    for slot, blk in zip(reused.tolist(), grow.tolist()):
        r, c = divmod(blk, 4)
        expect_newly[slot, :min(4, 10 - 4 * r), :min(4, 14 - 4 * c)] = True
    assert torch.equal(newly, expect_newly)
    # the dense view: kept blocks keep their values, grown ones are zero
    dense_after = layer.dense_weight().detach()
    still = expand_blocks((old_bm & new_bm).view(3, 4), (4, 4), (10, 14))
    torch.testing.assert_close(dense_after[still], dense_before[still])
    assert not dense_after[~still].any()
    # forward and backward follow the new mask; gradients land in the right slots
    with torch.no_grad():
        layer.weight.add_(0.5)
    x, dy = inputs((5,), 14, 10, WORK)
    check_against_dense(layer, x, dy)
    assert not layer.values_to_dense(layer.weight.grad)[~layer.mask].any()


def test_set_mask_bsr_shrink_and_grow_capacity():
    layer = _bsr_layer()
    bm = block_reduce_any(layer.mask, (4, 4)).flatten()
    fewer = bm.clone()
    fewer[bm.nonzero().flatten()[:2]] = False
    layer.set_mask(expand_blocks(fewer.view(3, 4), (4, 4), (10, 14)))
    assert layer.weight.shape[0] == 6 and layer.slot_map.numel() == 4
    x, dy = inputs((5,), 14, 10, WORK)
    check_against_dense(layer, x, dy)
    used = torch.zeros(6, dtype=torch.bool)
    used[layer.slot_map] = True
    assert not layer.weight.grad[~used].any()
    with pytest.warns(UserWarning, match="grows to 9 slots"):
        nine = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
        newly = layer.set_mask(expand_blocks(nine, (4, 4), (10, 14)))
    assert layer.weight.shape == (9, 4, 4) and newly.shape == (9, 4, 4)
    check_against_dense(layer, x, dy)


def test_in_place_mask_edit_is_picked_up():
    layer = sk.SparseLinear(8, 8, sparsity=0.9, block_size=(4, 4), dtype=WORK)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 8, dtype=WORK))
        layer.mask.fill_(True)  # bypasses set_mask: every block becomes active
    version = layer.mask_version
    x, dy = inputs((3,), 8, 8, WORK)
    check_against_dense(layer, x, dy)
    assert layer.mask_version == version + 1 and layer.topology.nnzb == 4


# --------------------------------------------------------------------------- state, dtype
@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_round_trip(layout):
    a = sk.SparseLinear(14, 10, sparsity=0.6, block_size=(4, 4), layout=layout,
                        dtype=WORK)
    if layout == "bsr":  # scramble the slot order first
        bm = block_reduce_any(a.mask, (4, 4)).flatten()
        bm[bm.nonzero().flatten()[0]] = False
        bm[(~bm).nonzero().flatten()[-1]] = True
        a.set_mask(expand_blocks(bm.view(3, 4), (4, 4), (10, 14)))
        assert a.layout == 'dense' or not a._slots_identity
        with torch.no_grad():
            a.weight.normal_()
    a.enable_scores()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    key = "mask" if layout == "dense" else "block_mask"  # bsr: the block grid, no [M, K] mask
    assert key in sd and sd[key].dtype == torch.bool
    b = sk.SparseLinear(14, 10, sparsity=0.1, block_size=(4, 4), layout=layout,
                        dtype=WORK)  # a different nnzb
    b.load_state_dict(sd)
    assert torch.equal(a.mask, b.mask) and b.weight.shape == a.weight.shape
    assert torch.equal(a.scores, b.scores)
    x = torch.randn(3, 14, dtype=WORK)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.dense_weight(), b.dense_weight())


def test_load_state_dict_wrong_layout_raises():
    a = sk.SparseLinear(8, 8, sparsity=0.5, block_size=(4, 4), layout="bsr")
    b = sk.SparseLinear(8, 8, sparsity=0.5, block_size=(4, 4), layout="dense")
    with pytest.raises(ValueError, match="layout='dense'"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="layout='bsr'"):
        a.load_state_dict(b.state_dict())
    c = sk.SparseLinear(8, 8, sparsity=0.5, block_size=(2, 2), layout="bsr")
    with pytest.raises(ValueError, match="block_size"):
        c.load_state_dict(a.state_dict())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_float64(layout):
    layer = sk.SparseLinear(9, 6, sparsity=0.5, block_size=(2, 2), layout=layout)
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert layer.mask.dtype == torch.bool and layer.topology.row_ptr.dtype == torch.int32
    x, dy = inputs((4,), 9, 6, torch.float64)
    check_against_dense(layer, x, dy)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_autocast_bf16(layout):
    layer = sk.SparseLinear(40, 24, sparsity=0.5, block_size=(4, 4), layout=layout)
    twin = dense_twin(layer, torch.float32)
    x = torch.randn(16, 40)
    ref = x.double() @ layer.dense_weight().double().t() + layer.bias.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        yt = twin(x)
    assert y.dtype == torch.bfloat16
    err = (y.double() - ref).abs().max().item()
    err_torch = (yt.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + BF16_ATOL
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert not layer.values_to_dense(layer.weight.grad)[~layer.mask].any()


def test_deepcopy_and_train_eval():
    import copy
    layer = sk.SparseLinear(9, 6, sparsity=0.5, block_size=(2, 2), layout="bsr")
    clone = copy.deepcopy(layer)
    x = torch.randn(2, 9)
    torch.testing.assert_close(layer(x), clone(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.eval()(x)
