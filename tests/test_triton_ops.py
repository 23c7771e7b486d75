"""The Triton provider: its contract, ``opcheck`` on its opaque ops, the public ops and modules on
``sk.backend("triton")`` against the reference backend, and a short DST loop on both."""
import inspect

import pytest
import torch
from torch import nn

from _triton_cases import DEVICE, INTERPRET, block_mask, ints, kernels, topo_of, weight
import sparsekern as sk
from sparsekern import ops
from sparsekern import reference as ref

B, M, K = 5, 24, 20  # one tile per axis: opcheck calls each op several times


def _linear_samples():
    mask = block_mask(M, K, (1, 1), 0.5, seed=1)
    topo = topo_of(mask, (1, 1))
    x, dy, w = ints(B, K), ints(B, M), ints(M, K)
    excl = mask.clone()
    cnt = torch.randint(0, 3, (M, K), dtype=torch.int32).to(DEVICE)
    bmask = block_mask(M, K, (16, 16), 0.3, seed=2)
    btopo = topo_of(bmask, (16, 16))
    bvals = ref.gather_blocks(w, btopo[0], btopo[1], 16, 16).contiguous()
    return {
        "bsr_mm": [(x, w, mask, topo, 1, 1), (x, bvals, bmask, btopo, 16, 16)],
        "bsr_mm_t": [(dy, w, mask, topo, 1, 1), (dy, bvals, bmask, btopo, 16, 16)],
        "sddmm": [(dy, x, mask, topo, 1, 1), (dy, x, bmask, btopo, 16, 16)],
        "grow_topk": [(dy, x, excl, 5, None, 0.0, 1.0, 1, 1),
                      (dy, x, excl, 5, cnt, 0.5, 1.0, 1, 1)],
        "fused_weight_grad": [(dy, x, mask, topo, 1, 1, excl, 4, cnt, 0.5, 1.0)],
    }


def _conv_samples():
    n, cin, cout, h, w, g = 1, 4, 6, 5, 6, 2
    kh = kw = 3
    mask = block_mask(cout, cin // g * kh * kw, (1, 1), 0.5, seed=3)
    topo = topo_of(mask, (1, 1))
    mask4 = mask.view(cout, cin // g, kh, kw)
    x, wt = ints(n, cin, h, w), ints(cout, cin // g, kh, kw)
    conv = ([2, 1], [1, 1], [1, 2], g)
    dy = ints(*ref.conv2d(x, wt, mask4, topo, 1, 1, *conv).shape)
    excl = mask.clone()
    return {
        "conv2d": [(x, wt, mask4, topo, 1, 1, *conv)],
        "conv2d_grad_input": [(dy, wt, mask4, topo, 1, 1, [h, w], *conv)],
        "conv2d_sddmm": [(dy, x, mask4, topo, 1, 1, *conv)],
        "conv2d_grow_topk": [(dy, x, excl, 3, None, 0.0, 1.0, 1, 1, list(mask4.shape), *conv)],
        "conv2d_fused_weight_grad": [(dy, x, mask4, topo, 1, 1, excl, 3, None, 0.0, 1.0,
                                      *conv)],
    }


def _samples():
    return {**_linear_samples(), **_conv_samples()}


def _same(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_provider_contract():
    expected = ("cuda", "cpu") if INTERPRET else ("cuda",)
    assert kernels.DEVICES == expected
    assert set(kernels.IMPLS) == set(ops.LINEAR_OPS + ops.CONV_OPS)
    for name, fn in kernels.IMPLS.items():
        want = list(inspect.signature(getattr(ref, name)).parameters)
        assert list(inspect.signature(fn).parameters) == want, name
        assert kernels.OPS[name]._qualname == f"sparsekern_triton::{name}"
    assert sk.available_backends()["triton"] == "ok"


@pytest.mark.parametrize("name", list(ops.LINEAR_OPS + ops.CONV_OPS))
def test_opcheck(name):
    for args in _samples()[name]:
        torch.library.opcheck(kernels.OPS[name], args)
        _same(kernels.OPS[name](*args), getattr(ref, name)(*args))


def test_public_ops_on_triton_backend():
    with sk.backend("triton"):
        assert ops.resolve_backend(torch.device(DEVICE)) == "triton"
        for name, cases in _samples().items():
            for args in cases:
                _same(getattr(ops, name)(*args), getattr(ref, name)(*args))


def _int_params(module: nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).to(p.dtype))


def _run_module(make, backend_name, x0):
    torch.manual_seed(0)
    layer = make().to(DEVICE)
    _int_params(layer, 1)
    x = x0.clone().requires_grad_(True)
    with sk.backend(backend_name):
        y = layer(x)
        (y * torch.arange(y.numel(), device=DEVICE).view(y.shape).remainder(5)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("kind", ["linear_unstructured", "linear_bsr_16", "conv_g2_s2"])
def test_modules_match_between_backends(kind):
    if kind == "linear_unstructured":
        def make():
            return sk.SparseLinear(K, M, sparsity=0.7)
        x0 = ints(B, K)
    elif kind == "linear_bsr_16":
        def make():
            return sk.SparseLinear(K, M, sparsity=0.5, block_size=(16, 16), layout="bsr")
        x0 = ints(3, 2, K)
    else:
        def make():
            return sk.SparseConv2d(4, 6, 3, stride=2, padding=1, groups=2, sparsity=0.5)
        x0 = ints(1, 4, 6, 7)
    want = _run_module(make, "reference", x0)
    got = _run_module(make, "triton", x0)
    _same(got[0], want[0])
    _same(got[1], want[1])
    for name in want[2]:
        _same(got[2][name], want[2][name])


def _dst_run(backend_name, steps=6):
    """A RigL loop on continuous data: exact score ties have probability ~0, so the growth
    decisions do not hinge on the last bit of a sum whose order differs between backends."""
    torch.manual_seed(0)
    model = nn.Sequential(sk.SparseLinear(K, M, sparsity=0.8), nn.ReLU(),
                          sk.SparseLinear(M, 8, sparsity=0.8)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    method = sk.dst.RigL(model, opt, total_steps=4 * steps, delta_t=2, alpha=0.5)
    g = torch.Generator().manual_seed(3)
    history = []
    with sk.backend(backend_name):
        for _ in range(steps):
            x = torch.randn(B, K, generator=g).to(DEVICE)
            t = torch.randn(B, 8, generator=g).to(DEVICE)
            loss = 0.5 * ((model(x) - t) ** 2).sum()
            loss.backward()
            method.step()
            opt.zero_grad()
            history.append([(m.mask.clone(), m.weight.detach().clone())
                            for m in (model[0], model[2])])
    return history, method.stats()


def test_short_rigl_loop_matches_reference():
    """A few SGD steps with a RigL update every 2 steps (the growth top-k comes from the fused
    backward): masks agree exactly with the reference backend step by step, weights to fp32
    rounding (the backends sum in different orders, and which order MKL uses depends on the
    machine's ISA, so bit equality is not guaranteed by the arithmetic)."""
    want, want_stats = _dst_run("reference")
    got, got_stats = _dst_run("triton")
    assert want_stats["n_updates"] == 3 and got_stats["n_updates"] == want_stats["n_updates"]
    for step, (gs, ws) in enumerate(zip(got, want)):
        for (gm, gw), (wm, ww) in zip(gs, ws):
            assert torch.equal(gm, wm), f"mask differs after step {step + 1}"
            torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(want[0], want[-1])), "no mask moved"


def test_torch_compile_module_on_triton_backend():
    layer = sk.SparseLinear(K, M, sparsity=0.5).to(DEVICE)
    _int_params(layer, 4)
    x = ints(B, K)
    with sk.backend("triton"):
        compiled = torch.compile(layer, fullgraph=True)
        got = compiled(x)
    with sk.backend("reference"):
        want = layer(x)
    _same(got, want)


def test_constant_mask_view_is_read_in_place():
    """A ``bsr`` layer hands the ops an all-true view (every stride 0): the kernels read it in
    place (no ``M·K`` copy) and compute what the block-aligned mask it stands for gives."""
    from sparsekern.kernels._common import mask_u8
    bs = (16, 16)
    bmask = block_mask(M, K, bs, 0.5, seed=4)
    topo = topo_of(bmask, bs)
    ones = torch.ones((), dtype=torch.bool, device=DEVICE).expand(M, K)
    assert mask_u8(ones).untyped_storage().nbytes() == 1
    x, dy = ints(B, K), ints(B, M)
    vals = weight(bmask, bs, "bsr")
    for name, a in (("bsr_mm", x), ("bsr_mm_t", dy)):
        assert torch.equal(kernels.IMPLS[name](a, vals, ones, topo, *bs),
                           kernels.IMPLS[name](a, vals, bmask, topo, *bs))
    assert torch.equal(kernels.IMPLS["sddmm"](dy, x, ones, topo, *bs),
                       kernels.IMPLS["sddmm"](dy, x, bmask, topo, *bs))
    cmask = block_mask(6, 4 * 9, (2, 4), 0.5, seed=5)
    ctopo = topo_of(cmask, (2, 4))
    cvals = weight(cmask, (2, 4), "bsr")
    cones = torch.ones((), dtype=torch.bool, device=DEVICE).expand(6, 4, 3, 3)
    xc, conv = ints(2, 4, 5, 6), ([1, 1], [1, 1], [1, 1], 1)
    got = kernels.IMPLS["conv2d"](xc, cvals, cones, ctopo, 2, 4, *conv)
    assert torch.equal(got, kernels.IMPLS["conv2d"](xc, cvals, cmask.view(6, 4, 3, 3), ctopo,
                                                    2, 4, *conv))
    dyc = ints(*got.shape)
    for name, args in (("conv2d_grad_input", (dyc, cvals)), ("conv2d_sddmm", (dyc, xc))):
        extra = ([5, 6],) if name == "conv2d_grad_input" else ()
        a = kernels.IMPLS[name](*args, cones, ctopo, 2, 4, *extra, *conv)
        b = kernels.IMPLS[name](*args, cmask.view(6, 4, 3, 3), ctopo, 2, 4, *extra, *conv)
        assert torch.equal(a, b)
