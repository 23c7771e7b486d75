"""The C++ CPU kernels (``torch.ops.sparsekern._*``, built into ``sparsekern._C``) against the
reference, directly and through ``sk.backend("cpp")``.

Tolerances: fp32 ``rtol=1e-4`` and ``atol=1e-4·max|ref|`` (sums in a different order); bf16:
the kernels and the reference both accumulate in fp32 and round once, so they may differ by a
rounding flip: ``rtol=2^-7`` (two bf16 ulps), ``atol=1e-2·max|ref|``. Top-k indices are
compared exactly (integer-valued inputs make every dot product exact in any order; ties go
to the lower flat index, NaN ranks highest).
"""
import math
import os

import pytest
import torch

import sparsekern as sk
from sparsekern import reference as ref
from sparsekern.topology import build_topology, expand_blocks

try:
    from sparsekern import cpp_backend
except ImportError as e:  # pragma: no cover - CI builds the extension
    pytest.skip(f"sparsekern._C is not built: {e}", allow_module_level=True)

ops = torch.ops.sparsekern
ISAS = ["native", "avx2", "generic"]


@pytest.fixture(params=["fallback-on", "sparse-only"])
def dense_mode(request, monkeypatch):
    """Both the measured dense fallback and the sparse kernels at every density."""
    if request.param == "sparse-only":
        monkeypatch.setenv("SPARSEKERN_DENSE_THRESHOLD", "2")
    return request.param


def close(a, b, dtype):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    a, b = a.float(), b.float()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    if dtype == torch.bfloat16:
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-2 * scale, equal_nan=True)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)


def make_case(m, k, br, bc, sparsity, layout, dtype, gen, elem_inside=False):
    nbr, nbc = -(-m // br), -(-k // bc)
    bmask = torch.rand(nbr, nbc, generator=gen) >= sparsity
    if sparsity == 1.0:
        bmask[:] = False
    mask = expand_blocks(bmask, (br, bc), (m, k)).clone()
    if elem_inside:  # element masks inside active blocks
        mask &= torch.rand(m, k, generator=gen) > 0.3
    topo = build_topology(mask, (br, bc))
    w = torch.randn(m, k, generator=gen).to(dtype)
    if layout == "bsr":
        w = ref.gather_blocks(w, topo.row_ptr, topo.col_idx, br, bc)
    return w, mask, topo.tensors


def linear_ops_match(x, dy, w, mask, topo, br, bc, dtype, ref_mask=None):
    """bsr_mm, bsr_mm_t and sddmm against the reference (given ref_mask: the reference runs
    with it instead of mask)."""
    rm = mask if ref_mask is None else ref_mask
    close(ops._bsr_mm(x, w, mask, topo, br, bc), ref.bsr_mm(x, w, rm, topo, br, bc), dtype)
    close(ops._bsr_mm_t(dy, w, mask, topo, br, bc), ref.bsr_mm_t(dy, w, rm, topo, br, bc), dtype)
    close(ops._sddmm(dy, x, mask, topo, br, bc), ref.sddmm(dy, x, rm, topo, br, bc), dtype)


BLOCKS = [(1, 1), (4, 4), (16, 8), (32, 32), (3, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("block", BLOCKS)
def test_linear_ops_match_reference(block, layout, dtype, dense_mode):
    br, bc = block
    gen = torch.Generator().manual_seed(br * 100 + bc)
    for (m, k, b) in [(67, 45, 13), (40, 70, 0), (33, 97, 50)]:
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            w, mask, topo = make_case(m, k, br, bc, sparsity, layout, dtype, gen,
                                      elem_inside=sparsity == 0.5)
            x = torch.randn(b, k, generator=gen).to(dtype)
            dy = torch.randn(b, m, generator=gen).to(dtype)
            linear_ops_match(x, dy, w, mask, topo, br, bc, dtype)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_path(isa, monkeypatch):
    if isa != "native":
        monkeypatch.setenv("SPARSEKERN_CPU_ISA", isa)
    monkeypatch.setenv("SPARSEKERN_DENSE_THRESHOLD", "2")
    gen = torch.Generator().manual_seed(7)
    for (br, bc) in [(1, 1), (32, 32), (16, 8), (4, 4)]:
        for dtype in (torch.float32, torch.bfloat16):
            w, mask, topo = make_case(67, 45, br, bc, 0.5, "dense", dtype, gen, elem_inside=True)
            x = torch.randn(70, 45, generator=gen).to(dtype)
            dy = torch.randn(70, 67, generator=gen).to(dtype)
            linear_ops_match(x, dy, w, mask, topo, br, bc, dtype)
            xi = torch.randint(-3, 4, (70, 45), generator=gen).to(dtype)
            dyi = torch.randint(-3, 4, (70, 67), generator=gen).to(dtype)
            gm, gk = (67, 45) if (br, bc) == (1, 1) else (-(-67 // br), -(-45 // bc))
            excl = torch.rand(gm, gk, generator=gen) > 0.5
            cnt = torch.randint(0, 4, (gm, gk), generator=gen)
            kk = min(9, int((~excl).sum()))
            a = ops._grow_topk(dyi, xi, excl, kk, cnt, 0.25, 1.0, br, bc)
            r = ref.grow_topk(dyi, xi, excl, kk, cnt, 0.25, 1.0, br, bc)
            assert torch.equal(a[0], r[0])
            torch.testing.assert_close(a[1], r[1], rtol=0, atol=0)


def _grow_inputs(m, k, b, br, bc, gen, dtype=torch.float32, nan=False):
    x = torch.randint(-3, 4, (b, k), generator=gen).to(dtype)
    dy = torch.randint(-2, 3, (b, m), generator=gen).to(dtype)
    if nan and b > 3:
        x[1, 2] = float("nan")
        dy[3, m - 1] = float("nan")
    gm, gk = (m, k) if (br, bc) == (1, 1) else (-(-m // br), -(-k // bc))
    return x, dy, gm, gk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 8), (32, 32), (3, 5)])
def test_grow_topk_exact(block, dtype):
    """Exact indices with heavy ties (small integers), NaN, DST-EE bonus, k=1 and k=all."""
    br, bc = block
    gen = torch.Generator().manual_seed(11)
    for (m, k, b) in [(67, 45, 13), (300, 520, 17), (33, 40, 0)]:
        for nan in (False, True):
            x, dy, gm, gk = _grow_inputs(m, k, b, br, bc, gen, dtype, nan)
            excl = torch.rand(gm, gk, generator=gen) > 0.6
            allowed = int((~excl).sum())
            counters = [None, torch.randint(0, 3, (gm, gk), generator=gen)]
            if not nan and m == 67:  # the other counter dtypes once
                counters += [torch.randint(0, 3, (gm, gk), generator=gen).int(),
                             torch.rand(gm, gk, generator=gen)]
            for counter in counters:
                for kk in sorted({0, 1, min(allowed, 37), allowed}):
                    got = ops._grow_topk(dy, x, excl, kk, counter, 0.5, 1.0, br, bc)
                    exp = ref.grow_topk(dy, x, excl, kk, counter, 0.5, 1.0, br, bc)
                    assert torch.equal(got[0], exp[0]), (m, k, b, nan, kk)
                    assert got[1].dtype == exp[1].dtype == torch.float32
                    torch.testing.assert_close(got[1], exp[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (32, 32)])
@pytest.mark.parametrize("layout_dtype", [torch.float32, torch.bfloat16])
def test_fused_weight_grad(block, layout_dtype, dense_mode):
    br, bc = block
    gen = torch.Generator().manual_seed(5)
    dtype = layout_dtype
    for (m, k, b) in [(67, 45, 13), (130, 200, 20)]:
        x, dy, gm, gk = _grow_inputs(m, k, b, br, bc, gen, dtype)
        _, mask, topo = make_case(m, k, br, bc, 0.7, "dense", dtype, gen, elem_inside=True)
        excl = torch.rand(gm, gk, generator=gen) > 0.5
        for kk in sorted({0, 1, min(25, int((~excl).sum()))}):
            got = ops._fused_weight_grad(dy, x, mask, topo, br, bc, excl, kk, None, 0.0, 1.0)
            exp = ref.fused_weight_grad(dy, x, mask, topo, br, bc, excl, kk, None, 0.0, 1.0)
            close(got[0], exp[0], dtype)
            assert torch.equal(got[1], exp[1])
            torch.testing.assert_close(got[2], exp[2], rtol=0, atol=0)


def test_grow_topk_large_k_float_data():
    """Float data on a bigger layer: the selected set is the reference's up to near-ties."""
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(64, 700, generator=gen), torch.randn(64, 600, generator=gen)
    excl = torch.rand(600, 700, generator=gen) < 0.1
    k = 50_000
    got = ops._grow_topk(dy, x, excl, k, None, 0.0, 1.0, 1, 1)
    exp = ref.grow_topk(dy, x, excl, k, None, 0.0, 1.0, 1, 1)
    assert (got[1][:-1] >= got[1][1:]).all()
    assert not excl.flatten()[got[0]].any()
    kth = exp[1][-1].item()
    differ = set(got[0].tolist()) ^ set(exp[0].tolist())
    g = ref.dense_grad(dy, x).abs().flatten()
    assert all(abs(g[i].item() - kth) <= 1e-5 * kth for i in differ)
    torch.testing.assert_close(got[1], exp[1], rtol=1e-5, atol=1e-5)


def test_noncontiguous_and_int64_topology():
    gen = torch.Generator().manual_seed(2)
    w, mask, topo = make_case(64, 96, 16, 16, 0.5, "dense", torch.float32, gen)
    x = torch.randn(96, 20, generator=gen).t()          # non-contiguous
    wt = w.t().contiguous().t()                          # non-contiguous weight
    topo64 = [t.long() for t in topo]
    close(ops._bsr_mm(x, wt, mask, topo64, 16, 16), ref.bsr_mm(x, w, mask, topo, 16, 16),
          torch.float32)
    dy = torch.randn(1, 64, generator=gen).expand(20, 64)  # stride-0 rows, as autograd gives
    close(ops._bsr_mm_t(dy, w, mask, topo, 16, 16), ref.bsr_mm_t(dy, w, mask, topo, 16, 16),
          torch.float32)


# --------------------------------------------------------------------------- bad inputs
def _bad_setup():
    gen = torch.Generator().manual_seed(1)
    w, mask, topo = make_case(64, 64, 16, 16, 0.5, "bsr", torch.float32, gen)
    x = torch.randn(8, 64, generator=gen)
    return w, mask, topo, x


@pytest.mark.parametrize("case", [
    "x_shape", "x_dtype", "w_dtype_mismatch", "mask_dtype", "mask_shape", "topo_len",
    "col_range", "col_negative", "row_ptr_decreasing", "row_ptr_len", "row_ptr_end",
    "col_unsorted", "nnzb_mismatch", "block_zero", "slot_range", "slot_wrong",
    "row_idx_range", "topo_float", "x_3d",
])
def test_bad_inputs_raise(case):
    w, mask, topo, x = _bad_setup()
    topo = [t.clone() for t in topo]
    br = bc = 16
    fn = ops._bsr_mm
    args = None
    if case == "x_shape":
        x = torch.randn(8, 63)
    elif case == "x_dtype":
        x, w = x.double(), w.double()
    elif case == "w_dtype_mismatch":
        w = w.bfloat16()
    elif case == "mask_dtype":
        mask = mask.float()
    elif case == "mask_shape":
        mask = mask[:, :60]
    elif case == "topo_len":
        topo = topo[:2]
    elif case == "col_range":
        topo[1][0] = 4
    elif case == "col_negative":
        topo[1][-1] = -1
    elif case == "row_ptr_decreasing":
        topo[0][1], topo[0][2] = topo[0][2].item() + 1, topo[0][1].item()
    elif case == "row_ptr_len":
        topo[0] = topo[0][:-1]
    elif case == "row_ptr_end":
        topo[0][-1] += 1
    elif case == "col_unsorted":
        r = int(((topo[0][1:] - topo[0][:-1]) >= 2).nonzero()[0])
        s = int(topo[0][r])
        topo[1][s], topo[1][s + 1] = topo[1][s + 1].item(), topo[1][s].item()
    elif case == "nnzb_mismatch":
        w = w[:-1]
    elif case == "block_zero":
        br = 0
    elif case == "slot_range":
        fn = ops._bsr_mm_t
        topo[4][0] = 10_000
    elif case == "slot_wrong":
        fn = ops._bsr_mm_t
        topo[4][0], topo[4][1] = topo[4][1].item(), topo[4][0].item()
    elif case == "row_idx_range":
        fn = ops._bsr_mm_t
        topo[3][0] = 99
    elif case == "topo_float":
        topo[1] = topo[1].float()
    elif case == "x_3d":
        x = x[None]
    if fn is ops._bsr_mm_t:
        args = (torch.randn(8, 64), w, mask, topo, br, bc)
    else:
        args = (x, w, mask, topo, br, bc)
    with pytest.raises((RuntimeError, ValueError)):
        fn(*args)


def test_grow_bad_inputs():
    x, dy = torch.randn(4, 10), torch.randn(4, 8)
    excl = torch.zeros(8, 10, dtype=torch.bool)
    with pytest.raises(ValueError):
        ops._grow_topk(dy, x, excl, 81, None, 0.0, 1.0, 1, 1)   # k > allowed
    with pytest.raises(ValueError):
        ops._grow_topk(dy, x, excl, -1, None, 0.0, 1.0, 1, 1)
    with pytest.raises(RuntimeError):
        ops._grow_topk(dy, x, excl[:, :9], 3, None, 0.0, 1.0, 1, 1)
    with pytest.raises(RuntimeError):
        ops._grow_topk(dy, x, excl, 3, torch.zeros(8, 9), 0.0, 1.0, 1, 1)
    with pytest.raises(RuntimeError):
        ops._grow_topk(dy, x, excl, 3, None, 0.0, 1.0, 4, 4)  # exclude must be the block grid
    with pytest.raises(RuntimeError):
        ops._grow_topk(dy[:3], x, excl, 3, None, 0.0, 1.0, 1, 1)


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    gen = torch.Generator().manual_seed(9)
    w, mask, topo = make_case(40, 36, 8, 4, 0.5, "dense", torch.float32, gen)
    x, dy = torch.randn(6, 36, generator=gen), torch.randn(6, 40, generator=gen)
    excl = torch.rand(5, 9, generator=gen) > 0.5
    return [
        (ops._bsr_mm.default, (x, w, mask, topo, 8, 4)),
        (ops._bsr_mm_t.default, (dy, w, mask, topo, 8, 4)),
        (ops._sddmm.default, (dy, x, mask, topo, 8, 4)),
        (ops._grow_topk.default, (dy, x, excl, 5, None, 0.0, 1.0, 8, 4)),
        (ops._fused_weight_grad.default, (dy, x, mask, topo, 8, 4, excl, 5, None, 0.0, 1.0)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    op, args = _opcheck_samples()[i]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- through sparsekern
def test_cpp_backend_through_public_ops():
    assert sk.available_backends()["cpp"] == "ok"
    assert set(cpp_backend.IMPLS) >= {"bsr_mm", "bsr_mm_t", "sddmm", "grow_topk",
                                      "fused_weight_grad"}
    gen = torch.Generator().manual_seed(4)
    w, mask, topo = make_case(67, 45, 4, 4, 0.5, "dense", torch.float32, gen)
    x = torch.randn(13, 45, generator=gen, requires_grad=True)
    wp = w.clone().requires_grad_(True)
    with sk.backend("cpp"):
        y = torch.ops.sparsekern.bsr_mm(x, wp, mask, topo, 4, 4)
        (y * torch.arange(67.0)).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    wp2 = w.clone().requires_grad_(True)
    with sk.backend("reference"):
        y2 = torch.ops.sparsekern.bsr_mm(x2, wp2, mask, topo, 4, 4)
        (y2 * torch.arange(67.0)).sum().backward()
    close(y, y2, torch.float32)
    close(x.grad, x2.grad, torch.float32)
    close(wp.grad, wp2.grad, torch.float32)
    # float64 goes to the reference through the wrapper
    xd = torch.randn(3, 45, dtype=torch.float64)
    with sk.backend("cpp"):
        out = torch.ops.sparsekern.bsr_mm(xd, w.double(), mask, topo, 4, 4)
    torch.testing.assert_close(out, ref.bsr_mm(xd, w.double(), mask, topo, 4, 4))


def test_cpp_backend_modules():
    """A module on the C++ backend matches the reference backend (a changed signature fails
    here, it is not skipped)."""
    from sparsekern.nn import SparseLinear

    torch.manual_seed(0)
    layer = SparseLinear(45, 67, sparsity=0.5, block_size=(1, 1))
    x = torch.randn(13, 45)
    with sk.backend("reference"):
        y_ref = layer(x)
    with sk.backend("cpp"):
        y = layer(x)
    close(y.detach(), y_ref.detach(), torch.float32)


# --------------------------------------------------------------------------- convolution
CONV_GEOMS = [  # (N, C_in, H, W, C_out, kh, kw, stride, padding, dilation)
    (2, 5, 9, 7, 6, 3, 3, (1, 1), (1, 1), (1, 1)),
    (3, 8, 10, 10, 16, 3, 3, (2, 1), (0, 2), (1, 2)),
    (1, 16, 8, 8, 32, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 4, 11, 6, 7, 2, 3, (1, 2), (1, 0), (2, 1)),
    (0, 4, 6, 6, 8, 3, 3, (1, 1), (1, 1), (1, 1)),
    (1, 3, 5, 37, 5, 3, 3, (1, 1), (1, 1), (1, 1)),   # rows > 16 lanes, tiles start mid-row
]


def _conv_case(geom, br, bc, sparsity, layout, dtype, gen):
    n, cin, h, w_, cout, kh, kw, *_ = geom
    kd = cin * kh * kw
    w, m2, topo = make_case(cout, kd, br, bc, sparsity, "dense", dtype, gen,
                            elem_inside=sparsity == 0.5)
    mask = m2.view(cout, cin, kh, kw)
    weight = w.view(cout, cin, kh, kw)
    if layout == "bsr":
        weight = ref.gather_blocks(w, topo[0], topo[1], br, bc)
    x = torch.randn(n, cin, h, w_, generator=gen).to(dtype)
    return weight, mask, topo, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 16), (8, 3)])
def test_conv_ops_match_reference(block, layout, dtype):
    _check_conv_ops(block, layout, dtype)


@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("block", [(1, 1), (8, 3)])
def test_conv_dense_path_matches_reference(block, layout, monkeypatch):
    """The dense crossover path (oneDNN on the selected W ⊙ mask, SDDMM and growth gathered
    from the dense weight gradient), forced, on the kernels' cases."""
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "always")
    for dtype in (torch.float32, torch.bfloat16):
        _check_conv_ops(block, layout, dtype)
        if layout == "dense":
            _check_conv_grow(block, dtype)


CONV_OP_NAMES = ("conv2d", "conv2d_grad_input", "conv2d_sddmm", "conv2d_grow_topk",
                 "conv2d_fused_weight_grad")


def test_conv_plan_reports_the_path(monkeypatch):
    """_conv2d_plan: the env override, the crossover's direction at clear-cut shapes (a dense
    mask goes to oneDNN, a 90%-sparse wide layer stays sparse; growth keeps its own pass), and
    bad arguments."""
    one = [1, 1]
    args = lambda nnzb, br=1: ([64, 64, 32, 32], [64, 64, 3, 3], nnzb, br, br, one, one, one, 1)  # noqa: E731
    full, tenth = 64 * 576, 64 * 576 // 10
    for mode, want in (("never", "sparse"), ("always", "dense")):
        monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", mode)
        assert {ops._conv2d_plan(op, *args(tenth)) for op in CONV_OP_NAMES} == {want}
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "auto")
    for op in CONV_OP_NAMES[:3]:
        assert ops._conv2d_plan(op, *args(full)) == "dense", op
        assert ops._conv2d_plan(op, *args(tenth)) == "sparse", op
        assert ops._conv2d_plan(op, *args(4 * 36 // 10, 16)) == "sparse", op
    assert ops._conv2d_plan("conv2d_grow_topk", *args(full)) == "sparse"
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "sometimes")
    with pytest.raises(RuntimeError, match="SPARSEKERN_DENSE_CROSSOVER"):
        ops._conv2d_plan("conv2d", *args(tenth))
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "auto")
    with pytest.raises(RuntimeError, match="op must be one of"):
        ops._conv2d_plan("conv3d", *args(tenth))
    with pytest.raises(RuntimeError, match="groups"):
        ops._conv2d_plan("conv2d", [64, 64, 32, 32], [64, 32, 3, 3], 1, 1, 1, one, one, one, 2)
    with pytest.raises(RuntimeError, match="x_shape"):
        ops._conv2d_plan("conv2d", [64, 32, 32], [64, 64, 3, 3], 1, 1, 1, one, one, one, 1)


def test_conv_auto_crossover_matches_reference(monkeypatch):
    """With the crossover on (auto), a dense-ish layer and a sparse one give the reference's
    results whichever path each op takes."""
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "auto")
    gen = torch.Generator().manual_seed(3)
    geom = (3, 24, 9, 9, 40, 3, 3, (1, 1), (1, 1), (1, 1))
    st, pd, dl = ([1, 1],) * 3
    for sparsity in (0.2, 0.95):
        w, mask, topo, x = _conv_case(geom, 1, 1, sparsity, "dense", torch.float32, gen)
        y = ops._conv2d(x, w, mask, topo, 1, 1, st, pd, dl, 1)
        close(y, ref.conv2d(x, w, mask, topo, 1, 1, st, pd, dl, 1), torch.float32)
        dy = torch.randn(y.shape, generator=gen)
        close(ops._conv2d_grad_input(dy, w, mask, topo, 1, 1, [9, 9], st, pd, dl, 1),
              ref.conv2d_grad_input(dy, w, mask, topo, 1, 1, [9, 9], st, pd, dl, 1), torch.float32)
        close(ops._conv2d_sddmm(dy, x, mask, topo, 1, 1, st, pd, dl, 1),
              ref.conv2d_sddmm(dy, x, mask, topo, 1, 1, st, pd, dl, 1), torch.float32)


def _check_conv_ops(block, layout, dtype):
    br, bc = block
    gen = torch.Generator().manual_seed(br + 7 * bc)
    for geom in CONV_GEOMS:
        st, pd, dl = (list(v) for v in geom[7:])
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            w, mask, topo, x = _conv_case(geom, br, bc, sparsity, layout, dtype, gen)
            y = ref.conv2d(x, w, mask, topo, br, bc, st, pd, dl, 1)
            close(ops._conv2d(x, w, mask, topo, br, bc, st, pd, dl, 1), y, dtype)
            dy = torch.randn(y.shape, generator=gen).to(dtype)
            hw = list(x.shape[2:])
            close(ops._conv2d_grad_input(dy, w, mask, topo, br, bc, hw, st, pd, dl, 1),
                  ref.conv2d_grad_input(dy, w, mask, topo, br, bc, hw, st, pd, dl, 1), dtype)
            close(ops._conv2d_sddmm(dy, x, mask, topo, br, bc, st, pd, dl, 1),
                  ref.conv2d_sddmm(dy, x, mask, topo, br, bc, st, pd, dl, 1), dtype)


ELEM_SDDMM_GEOMS = [  # (N, C_in, H, W, C_out, kh, kw, stride, padding, dilation)
    (7, 3, 3, 3, 5, 3, 3, (1, 1), (1, 1), (1, 1)),     # chunks span several small images
    (3, 37, 6, 5, 11, 3, 3, (1, 1), (1, 1), (1, 1)),   # several channel ranges, odd sizes
    (2, 20, 9, 13, 9, 3, 3, (2, 1), (0, 2), (1, 2)),   # stride, asymmetric padding, dilation
    (5, 40, 4, 4, 3, 1, 1, (1, 1), (0, 0), (1, 1)),    # 1x1 kernel, rows with > 8 entries
    (1, 6, 17, 19, 4, 2, 3, (3, 2), (2, 1), (2, 1)),   # odd pixel count, strided tiles
    (0, 9, 5, 5, 6, 3, 3, (1, 1), (1, 1), (1, 1)),     # empty batch
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_elem_sddmm_matches_reference_and_former_form(dtype, monkeypatch):
    """Element-mask conv weight gradient (outer-product form, pixel chunks and channel ranges)
    against the reference and the former dot-product form, every conv argument, groups=1."""
    gen = torch.Generator().manual_seed(11)
    for geom in ELEM_SDDMM_GEOMS:
        st, pd, dl = (list(v) for v in geom[7:])
        for sparsity in (0.0, 0.9):
            _, mask, topo, x = _conv_case(geom, 1, 1, sparsity, "dense", dtype, gen)
            y = ref.conv2d(x, torch.zeros(mask.shape, dtype=dtype), mask, topo, 1, 1, st, pd, dl, 1)
            dy = torch.randn(y.shape, generator=gen).to(dtype)
            want = ref.conv2d_sddmm(dy, x, mask, topo, 1, 1, st, pd, dl, 1)
            monkeypatch.delenv("SPARSEKERN_CONV_SDDMM", raising=False)
            got = ops._conv2d_sddmm(dy, x, mask, topo, 1, 1, st, pd, dl, 1)
            close(got, want, dtype)
            monkeypatch.setenv("SPARSEKERN_CONV_SDDMM", "dot")
            close(ops._conv2d_sddmm(dy, x, mask, topo, 1, 1, st, pd, dl, 1).float(), got.float(),
                  dtype)
            if geom[0] == 0:
                assert got.numel() == 0 or not got.any()


def test_conv_bad_inputs_and_groups():
    gen = torch.Generator().manual_seed(0)
    geom = CONV_GEOMS[0]
    w, mask, topo, x = _conv_case(geom, 4, 4, 0.5, "dense", torch.float32, gen)
    one = [1, 1]
    with pytest.raises(RuntimeError):   # grouped convolutions are not in the C++ kernels
        ops._conv2d(x, w, mask, topo, 4, 4, one, one, one, 2)
    with pytest.raises(RuntimeError):
        ops._conv2d(x[:, :4], w, mask, topo, 4, 4, one, one, one, 1)
    with pytest.raises(RuntimeError):
        ops._conv2d(x, w, mask, topo, 4, 4, [0, 1], one, one, 1)
    with pytest.raises(RuntimeError):
        ops._conv2d(x, w, mask, [t.clone() for t in topo[:4]], 4, 4, one, one, one, 1)
    bad = [t.clone() for t in topo]
    bad[1][0] = 10_000
    with pytest.raises(RuntimeError):
        ops._conv2d(x, w, mask, bad, 4, 4, one, one, one, 1)
    # through the backend, groups != 1 runs on the reference
    xg = torch.randn(2, 4, 6, 6, generator=gen)
    wg = torch.randn(6, 2, 3, 3, generator=gen)
    mg = torch.rand(6, 2, 3, 3, generator=gen) > 0.5
    tg = build_topology(mg.flatten(1), (1, 1)).tensors
    out = cpp_backend.IMPLS["conv2d"](xg, wg, mg, tg, 1, 1, one, one, one, 2)
    torch.testing.assert_close(out, ref.conv2d(xg, wg, mg, tg, 1, 1, one, one, one, 2))


def test_conv_opcheck_and_autograd_through_backend():
    gen = torch.Generator().manual_seed(1)
    geom = CONV_GEOMS[1]
    st, pd, dl = (list(v) for v in geom[7:])
    w, mask, topo, x = _conv_case(geom, 4, 4, 0.5, "dense", torch.float32, gen)
    y = ops._conv2d(x, w, mask, topo, 4, 4, st, pd, dl, 1)
    dy = torch.randn(y.shape, generator=gen)
    hw = list(x.shape[2:])
    for op, args in [(ops._conv2d.default, (x, w, mask, topo, 4, 4, st, pd, dl, 1)),
                     (ops._conv2d_grad_input.default, (dy, w, mask, topo, 4, 4, hw, st, pd, dl, 1)),
                     (ops._conv2d_sddmm.default, (dy, x, mask, topo, 4, 4, st, pd, dl, 1))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert {"conv2d", "conv2d_grad_input", "conv2d_sddmm"} <= set(cpp_backend.IMPLS)
    grads = []
    for name in ("cpp", "reference"):
        xr = x.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)
        with sk.backend(name):
            out = torch.ops.sparsekern.conv2d(xr, wr, mask, topo, 4, 4, st, pd, dl, 1)
            (out * dy).sum().backward()
        grads.append((out.detach(), xr.grad, wr.grad))
    for a, b in zip(*grads):
        close(a, b, torch.float32)


def _conv_grow_case(geom, gen, dtype, nan=False):
    """Small-integer x and dy for a conv geometry: exact sums in any order, many ties."""
    n, cin, h, w_, cout, kh, kw, st, pd, dl = geom
    x = torch.randint(-3, 4, (n, cin, h, w_), generator=gen).to(dtype)
    y = ref.conv2d(x, torch.ones(cout, cin, kh, kw, dtype=dtype),
                   torch.ones(cout, cin, kh, kw, dtype=torch.bool),
                   build_topology(torch.ones(cout, cin * kh * kw, dtype=torch.bool)).tensors,
                   1, 1, list(st), list(pd), list(dl), 1)
    dy = torch.randint(-2, 3, y.shape, generator=gen).to(dtype)
    if nan and n > 0:
        x[0, 0, 0, 0] = float("nan")
    return x, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 16), (8, 3)])
def test_conv_grow_topk_and_fused_exact(block, dtype):
    """conv2d_grow_topk / conv2d_fused_weight_grad against the reference: exact indices and
    scores (integer data, ties, NaN, DST-EE bonus, k = 0, 1, some, all), odd geometries,
    empty batch; the fused values within the dtype's tolerance."""
    _check_conv_grow(block, dtype)


def _check_conv_grow(block, dtype):
    br, bc = block
    gen = torch.Generator().manual_seed(br * 31 + bc)
    for geom in CONV_GEOMS:
        n, cin, h, w_, cout, kh, kw, st, pd, dl = geom
        st, pd, dl = list(st), list(pd), list(dl)
        kd = cin * kh * kw
        gm, gk = (cout, kd) if block == (1, 1) else (-(-cout // br), -(-kd // bc))
        for nan in (False, True):
            x, dy = _conv_grow_case(geom, gen, dtype, nan)
            excl = torch.rand(gm, gk, generator=gen) > 0.6
            allowed = int((~excl).sum())
            counter = torch.randint(0, 3, (gm, gk), generator=gen) if nan else None
            for kk in sorted({0, min(allowed, 1), min(allowed, 23), allowed}):
                ws = [cout, cin, kh, kw]
                got = ops._conv2d_grow_topk(dy, x, excl, kk, counter, 0.5, 1.0, br, bc, ws,
                                            st, pd, dl, 1)
                exp = ref.conv2d_grow_topk(dy, x, excl, kk, counter, 0.5, 1.0, br, bc, ws,
                                           st, pd, dl, 1)
                assert torch.equal(got[0], exp[0]), (geom, nan, kk)
                torch.testing.assert_close(got[1], exp[1], rtol=0, atol=0, equal_nan=True)
            _, mask, topo, _ = _conv_case(geom, br, bc, 0.5, "dense", dtype, gen)
            kk = min(allowed, 9)
            got = ops._conv2d_fused_weight_grad(dy, x, mask, topo, br, bc, excl, kk, counter,
                                                0.5, 1.0, st, pd, dl, 1)
            exp = ref.conv2d_fused_weight_grad(dy, x, mask, topo, br, bc, excl, kk, counter,
                                               0.5, 1.0, st, pd, dl, 1)
            close(got[0], exp[0], dtype)
            assert torch.equal(got[1], exp[1])
            torch.testing.assert_close(got[2], exp[2], rtol=0, atol=0, equal_nan=True)


def test_conv_grow_panels_and_bad_inputs(monkeypatch):
    """A layer whose gradient spans several row panels; float data; bad arguments raise."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 256, 5, 5, generator=gen)
    dy = torch.randn(2, 300, 5, 5, generator=gen)          # G: 300 x 2304, two row panels
    excl = torch.rand(300, 230, generator=gen) > 0.5
    args = (0.0, 1.0, 1, 1, [300, 256, 3, 3], [1, 1], [1, 1], [1, 1], 1)
    excl1 = torch.rand(300, 2304, generator=gen) > 0.5
    got = ops._conv2d_grow_topk(dy, x, excl1, 5000, None, *args)
    exp = ref.conv2d_grow_topk(dy, x, excl1, 5000, None, *args)
    assert (torch.isin(got[0], exp[0]).float().mean() > 0.999).item()
    torch.testing.assert_close(got[1], exp[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="exclude"):
        ops._conv2d_grow_topk(dy, x, excl, 5, None, *args)
    with pytest.raises(ValueError, match="k="):
        ops._conv2d_grow_topk(dy, x, excl1, 10 ** 7, None, *args)
    with pytest.raises(RuntimeError, match="dy must be"):
        ops._conv2d_grow_topk(dy[:, :299], x, excl1, 5, None, *args)
    with pytest.raises(RuntimeError, match="weight"):
        ops._conv2d_grow_topk(dy, x, excl1, 5, None, 0.0, 1.0, 1, 1, [300, 256, 3], [1, 1],
                              [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="groups"):
        ops._conv2d_grow_topk(dy, x, excl1, 5, None, 0.0, 1.0, 1, 1, [300, 128, 3, 3], [1, 1],
                              [1, 1], [1, 1], 2)


def test_conv_grow_opcheck_and_backend():
    gen = torch.Generator().manual_seed(4)
    geom = CONV_GEOMS[1]
    st, pd, dl = (list(v) for v in geom[7:])
    x, dy = _conv_grow_case(geom, gen, torch.float32)
    _, mask, topo, _ = _conv_case(geom, 4, 4, 0.5, "dense", torch.float32, gen)
    excl = torch.zeros(4, 18, dtype=torch.bool)
    ws = list(mask.shape)
    for op, args in [
            (ops._conv2d_grow_topk.default, (dy, x, excl, 7, None, 0.0, 1.0, 4, 4, ws, st, pd, dl, 1)),
            (ops._conv2d_fused_weight_grad.default,
             (dy, x, mask, topo, 4, 4, excl, 7, None, 0.0, 1.0, st, pd, dl, 1))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert {"conv2d_grow_topk", "conv2d_fused_weight_grad"} <= set(cpp_backend.IMPLS)
    with sk.backend("cpp"):
        got = torch.ops.sparsekern.conv2d_grow_topk(dy, x, excl, 7, None, 0.0, 1.0, 4, 4, ws,
                                                    st, pd, dl, 1)
    exp = ref.conv2d_grow_topk(dy, x, excl, 7, None, 0.0, 1.0, 4, 4, ws, st, pd, dl, 1)
    assert torch.equal(got[0], exp[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(32, 32), (16, 8), (3, 5), (1, 1)])
def test_all_true_view_mask(block, dtype):
    """The all-true expanded mask (what layout="bsr" modules pass on the CPU): the kernels skip
    the per-element mask and, for fp32 bsr values, read interior blocks in place; edge blocks
    (ragged shapes) are still packed, so NaN in their padding never reaches the output. Equal
    to the reference with a materialised all-true mask, on every linear op and both layouts."""
    br, bc = block
    gen = torch.Generator().manual_seed(br * 7 + bc)
    for (m, k, b) in [(96, 64, 20), (67, 45, 13)]:
        w, mask, topo = make_case(m, k, br, bc, 0.6, "bsr", dtype, gen)
        if w.numel():
            w[:, -1, -1] = float("nan")  # the corner entry: padding of edge blocks on (67, 45)
            edge = torch.zeros_like(w, dtype=torch.bool)
            rows = ref.block_coords(topo[0], topo[1])
            edge[((rows[0] + 1) * br > m) | ((rows[1] + 1) * bc > k)] = True
            w = torch.where(edge | (torch.rand(w.shape, generator=gen) > 0.05), w,
                            torch.zeros((), dtype=dtype))
            w[~edge.any(-1).any(-1), -1, -1] = 1.5  # interior blocks: a real value there
        ones = torch.ones((), dtype=torch.bool).expand(m, k)
        full = torch.ones(m, k, dtype=torch.bool)
        x = torch.randn(b, k, generator=gen).to(dtype)
        dy = torch.randn(b, m, generator=gen).to(dtype)
        wd = ref.scatter_blocks(w.nan_to_num(0.0), topo[0], topo[1], (m, k)).contiguous()
        for weight in (w, wd):
            linear_ops_match(x, dy, weight, ones, topo, br, bc, dtype, ref_mask=full)
        gm, gk = (m, k) if block == (1, 1) else (-(-m // br), -(-k // bc))
        excl = torch.zeros(gm, gk, dtype=torch.bool)
        got = ops._fused_weight_grad(dy, x, ones, topo, br, bc, excl, 3, None, 0.0, 1.0)
        exp = ref.fused_weight_grad(dy, x, full, topo, br, bc, excl, 3, None, 0.0, 1.0)
        close(got[0], exp[0], dtype)
        assert torch.equal(got[1], exp[1])
    # an all-false view is a real (empty) mask: everything is zero
    f = torch.zeros((), dtype=torch.bool).expand(m, k)
    assert not ops._bsr_mm(x, w.nan_to_num(0.0), f, topo, br, bc).any()


def test_bsr_module_passes_all_true_view_and_matches_reference():
    """A layout="bsr" SparseLinear on the C++ backend (all-true view, blocks read in place)
    against the reference backend: output and every gradient."""
    torch.manual_seed(0)
    layer = sk.nn.SparseLinear(96, 64, sparsity=0.7, block_size=(32, 32), layout="bsr")
    x = torch.randn(10, 96)
    outs = []
    for name in ("cpp", "reference"):
        layer.zero_grad()
        xr = x.clone().requires_grad_(True)
        with sk.backend(name):
            y = layer(xr)
            (y * torch.arange(y.numel()).reshape(y.shape).float()).sum().backward()
        outs.append((y.detach(), xr.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    assert layer._kernel_mask(None).stride() == (0, 0)
    for a, b in zip(*outs):
        close(a, b, torch.float32)
