"""Bad inputs raise a clear exception whose message names the argument."""
import pytest
import torch
from torch import nn

import sparsekern as sk
import sparsekern.functional as skF
from sparsekern.topology import build_topology


def raises(exc, match):
    return pytest.raises(exc, match=match)


# --------------------------------------------------------------------------- constructors
@pytest.mark.parametrize("cls,args", [(sk.SparseLinear, (8, 4)), (sk.SparseConv2d, (4, 4, 3))])
def test_constructor_arguments(cls, args):
    for bad in (-0.1, 1.5):
        with raises(ValueError, "sparsity must be in \\[0, 1\\]"):
            cls(*args, sparsity=bad)
    with raises(TypeError, "sparsity"):
        cls(*args, sparsity="0.5")
    with raises(ValueError, "layout must be one of"):
        cls(*args, layout="csr")
    with raises(ValueError, "block_size"):
        cls(*args, block_size=(0, 2))
    with raises(TypeError, "block_size"):
        cls(*args, block_size=(1, 2, 3))


def test_linear_constructor():
    with raises(ValueError, "in_features"):
        sk.SparseLinear(0, 4)
    with raises(ValueError, "out_features"):
        sk.SparseLinear(4, 2.5)


def test_conv_constructor():
    with raises(ValueError, "padding_mode must be one of"):
        sk.SparseConv2d(4, 4, 3, padding_mode="mirror")
    with raises(ValueError, "padding must be 'same', 'valid'"):
        sk.SparseConv2d(4, 4, 3, padding="full")
    with raises(ValueError, "padding='same' is not supported for strided"):
        sk.SparseConv2d(4, 4, 3, stride=2, padding="same")
    with raises(ValueError, "padding"):
        sk.SparseConv2d(4, 4, 3, padding=-1)
    with raises(ValueError, "in_channels \\(3\\) must be divisible by groups=2"):
        sk.SparseConv2d(3, 4, 3, groups=2)
    with raises(ValueError, "out_channels \\(5\\) must be divisible by groups=2"):
        sk.SparseConv2d(4, 5, 3, groups=2)
    with raises(ValueError, "groups"):
        sk.SparseConv2d(4, 4, 3, groups=0)
    with raises(ValueError, "kernel_size"):
        sk.SparseConv2d(4, 4, 0)
    with raises(ValueError, "stride"):
        sk.SparseConv2d(4, 4, 3, stride=0)
    with raises(ValueError, "dilation"):
        sk.SparseConv2d(4, 4, 3, dilation=(1, 0))


def test_from_dense_arguments():
    lin = nn.Linear(8, 4)
    with raises(ValueError, "init must be one of"):
        sk.SparseLinear.from_dense(lin, sparsity=0.5, init="zeros")
    with raises(ValueError, "sparsity"):
        sk.SparseLinear.from_dense(lin, sparsity=2.0)
    with raises(ValueError, "layout"):
        sk.SparseLinear.from_dense(lin, sparsity=0.5, layout="coo")
    with raises(TypeError, "module must be an nn.Linear"):
        sk.SparseLinear.from_dense(nn.Conv2d(2, 2, 1), sparsity=0.5)
    with raises(TypeError, "module must be an nn.Conv2d"):
        sk.SparseConv2d.from_dense(lin, sparsity=0.5)


# --------------------------------------------------------------------------- set_mask
def test_set_mask_validation():
    layer = sk.SparseLinear(8, 4, sparsity=0.5)
    with raises(ValueError, "mask must have shape \\(4, 8\\), got \\(8, 4\\)"):
        layer.set_mask(torch.ones(8, 4, dtype=torch.bool))
    with raises(TypeError, "mask must be a bool tensor, got dtype torch.float32"):
        layer.set_mask(torch.ones(4, 8))
    with raises(TypeError, "mask must be a bool tensor"):
        layer.set_mask([[True] * 8] * 4)
    bsr = sk.SparseLinear(8, 4, sparsity=0.5, block_size=(2, 4), layout="bsr")
    unaligned = torch.zeros(4, 8, dtype=torch.bool)
    unaligned[0, 0] = True
    with raises(ValueError, "block-aligned"):
        bsr.set_mask(unaligned)
    conv = sk.SparseConv2d(2, 4, 3, sparsity=0.5, block_size=(2, 2), layout="bsr")
    with raises(ValueError, "mask must have shape \\(4, 2, 3, 3\\)"):
        conv.set_mask(torch.ones(4, 2, 3, dtype=torch.bool))
    bad = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    bad[0, 0, 0, 0] = True
    with raises(ValueError, "block-aligned"):
        conv.set_mask(bad)


def test_in_place_unaligned_dense_layout_block_mask_is_accepted():
    """A dense-layout layer with a block size takes any mask; bsr layers hold the block grid
    (``block_mask``), which is aligned by construction (see tests/test_memory.py)."""
    layer = sk.SparseLinear(8, 4, sparsity=0.5, block_size=(2, 4), layout="dense")
    with torch.no_grad():
        layer.mask[0, 0] = ~layer.mask[0, 0]
    layer(torch.randn(2, 8))


# --------------------------------------------------------------------------- forward inputs
def test_module_inputs():
    lin = sk.SparseLinear(8, 4)
    with raises(ValueError, "in_features=8"):
        lin(torch.randn(2, 7))
    with raises(ValueError, "in_features=8"):
        lin(torch.tensor(1.0))
    with raises(TypeError, "input must be a Tensor"):
        lin([1.0] * 8)
    with raises(TypeError, "weight has dtype torch.float32 but input has dtype torch.float64"):
        lin(torch.randn(2, 8, dtype=torch.float64))
    with raises(TypeError, "input must be a floating-point"):
        lin(torch.ones(2, 8, dtype=torch.int64))
    conv = sk.SparseConv2d(4, 6, 3)
    with raises(ValueError, "in_channels=4 channels, got shape \\(2, 4, 5\\)"):
        conv(torch.randn(2, 4, 5))  # 3-D is unbatched C, H, W: 2 channels here
    with raises(ValueError, "in_channels=4"):
        conv(torch.randn(2, 3, 5, 5))
    with raises(ValueError, "input must be 4-D"):
        conv(torch.randn(5, 5))
    with raises(ValueError, "too small for kernel_size"):
        conv(torch.randn(1, 4, 2, 5))


def test_module_device_mismatch():
    lin = sk.SparseLinear(8, 4)
    with raises(ValueError, "weight is on cpu but input is on meta"):
        lin(torch.empty(2, 8, device="meta"))


def test_functional_inputs():
    x = torch.randn(3, 8)
    w = torch.randn(4, 8)
    mask = torch.rand(4, 8) < 0.5
    with raises(TypeError, "mask must be a bool tensor"):
        skF.sparse_linear(x, w, mask.float())
    with raises(ValueError, "mask must have the weight's shape"):
        skF.sparse_linear(x, w, mask[:3])
    with raises(ValueError, "mask must be 2-D"):
        skF.sparse_linear(x, w, mask[None])
    with raises(ValueError, "in_features=8"):
        skF.sparse_linear(torch.randn(3, 5), w, mask)
    with raises(ValueError, "bias must have shape \\(4,\\)"):
        skF.sparse_linear(x, w, mask, torch.randn(5))
    with raises(TypeError, "weight has dtype torch.float64"):
        skF.sparse_linear(x, w.double(), mask)
    with raises(ValueError, "mask is on meta but input is on cpu"):
        skF.sparse_linear(x, w, mask.to("meta"))
    with raises(ValueError, "block_size"):
        skF.sparse_linear(x, w, mask, block_size=(0, 1))
    topo = build_topology(mask, (2, 2))
    with raises(ValueError, "topology is for shape"):
        skF.sparse_linear(x, w, mask, block_size=(2, 4), topology=topo)
    with raises(TypeError, "topology must be"):
        skF.sparse_linear(x, w, mask, topology=topo.tensors)
    with raises(ValueError, "bsr weight values must have shape \\[nnzb, 2, 2\\]"):
        skF.sparse_linear(x, torch.randn(topo.nnzb, 2, 4), mask, block_size=(2, 2))
    with raises(ValueError, "bsr weight has 99 blocks"):
        skF.sparse_linear(x, torch.randn(99, 2, 2), mask, block_size=(2, 2))


def test_functional_conv_inputs():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(6, 2, 3, 3)
    mask = torch.rand(6, 2, 3, 3) < 0.5
    with raises(ValueError, "mask must be 4-D"):
        skF.sparse_conv2d(x, w, mask.flatten(1))
    with raises(ValueError, "in_channels=2"):
        skF.sparse_conv2d(x, w, mask)  # groups=1 expects 2 channels
    with raises(ValueError, "padding must be 'same', 'valid'"):
        skF.sparse_conv2d(x, w, mask, groups=2, padding="full")
    with raises(ValueError, "padding='same' is not supported for strided"):
        skF.sparse_conv2d(x, w, mask, groups=2, padding="same", stride=2)
    with raises(ValueError, "out channels \\(6\\) must be divisible by groups=4"):
        skF.sparse_conv2d(x, w, mask, groups=4)
    with raises(ValueError, "padding_mode must be one of"):
        skF.sparse_conv2d(x, w, mask, groups=2, padding_mode="wrap")
    with raises(TypeError, "stride must be an int or a pair"):
        skF.sparse_conv2d(x, w, mask, groups=2, stride="2")


# --------------------------------------------------------------------------- sparsify
def test_sparsify_arguments():
    model = nn.Sequential(nn.Linear(4, 4))
    with raises(ValueError, "distribution must be one of"):
        sk.sparsify(model, 0.5, distribution="normal")
    with raises(ValueError, "sparsity must be in"):
        sk.sparsify(model, -0.5)
    with raises(ValueError, "layout must be one of"):
        sk.sparsify(model, 0.5, layout="csr")
    with raises(ValueError, "exclude names \\['x'\\]"):
        sk.sparsify(model, 0.5, exclude=["x"])
    with raises(TypeError, "exclude must be a list of module names or a predicate"):
        sk.sparsify(model, 0.5, exclude="0")
    with raises(TypeError, "sparsify: seed must be an int or None, got 'x'"):
        sk.sparsify(model, 0.5, seed="x")
    with raises(TypeError, "seed must be an int or None, got 1.5"):
        sk.sparsify(model, 0.5, seed=1.5)
    with raises(TypeError, "from_dense: seed must be an int or None"):
        sk.SparseLinear.from_dense(nn.Linear(4, 4), sparsity=0.5, init="random", seed=2.0)


def test_hyperparameters_reject_nan_inf():
    from sparsekern import dst
    from sparsekern.nn import CandidateRequest, GrowRequest

    for bad in (float("nan"), float("inf"), 0, -1.0):
        with raises(ValueError, "epochs_to_steps: epochs must be a finite number > 0"):
            dst.epochs_to_steps(bad, 10)
    with raises(ValueError, "steps_per_epoch must be an int >= 1"):
        dst.epochs_to_steps(1.0, 2.5)
    layer = sk.SparseLinear(6, 4, sparsity=0.5)
    for name in ("bonus_scale", "eps"):
        with raises(ValueError, f"request: {name} must be a finite float, got nan"):
            layer.request(GrowRequest(k=1, **{name: float("nan")}))
    with raises(ValueError, "eps must be > 0 with a counter"):
        layer.request(GrowRequest(k=1, counter=torch.zeros(4, 6, dtype=torch.int32), eps=0.0))
    layer.enable_scores()
    with raises(ValueError, "set_candidates: lam must be a finite float, got inf"):
        layer.set_candidates(CandidateRequest(candidates=layer.mask, lam=float("inf")))
    model = nn.Sequential(nn.Linear(4, 4))
    with raises(TypeError, "RigL: seed must be an int, got 0.5"):
        dst.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5, seed=0.5)


# --------------------------------------------------------------------------- load_state_dict
def _legacy_mask(sd):
    """Turn a bsr state dict into the older format (a dense ``mask`` instead of
    ``block_mask``) and return that mask."""
    bm = sd.pop("block_mask")
    sd["mask"] = bm.repeat_interleave(2, 0).repeat_interleave(2, 1)[:6, :8]
    return sd["mask"]


def _bsr_pair():
    torch.manual_seed(0)
    a = sk.SparseLinear(8, 6, sparsity=0.5, block_size=2, layout="bsr")
    b = sk.SparseLinear(8, 6, sparsity=0.5, block_size=2, layout="bsr")
    return a, b


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd["slot_map"].__setitem__(1, sd["slot_map"][0].item()), "same weight slot"),
    (lambda sd: sd["slot_map"].__setitem__(0, -1), r"slots in \[0, 6\)"),
    (lambda sd: sd["slot_map"].__setitem__(0, 6), r"slots in \[0, 6\)"),
    (lambda sd: sd.__setitem__("slot_map", sd["slot_map"][:-1]), "5 entries, but the mask has 6"),
    (lambda sd: sd.__setitem__("slot_map", sd["slot_map"].float()), "1-D integer tensor"),
    (lambda sd: _legacy_mask(sd).__setitem__((0, 0), ~sd["mask"][0, 0]), "not block-aligned"),
    (lambda sd: sd.__setitem__("mask", _legacy_mask(sd).float()), "mask must be a bool tensor"),
    (lambda sd: sd.__setitem__("block_mask", sd["block_mask"].float()),
     "block_mask must be a bool tensor"),
    (lambda sd: sd.__setitem__("block_mask", sd["block_mask"][:, :1]), "block_mask has shape"),
    (lambda sd: sd.__setitem__("weight", sd["weight"][:, :1]), "expects \\[nnzb, 2, 2\\]"),
])
def test_failed_bsr_load_leaves_the_layer_as_it_was(edit, match):
    """Checked before anything changes: the layer still computes what it did."""
    a, b = _bsr_pair()
    x = torch.randn(3, 8)
    y = b(x)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    edit(sd)
    with pytest.raises((ValueError, TypeError), match=match):
        b.load_state_dict(sd)
    assert torch.equal(b(x), y)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_failing_in_torch_restores_the_layer():
    """A mismatch torch reports after copying other entries (here the bias) is undone too,
    including a new slot count."""
    a = sk.SparseLinear(8, 6, sparsity=0.25, block_size=2, layout="bsr")
    b = sk.SparseLinear(8, 6, sparsity=0.75, block_size=2, layout="bsr")
    x = torch.randn(3, 8)
    y, w = b(x), b.weight
    sd = dict(a.state_dict())
    sd["bias"] = torch.zeros(7)
    with pytest.raises(RuntimeError, match="size mismatch for bias"):
        b.load_state_dict(sd)
    assert b.weight is w and b.weight.shape[0] == 3 and torch.equal(b(x), y)
    del sd["bias"]
    b.load_state_dict(sd, strict=False)  # a valid load still works and changes the layer
    assert torch.equal(b.mask, a.mask) and torch.equal(b.dense_weight(), a.dense_weight())
    torch.testing.assert_close(b(x) - b.bias, a(x) - a.bias)  # default fp32 tolerances
