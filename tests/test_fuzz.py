"""Property-based fuzzing (hypothesis) of the modules and the growth op on every backend against
the reference backend: random shapes, block sizes, sparsities, layouts, dtypes and every conv
argument. Derandomized (the same examples every run) and sized for CI."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern import ops
from sparsekern import reference as ref
from sparsekern.topology import grid_shape

FUZZ = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
BACKENDS = ("cpp", "triton")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


def _grads(layer, x, backend):
    layer.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_(True)
    with sk.backend(backend):
        y = layer(xr)
        y.backward(torch.ones_like(y) if y.numel() else y)
    out = [y.detach(), xr.grad, layer.weight.grad]
    if layer.bias is not None:
        out.append(layer.bias.grad)
    return out


def _compare(layer, x):
    want = _grads(layer, x, "reference")
    for backend in BACKENDS:
        got = _grads(layer, x, backend)
        for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, want):
            scale = max(1.0, b.float().abs().max().item()) if b.numel() else 1.0
            tol = TOL[x.dtype]
            torch.testing.assert_close(a.float(), b.float(), rtol=tol["rtol"],
                                       atol=tol["atol"] * scale, msg=f"{backend}: {name}")


blocks = st.sampled_from([(1, 1), (1, 4), (3, 2), (4, 4), (16, 16)])
sparsities = st.sampled_from([0.0, 0.3, 0.7, 0.95, 1.0])
layouts = st.sampled_from(["dense", "bsr"])
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


@FUZZ
@given(m=st.integers(1, 40), k=st.integers(1, 40), batch=st.integers(0, 9), block=blocks,
       sparsity=sparsities, layout=layouts, dtype=dtypes, bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_linear_modules_match_reference(m, k, batch, block, sparsity, layout, dtype, bias, seed):
    torch.manual_seed(seed)
    layer = sk.SparseLinear(k, m, bias=bias, sparsity=sparsity, block_size=block,
                            layout=layout).to(dtype)
    _compare(layer, torch.randn(batch, k).to(dtype))


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    if mode != "zeros":
        padding = (min(padding[0], 1), min(padding[1], 1))
    hw = [draw(st.integers(dilation[i] * ((kh, kw)[i] - 1) + 1 - 2 * padding[i], 9))
          for i in range(2)]
    hw = [max(h, 2) for h in hw]
    return dict(in_channels=cin, out_channels=cout, kernel_size=(kh, kw), stride=stride,
                padding=padding, dilation=dilation, groups=groups, padding_mode=mode), hw


@FUZZ
@given(cfg=conv_configs(), batch=st.integers(0, 3), block=blocks, sparsity=sparsities,
       layout=layouts, dtype=dtypes, bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_modules_match_reference(cfg, batch, block, sparsity, layout, dtype, bias, seed):
    kwargs, hw = cfg
    torch.manual_seed(seed)
    layer = sk.SparseConv2d(**kwargs, bias=bias, sparsity=sparsity, block_size=block,
                            layout=layout).to(dtype)
    _compare(layer, torch.randn(batch, kwargs["in_channels"], *hw).to(dtype))


@FUZZ
@given(m=st.integers(1, 30), k=st.integers(1, 30), batch=st.integers(0, 6), block=blocks,
       frac=st.floats(0.0, 1.0), excluded=st.floats(0.0, 0.9), bonus=st.booleans(),
       seed=st.integers(0, 2**16))
def test_grow_topk_exact_on_every_backend(m, k, batch, block, frac, excluded, bonus, seed):
    """Integer-valued data: every dot product is exact in any order, so the top-k (ties to the
    lower index, plentiful here) must be identical on every backend."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(-2, 3, (batch, m), generator=g).float()
    x = torch.randint(-2, 3, (batch, k), generator=g).float()
    grid = (m, k) if block == (1, 1) else grid_shape((m, k), block)
    exclude = torch.rand(grid, generator=g) < excluded
    n_free = int((~exclude).sum())
    kk = int(frac * n_free)
    counter = torch.randint(0, 4, grid, generator=g, dtype=torch.int32) if bonus else None
    args = (dy, x, exclude, kk, counter, 0.5 if bonus else 0.0, 1.0, *block)
    want = ref.grow_topk(*args)
    for backend in BACKENDS:
        with sk.backend(backend):
            got = ops.grow_topk(*args)
        assert torch.equal(got[0], want[0]), backend
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, msg=backend)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_fuzz_backends_are_available(backend):
    """The fuzz tests compare against these backends: a missing one must fail, not pass idly."""
    assert sk.available_backends()[backend] == "ok"
