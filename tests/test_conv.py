"""SparseConv2d and sparse_conv2d against a dense nn.Conv2d holding W ⊙ mask: outputs and every
gradient over a representative set of conv arguments, dtypes, sparsities, block sizes and
layouts."""
import io

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
BF16_ATOL = 2e-2

# in, out, kernel, stride, padding, dilation, groups, bias, padding_mode, (H, W)
CASES = [
    (3, 8, 3, 1, 1, 1, 1, True, "zeros", (9, 11)),
    (4, 6, (3, 7), (2, 1), (1, 3), 1, 1, False, "zeros", (10, 13)),
    (6, 9, 3, 1, "same", (2, 1), 3, True, "zeros", (8, 9)),
    (4, 4, (2, 4), 1, "same", 1, 1, True, "reflect", (7, 9)),
    (5, 7, 3, 2, 2, 1, 1, True, "circular", (9, 8)),
    (4, 8, 1, 1, "valid", 1, 2, True, "replicate", (5, 6)),
    (8, 8, 3, 1, (0, 2), (1, 2), 8, True, "zeros", (7, 9)),
    (3, 5, (4, 2), 1, "same", 1, 1, True, "zeros", (9, 10)),
    (3, 5, (3, 2), 1, "same", 2, 1, True, "replicate", (6, 7)),
    (4, 6, (2, 3), (3, 2), "valid", (2, 1), 2, False, "reflect", (11, 9)),
]
CASE_IDS = [f"case{i}" for i in range(len(CASES))]


def conv_kwargs(case):
    cin, cout, k, s, p, d, g, b, pm, _ = case
    return dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, padding=p,
                dilation=d, groups=g, bias=b, padding_mode=pm)


def dense_twin(layer: sk.SparseConv2d, dtype=torch.float64) -> nn.Conv2d:
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                     layer.padding_mode, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(layer.dense_weight().to(dtype))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias.to(dtype))
    return conv


def run(module, x, dy=None):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    if dy is None:
        dy = torch.randn(y.shape, dtype=torch.float64).to(y.dtype)
    y.backward(dy)
    dw = module.weight.grad
    if isinstance(module, sk.SparseConv2d):
        dw = module.values_to_dense(dw)
    db = None if module.bias is None else module.bias.grad
    return (y.detach(), x.grad, dw, db), dy


def check_against_dense(layer, x):
    """As tests/test_linear.py: fp64/fp32 to tolerance, bf16 within 2× PyTorch's bf16 error."""
    dtype = x.dtype
    ours, dy = run(layer, x)
    ref64, _ = run(dense_twin(layer), x.double(), dy.double())
    ref64 = (*ref64[:2], ref64[2] * layer.mask, ref64[3])
    names = ("output", "grad_input", "grad_weight", "grad_bias")
    if dtype in TOL:
        for name, a, b in zip(names, ours, ref64):
            if b is not None:
                torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=name)
    else:
        theirs, _ = run(dense_twin(layer, dtype), x, dy)
        theirs = (*theirs[:2], theirs[2] * layer.mask, theirs[3])
        for name, a, t, b in zip(names, ours, theirs, ref64):
            if b is None or not b.numel():
                continue
            assert a.dtype == dtype, name
            err = (a.double() - b).abs().max().item()
            err_torch = (t.double() - b).abs().max().item()
            assert err <= 2 * err_torch + BF16_ATOL, (name, err, err_torch)
    assert not layer.values_to_dense(layer.weight.grad)[~layer.mask].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv_arguments(case, dtype):
    # each case gets its own sparsity / block size / layout, rotating through them (sparsity
    # 1.0 would hide the convolution: test_sparsity_and_blocks covers it)
    i = CASES.index(case)
    sparsity, bs, layout = (0.5, 0.9, 0.0)[i % 3], BLOCKS[(i // 2) % 4], LAYOUTS[i % 2]
    layer = sk.SparseConv2d(**conv_kwargs(case), sparsity=sparsity, block_size=bs,
                            layout=layout, dtype=WORK).to(dtype)
    x = torch.randn(2, case[0], *case[-1], dtype=WORK).to(dtype)
    check_against_dense(layer, x)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_sparsity_and_blocks(sparsity, block_size, layout):
    # 2-D view 12 x (6*3*3 = 54): ragged for every block size
    layer = sk.SparseConv2d(6, 12, 3, padding=1, stride=(1, 2), sparsity=sparsity,
                            block_size=block_size, layout=layout, dtype=WORK)
    check_against_dense(layer, torch.randn(2, 6, 7, 8, dtype=WORK))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_and_unbatched(layout):
    layer = sk.SparseConv2d(3, 4, 3, padding="same", sparsity=0.5, block_size=(2, 3),
                            layout=layout, dtype=WORK)
    check_against_dense(layer, torch.randn(0, 3, 5, 6, dtype=WORK))
    x = torch.randn(3, 5, 6, dtype=WORK)
    y = layer(x)
    assert y.shape == (4, 5, 6)
    torch.testing.assert_close(y, dense_twin(layer, WORK)(x))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.float64_only
def test_gradcheck(layout):
    layer = sk.SparseConv2d(4, 4, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                            groups=2, sparsity=0.5, block_size=(2, 3), layout=layout,
                            dtype=torch.float64)
    x = torch.randn(1, 4, 4, 6, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def fn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.float64_only
def test_gradcheck_reflect_same():
    layer = sk.SparseConv2d(2, 3, (2, 3), padding="same", padding_mode="reflect", sparsity=0.3,
                            dtype=torch.float64)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("padding", [0, (1, 2), "same", "valid"])
def test_functional(padding):
    from sparsekern.reference import gather_blocks
    from sparsekern.topology import build_topology

    w = torch.randn(6, 2, 3, 4, dtype=WORK)
    mask = torch.rand(6, 2, 3, 4) < 0.5
    b = torch.randn(6, dtype=WORK)
    x = torch.randn(2, 4, 7, 8, dtype=WORK)
    kw = dict(stride=1, padding=padding, dilation=(2, 1), groups=2)
    expect = torch.nn.functional.conv2d(x, w * mask, b, **kw)
    torch.testing.assert_close(skF.sparse_conv2d(x, w, mask, b, **kw, block_size=(2, 4)), expect)
    topo = build_topology(mask.flatten(1), (2, 4))
    vals = gather_blocks((w * mask).flatten(1), topo.row_ptr, topo.col_idx, 2, 4)
    got = skF.sparse_conv2d(x, vals, mask, b, **kw, block_size=(2, 4), topology=topo)
    torch.testing.assert_close(got, expect)
    got = skF.sparse_conv2d(x, w, mask, b, **kw, padding_mode="circular")
    expect = dense_twin_functional(x, w * mask, b, padding, (2, 1), 2, "circular")
    torch.testing.assert_close(got, expect)


def dense_twin_functional(x, w, b, padding, dilation, groups, mode):
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[2:], 1, padding, dilation, groups,
                     True, mode, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return conv(x)


# --------------------------------------------------------------------------- module plumbing
def test_exact_counts_and_shapes():
    layer = sk.SparseConv2d(4, 6, (3, 5), groups=2, sparsity=0.75)
    assert layer.mask.shape == layer.weight.shape == (6, 2, 3, 5)
    assert int(layer.mask.sum()) == 180 - 135
    bsr = sk.SparseConv2d(4, 6, (3, 5), groups=2, sparsity=0.75, block_size=(2, 8), layout="bsr")
    # 2-D view 6 x 30 -> a 3 x 4 grid; 12 - floor(9) = 3 blocks
    assert bsr.weight.shape == (3, 2, 8)
    assert bsr.mask.shape == (6, 2, 3, 5)
    assert int(block_reduce_any(bsr.mask.flatten(1), (2, 8)).sum()) == 3


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_from_dense_to_dense(mode):
    conv = nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 1), dilation=1, groups=2,
                     padding_mode=mode, dtype=WORK)
    layer = sk.SparseConv2d.from_dense(conv, sparsity=0.5, block_size=(2, 2), layout="bsr")
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    x = torch.randn(2, 4, 6, 7, dtype=WORK)
    back = layer.to_dense()
    assert isinstance(back, nn.Conv2d) and back.padding_mode == mode
    torch.testing.assert_close(layer(x), back(x))
    torch.testing.assert_close(back.weight, conv.weight * layer.mask)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_round_trip(layout):
    a = sk.SparseConv2d(4, 8, 3, padding=1, sparsity=0.7, block_size=(4, 9), layout=layout,
                        dtype=WORK)
    bm = block_reduce_any(a.mask.flatten(1), (4, 9)).flatten()
    bm[bm.nonzero().flatten()[0]] = False
    bm[(~bm).nonzero().flatten()[-1]] = True
    a.set_mask(expand_blocks(bm.view(2, 4), (4, 9), (8, 36)).view(8, 4, 3, 3))
    assert a.layout == 'dense' or not a._slots_identity
    with torch.no_grad():
        a.weight.normal_()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = sk.SparseConv2d(4, 8, 3, padding=1, sparsity=0.2, block_size=(4, 9), layout=layout,
                        dtype=WORK)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(2, 4, 6, 6, dtype=WORK)
    torch.testing.assert_close(a(x), b(x))
    assert torch.equal(a.mask, b.mask)


def test_to_float64_and_autocast():
    layer = sk.SparseConv2d(4, 8, 3, padding=1, sparsity=0.5, block_size=(4, 4), layout="bsr")
    x = torch.randn(2, 4, 8, 8)
    twin = dense_twin(layer, torch.float32)
    ref = dense_twin(layer)(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        yt = twin(x)
    assert y.dtype == torch.bfloat16
    err, err_torch = ((y.double() - ref).abs().max().item(),
                      (yt.double() - ref).abs().max().item())
    assert err <= 2 * err_torch + BF16_ATOL
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.mask.dtype == torch.bool
    check_against_dense(layer, x.double())


def test_set_mask_accepts_2d_view_and_returns_newly_active():
    layer = sk.SparseConv2d(2, 4, 3, sparsity=0.5, dtype=WORK)
    old = layer.mask.clone()
    new2d = ~old.flatten(1)
    newly = layer.set_mask(new2d)
    assert newly.shape == layer.weight.shape and torch.equal(newly, new2d.view(old.shape) & ~old)
    assert torch.equal(layer.mask, new2d.view(old.shape))
    check_against_dense(layer, torch.randn(2, 2, 5, 5, dtype=WORK))


def test_repr():
    r = repr(sk.SparseConv2d(4, 8, (3, 7), stride=2, padding="valid", groups=2, bias=False,
                             padding_mode="reflect", sparsity=0.5))
    for part in ("kernel_size=(3, 7)", "stride=(2, 2)", "groups=2", "bias=False",
                 "padding_mode='reflect'", "sparsity=0.500", "layout='dense'"):
        assert part in r, part
