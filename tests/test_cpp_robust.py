"""Reliability of the C++ CPU kernels (``torch.ops.sparsekern._*``): no crash on degenerate or
absurd sizes, bit-identical results from run to run at a fixed thread count, dormant weights
that are zero by selection (NaN/inf stored off the mask never reach a result), a dense
fallback that releases its memory and is safe from several threads, and messages that name
the schema's arguments.

Tolerances: fp32 ``rtol=1e-4``, ``atol=1e-4·max|ref|``; bf16 ``rtol=2^-7``, ``atol=1e-2·max|ref|``
(as tests/test_cpp.py); NaN positions must be identical. Run-to-run comparisons are exact.
"""
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

from sparsekern import reference as ref
from sparsekern.topology import build_topology, expand_blocks

try:
    from sparsekern import cpp_backend  # noqa: F401
except ImportError as e:  # pragma: no cover - CI builds the extension
    pytest.skip(f"sparsekern._C is not built: {e}", allow_module_level=True)

ops = torch.ops.sparsekern
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV_ARGS = ([1, 1], [1, 1], [1, 1], 1)


def close(a, b, dtype):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    a, b = a.float(), b.float()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN positions differ"
    finite = b[torch.isfinite(b)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    if dtype == torch.bfloat16:
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-2 * scale, equal_nan=True)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)


def run_script(body, env=None):
    """Runs `body` in a fresh interpreter (a crash there is a failed assertion here, not a dead
    test process); returns the JSON its last stdout line holds."""
    code = "import json, torch, sparsekern\nops = torch.ops.sparsekern\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, (
        f"subprocess died with rc={proc.returncode} (negative: a signal)\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- crashes
CRASH_CASES = r'''
from sparsekern import reference as ref
from sparsekern.topology import build_topology
A = ([1, 1], [1, 1], [1, 1], 1)
out = {}

def record(name, fn, reffn=None):
    print(name, flush=True)  # the last name printed is the one that crashed
    try:
        r = fn()
    except Exception as e:
        out[name] = ["raised", type(e).__name__, str(e).splitlines()[0]]
        return
    r = r if isinstance(r, tuple) else (r,)
    same = None
    if reffn is not None:
        rr = reffn()
        rr = rr if isinstance(rr, tuple) else (rr,)
        same = all(a.shape == b.shape and torch.equal(a.float(), b.float()) for a, b in zip(r, rr))
    out[name] = ["ok", [list(t.shape) for t in r], same]

def one_block_topo():
    return [torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([0]),
            torch.tensor([0])]

# zero-size reduction dimension: C_in = 0
mask = torch.ones(4, 0, 3, 3, dtype=torch.bool)
topo = build_topology(mask.flatten(1), (1, 1)).tensors
x, dy = torch.randn(2, 0, 5, 5), torch.randn(2, 4, 5, 5)
ex = torch.zeros(4, 0, dtype=torch.bool)
record("cin0_fused", lambda: ops._conv2d_fused_weight_grad(dy, x, mask, topo, 1, 1, ex, 0, None, 0., 1., *A),
       lambda: ref.conv2d_fused_weight_grad(dy, x, mask, topo, 1, 1, ex, 0, None, 0., 1., *A))
record("cin0_sddmm", lambda: ops._conv2d_sddmm(dy, x, mask, topo, 1, 1, *A),
       lambda: ref.conv2d_sddmm(dy, x, mask, topo, 1, 1, *A))
record("cin0_grow", lambda: ops._conv2d_grow_topk(dy, x, ex, 0, None, 0., 1., 1, 1, [4, 0, 3, 3], *A),
       lambda: ref.conv2d_grow_topk(dy, x, ex, 0, None, 0., 1., 1, 1, [4, 0, 3, 3], *A))
record("cin0_conv2d", lambda: ops._conv2d(x, torch.randn(4, 0, 3, 3), mask, topo, 1, 1, *A),
       lambda: torch.zeros(2, 4, 5, 5))
# zero kernel height: no convolution (torch raises too)
mk0 = torch.ones(4, 2, 0, 3, dtype=torch.bool)
t0 = build_topology(mk0.flatten(1), (1, 1)).tensors
x2 = torch.randn(2, 2, 5, 5)
ex0 = torch.zeros(4, 0, dtype=torch.bool)
record("kh0_fused", lambda: ops._conv2d_fused_weight_grad(dy, x2, mk0, t0, 1, 1, ex0, 0, None, 0., 1., *A))
record("kh0_grow", lambda: ops._conv2d_grow_topk(dy, x2, ex0, 0, None, 0., 1., 1, 1, [4, 2, 0, 3], *A))
record("kh0_sddmm", lambda: ops._conv2d_sddmm(dy, x2, mk0, t0, 1, 1, *A))
# absurd block sizes and conv arguments
b = 2 ** 62
xl, dyl = torch.randn(3, 8), torch.randn(3, 8)
m8 = torch.ones(8, 8, dtype=torch.bool)
e11 = torch.zeros(1, 1, dtype=torch.bool)
record("big_grow", lambda: ops._grow_topk(dyl, xl, e11, 1, None, 0., 1., b, b))
record("big_bsr_mm", lambda: ops._bsr_mm(xl, torch.randn(8, 8), m8, one_block_topo(), b, b))
record("big_bsr_mm_t", lambda: ops._bsr_mm_t(dyl, torch.randn(8, 8), m8, one_block_topo(), b, b))
record("big_sddmm", lambda: ops._sddmm(dyl, xl, m8, one_block_topo(), b, b))
record("big_fused", lambda: ops._fused_weight_grad(dyl, xl, m8, one_block_topo(), b, b, e11, 1, None, 0., 1.))
record("big_bc_only", lambda: ops._grow_topk(dyl, xl, e11, 1, None, 0., 1., 1, 2 ** 63 - 1))
# a small block on a huge (empty-batch, all-true-view) matrix: padded past 2^31 columns
mhuge = torch.ones((), dtype=torch.bool).expand(4, 2 ** 31 + 5)
record("big_padded", lambda: ops._sddmm(torch.randn(0, 4), torch.randn(0, 2 ** 31 + 5), mhuge,
                                        [torch.tensor([0, 0]), torch.tensor([], dtype=torch.int32),
                                         torch.zeros(2, dtype=torch.int32),
                                         torch.tensor([], dtype=torch.int32), torch.tensor([], dtype=torch.int32)],
                                        4, 16))
mc = torch.ones(4, 2, 3, 3, dtype=torch.bool)
xc, wc, dyc = torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3), torch.randn(1, 4, 5, 5)
record("big_conv2d", lambda: ops._conv2d(xc, wc, mc, one_block_topo(), b, b, *A))
record("big_conv2d_grad_input", lambda: ops._conv2d_grad_input(dyc, wc, mc, one_block_topo(), b, b, [5, 5], *A))
record("big_conv2d_sddmm", lambda: ops._conv2d_sddmm(dyc, xc, mc, one_block_topo(), b, b, *A))
record("big_conv2d_grow", lambda: ops._conv2d_grow_topk(dyc, xc, e11, 1, None, 0., 1., b, b, [4, 2, 3, 3], *A))
record("big_conv2d_fused", lambda: ops._conv2d_fused_weight_grad(dyc, xc, mc, one_block_topo(), b, b, e11, 1, None, 0., 1., *A))
t1 = build_topology(mc.flatten(1), (1, 1)).tensors
record("big_padding", lambda: ops._conv2d(xc, wc, mc, t1, 1, 1, [1, 1], [2 ** 62, 2 ** 62], [1, 1], 1))
record("big_dilation", lambda: ops._conv2d(xc, wc, mc, t1, 1, 1, [1, 1], [1, 1], [2 ** 62, 1], 1))
record("zero_stride", lambda: ops._conv2d(xc, wc, mc, t1, 1, 1, [0, 1], [1, 1], [1, 1], 1))
record("big_weight_shape", lambda: ops._conv2d_grow_topk(torch.randn(0, 4, 1, 1), torch.randn(0, 2, 5, 5),
                                                         torch.zeros(4, 1, dtype=torch.bool), 0, None, 0., 1.,
                                                         1, 1, [4, 2, 2 ** 40, 2 ** 40], [1, 1], [0, 0], [1, 1], 1))
print(json.dumps(out))
'''


def test_former_crashes_raise_or_match_reference():
    out = run_script(CRASH_CASES)
    for name in ("cin0_fused", "cin0_sddmm", "cin0_grow"):
        assert out[name][0] == "ok" and out[name][2] is True, (name, out[name])
    # C_in = 0: every output pixel sums over nothing
    assert out["cin0_conv2d"] == ["ok", [[2, 4, 5, 5]], True], out["cin0_conv2d"]
    for name in ("kh0_fused", "kh0_grow", "kh0_sddmm"):
        assert out[name][:2] == ["raised", "RuntimeError"] and "kh, kw >= 1" in out[name][2], out[name]
    for name, v in out.items():
        if name.startswith("big_") and name not in ("big_padding", "big_dilation", "big_weight_shape"):
            assert v[:2] == ["raised", "RuntimeError"] and "block size br=" in v[2], (name, v)
    assert "at most 2^24 entries per block" in out["big_grow"][2], out["big_grow"]
    assert "at most 2^31 - 1 padded rows" in out["big_padded"][2], out["big_padded"]
    assert "padding must be in" in out["big_padding"][2], out["big_padding"]
    assert "dilation must be in" in out["big_dilation"][2], out["big_dilation"]
    assert "stride must be in" in out["zero_stride"][2], out["zero_stride"]
    assert out["big_weight_shape"][0] == "raised" and "below 2^31" in out["big_weight_shape"][2]


# --------------------------------------------------------------------------- determinism
@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _bits(o):
    ts = o if isinstance(o, (tuple, list)) else (o,)
    return tuple(t.contiguous().view(torch.uint8).numpy().tobytes() if t.is_floating_point()
                 else t.numpy().tobytes() for t in ts)


def _assert_repeatable(name, fn, n=10):
    first = _bits(fn())
    for i in range(n - 1):
        assert _bits(fn()) == first, f"{name}: call {i + 2} differs from call 1"


def _block_mask(shape, block, density, gen):
    m, k = shape
    nbr, nbc = -(-m // block[0]), -(-k // block[1])
    bm = torch.rand(nbr, nbc, generator=gen) < density
    mask = expand_blocks(bm, block, (m, k)).clone()
    return mask, build_topology(mask, block).tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(1, 1), (16, 16)])
def test_bit_identical_run_to_run_with_two_threads(block, dtype, two_threads):
    br, bc = block
    gen = torch.Generator().manual_seed(3)
    # conv: many small pixel tiles, so both threads take many items
    cout, cin = 32, 16
    mask2, topo = _block_mask((cout, cin * 9), block, 0.5, gen)
    mask = mask2.view(cout, cin, 3, 3)
    x = torch.randn(48, cin, 6, 6, generator=gen).to(dtype)
    dy = torch.randn(48, cout, 6, 6, generator=gen).to(dtype)
    w = torch.randn(cout, cin, 3, 3, generator=gen).to(dtype)
    gm, gk = (cout, cin * 9) if block == (1, 1) else (-(-cout // br), -(-cin * 9 // bc))
    ex = torch.rand(gm, gk, generator=gen) < 0.3
    k = min(40, int((~ex).sum()) // 2)
    _assert_repeatable("conv2d_sddmm", lambda: ops._conv2d_sddmm(dy, x, mask, topo, br, bc, *CONV_ARGS))
    _assert_repeatable("conv2d_fused_weight_grad", lambda: ops._conv2d_fused_weight_grad(
        dy, x, mask, topo, br, bc, ex, k, None, 0., 1., *CONV_ARGS))
    _assert_repeatable("conv2d_grow_topk", lambda: ops._conv2d_grow_topk(
        dy, x, ex, k, None, 0., 1., br, bc, [cout, cin, 3, 3], *CONV_ARGS))
    _assert_repeatable("conv2d", lambda: ops._conv2d(x, w, mask, topo, br, bc, *CONV_ARGS), n=5)
    _assert_repeatable("conv2d_grad_input", lambda: ops._conv2d_grad_input(
        dy, w, mask, topo, br, bc, [6, 6], *CONV_ARGS), n=5)
    # linear
    m, kk, b = 96, 160, 96
    lmask, ltopo = _block_mask((m, kk), block, 0.5, gen)
    lx = torch.randn(b, kk, generator=gen).to(dtype)
    ldy = torch.randn(b, m, generator=gen).to(dtype)
    lw = torch.randn(m, kk, generator=gen).to(dtype)
    lgm, lgk = (m, kk) if block == (1, 1) else (-(-m // br), -(-kk // bc))
    lex = torch.rand(lgm, lgk, generator=gen) < 0.3
    lk = min(40, int((~lex).sum()) // 2)
    _assert_repeatable("sddmm", lambda: ops._sddmm(ldy, lx, lmask, ltopo, br, bc))
    _assert_repeatable("grow_topk", lambda: ops._grow_topk(ldy, lx, lex, lk, None, 0., 1., br, bc))
    _assert_repeatable("fused_weight_grad", lambda: ops._fused_weight_grad(
        ldy, lx, lmask, ltopo, br, bc, lex, lk, None, 0., 1.))
    _assert_repeatable("bsr_mm", lambda: ops._bsr_mm(lx, lw, lmask, ltopo, br, bc), n=5)
    _assert_repeatable("bsr_mm_t", lambda: ops._bsr_mm_t(ldy, lw, lmask, ltopo, br, bc), n=5)


# --------------------------------------------------------------------------- dormant weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 8)])
@pytest.mark.parametrize("path", ["sparse", "dense-fallback"])
def test_dormant_nan_inf_never_reach_a_result(path, block, layout, dtype, monkeypatch):
    """NaN/inf in W off the mask (inside active blocks and outside every block), and a mask
    entry the topology does not cover: results equal the dense op on the effective weight."""
    monkeypatch.setenv("SPARSEKERN_DENSE_THRESHOLD", "2" if path == "sparse" else "0")
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "never" if path == "sparse" else "always")
    br, bc = block
    gen = torch.Generator().manual_seed(br * 10 + bc)
    m, k, b = 37, 45, 19
    mask, _ = _block_mask((m, k), block, 0.6, gen)
    mask &= torch.rand(m, k, generator=gen) < 0.7  # element masks inside active blocks
    topo = build_topology(mask, block)
    cover = ref.topology_cover(topo.row_ptr, topo.col_idx, br, bc, (m, k))
    w = torch.randn(m, k, generator=gen)
    off = ~mask
    w[off] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(int(off.sum()))[:int(off.sum())]
    # a mask entry outside the topology (not covered): dormant as well
    unc = (~cover).nonzero()
    if len(unc):
        i, j = unc[0].tolist()
        mask[i, j] = True
        w[i, j] = float("nan")
    eff = torch.where(mask & cover, w, torch.zeros(()))
    w = w.to(dtype)
    wop = ref.gather_blocks(w, topo.row_ptr, topo.col_idx, br, bc) if layout == "bsr" else w
    x = torch.randn(b, k, generator=gen).to(dtype)
    dy = torch.randn(b, m, generator=gen).to(dtype)
    y = ops._bsr_mm(x, wop, mask, topo.tensors, br, bc)
    close(y, F.linear(x.float(), eff.to(dtype).float()).to(dtype), dtype)
    assert torch.isfinite(y).all()
    dx = ops._bsr_mm_t(dy, wop, mask, topo.tensors, br, bc)
    close(dx, (dy.float() @ eff.to(dtype).float()).to(dtype), dtype)
    assert torch.isfinite(dx).all()
    # conv: the same weight as [m, 5, 3, 3] (k = 45)
    cw = wop if layout == "bsr" else w.view(m, 5, 3, 3)
    cmask, ceff = mask.view(m, 5, 3, 3), eff.to(dtype).float().view(m, 5, 3, 3)
    cx = torch.randn(2, 5, 6, 6, generator=gen).to(dtype)
    cy = ops._conv2d(cx, cw, cmask, topo.tensors, br, bc, *CONV_ARGS)
    close(cy, F.conv2d(cx.float(), ceff, padding=1).to(dtype), dtype)
    assert torch.isfinite(cy).all()
    cdy = torch.randn(cy.shape, generator=gen).to(dtype)
    cdx = ops._conv2d_grad_input(cdy, cw, cmask, topo.tensors, br, bc, [6, 6], *CONV_ARGS)
    close(cdx, torch.nn.grad.conv2d_input(cx.shape, ceff, cdy.float(), padding=1).to(dtype), dtype)
    assert torch.isfinite(cdx).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 8)])
@pytest.mark.parametrize("path", ["sparse", "dense-fallback"])
def test_sddmm_is_exactly_zero_off_the_mask_even_where_the_gradient_is_nan(path, block, dtype,
                                                                            monkeypatch):
    monkeypatch.setenv("SPARSEKERN_DENSE_THRESHOLD", "2" if path == "sparse" else "0")
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "never" if path == "sparse" else "always")
    br, bc = block
    gen = torch.Generator().manual_seed(5)
    m, k, b = 37, 45, 19
    mask, _ = _block_mask((m, k), block, 0.6, gen)
    mask &= torch.rand(m, k, generator=gen) < 0.7
    topo = build_topology(mask, block).tensors
    x = torch.randn(b, k, generator=gen).to(dtype)
    dy = torch.randn(b, m, generator=gen).to(dtype)
    x[3, :] = float("nan")  # every gradient entry NaN
    x[4, ::3] = float("inf")
    for got in (ops._sddmm(dy, x, mask, topo, br, bc),
                ops._fused_weight_grad(dy, x, mask, topo, br, bc,
                                       torch.zeros(1, 1, dtype=torch.bool).expand(
                                           *(((m, k) if block == (1, 1) else
                                              (-(-m // br), -(-k // bc))))), 0, None, 0., 1.)[0]):
        dense = ref.scatter_blocks(got.float(), topo[0], topo[1], (m, k))
        cover = ref.topology_cover(topo[0], topo[1], br, bc, (m, k))
        assert torch.equal(dense[cover & ~mask], torch.zeros(int((cover & ~mask).sum())))
        assert torch.isnan(dense[mask]).all()
    # conv: NaN in x everywhere
    cmask = mask[:, :36].reshape(m, 4, 3, 3).contiguous()
    ctopo = build_topology(cmask.flatten(1), block).tensors
    cx = torch.full((2, 4, 5, 5), float("nan")).to(dtype)
    cdy = torch.randn(2, m, 5, 5, generator=gen).to(dtype)
    got = ops._conv2d_sddmm(cdy, cx, cmask, ctopo, br, bc, *CONV_ARGS)
    dense = ref.scatter_blocks(got.float(), ctopo[0], ctopo[1], (m, 36))
    cover = ref.topology_cover(ctopo[0], ctopo[1], br, bc, (m, 36))
    assert torch.equal(dense[cover & ~cmask.flatten(1)], torch.zeros(int((cover & ~cmask.flatten(1)).sum())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("block", [(1, 1), (4, 4)])
def test_conv_dormant_nan_never_reaches_a_result(block, layout, dtype):
    br, bc = block
    gen = torch.Generator().manual_seed(11)
    cout, cin = 12, 4
    mask2, _ = _block_mask((cout, cin * 9), block, 0.6, gen)
    mask2 &= torch.rand(cout, cin * 9, generator=gen) < 0.7
    topo = build_topology(mask2, block)
    w2 = torch.randn(cout, cin * 9, generator=gen)
    w2[~mask2] = float("nan")
    eff = torch.where(mask2, w2, torch.zeros(())).view(cout, cin, 3, 3)
    w2 = w2.to(dtype)
    wop = (ref.gather_blocks(w2, topo.row_ptr, topo.col_idx, br, bc) if layout == "bsr"
           else w2.view(cout, cin, 3, 3))
    mask = mask2.view(cout, cin, 3, 3)
    x = torch.randn(2, cin, 7, 6, generator=gen).to(dtype)
    dy = torch.randn(2, cout, 7, 6, generator=gen).to(dtype)
    y = ops._conv2d(x, wop, mask, topo.tensors, br, bc, *CONV_ARGS)
    close(y, F.conv2d(x.float(), eff.to(dtype).float(), None, 1, 1).to(dtype), dtype)
    dx = ops._conv2d_grad_input(dy, wop, mask, topo.tensors, br, bc, [7, 6], *CONV_ARGS)
    want = torch.nn.grad.conv2d_input(x.shape, eff.to(dtype).float(), dy.float(), 1, 1).to(dtype)
    close(dx, want, dtype)


# --------------------------------------------------------------------------- dense fallback
RSS_SCRIPT = r'''
import re
from sparsekern.topology import build_topology
def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
torch.manual_seed(0)
n = 4096
mask = torch.ones(n, n, dtype=torch.bool)
topo = build_topology(mask, (32, 32)).tensors
w = torch.randn(n, n)
x = torch.randn(8, n)
small = torch.ones(64, 64, dtype=torch.bool)
st = build_topology(small, (32, 32)).tensors
ops._bsr_mm(torch.randn(8, 64), torch.randn(64, 64), small, st, 32, 32)  # warm up
ops._bsr_mm(x[:, :64], w[:64, :64], small, st, 32, 32)
before = rss_mb()
y = ops._bsr_mm(x, w, mask, topo, 32, 32)
after = rss_mb()
ok = torch.allclose(y, x @ w.t(), rtol=1e-4, atol=1e-3)
print(json.dumps({"before": before, "after": after, "ok": ok}))
'''


def test_dense_fallback_releases_its_buffer():
    out = run_script(RSS_SCRIPT, env={"SPARSEKERN_DENSE_THRESHOLD": "0"})
    assert out["ok"]
    assert out["after"] - out["before"] < 16, out  # the fp32 W alone is 64 MB


def test_concurrent_python_threads_get_right_answers(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_DENSE_THRESHOLD", "0.3")  # some calls dense, some sparse
    gen = torch.Generator().manual_seed(2)
    cases = []
    for i, (m, k, dens) in enumerate([(96, 80, 0.9), (64, 128, 0.1), (128, 96, 0.8), (80, 64, 0.2)]):
        mask, topo = _block_mask((m, k), (8, 8), dens, gen)
        w = torch.randn(m, k, generator=gen)
        x = torch.randn(33, k, generator=gen)
        cases.append((x, w, mask, topo, ref.bsr_mm(x, w, mask, topo, 8, 8)))
    errors = []

    def worker(c):
        x, w, mask, topo, want = c
        try:
            for _ in range(15):
                close(ops._bsr_mm(x, w, mask, topo, 8, 8), want, torch.float32)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(c,)) for c in cases * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


# --------------------------------------------------------------------------- messages
def test_messages_name_the_schema_arguments():
    gen = torch.Generator().manual_seed(0)
    mask, topo = _block_mask((8, 12), (4, 4), 1.0, gen)
    w = torch.randn(8, 12)
    with pytest.raises(RuntimeError, match=r"_bsr_mm: x and w must have the same dtype"):
        ops._bsr_mm(torch.randn(3, 12).bfloat16(), w, mask, topo, 4, 4)
    with pytest.raises(RuntimeError, match=r"_bsr_mm_t: dy and w must have the same dtype"):
        ops._bsr_mm_t(torch.randn(3, 8).bfloat16(), w, mask, topo, 4, 4)
    with pytest.raises(RuntimeError, match=r"br, bc must be >= 1, got br=0, bc=4"):
        ops._bsr_mm(torch.randn(3, 12), w, mask, topo, 0, 4)
    with pytest.raises(RuntimeError, match=r"_sddmm: dy and x must have the same dtype"):
        ops._sddmm(torch.randn(3, 8).bfloat16(), torch.randn(3, 12), mask, topo, 4, 4)
    ex = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"_grow_topk: counter must be an integer or float"):
        ops._grow_topk(torch.randn(3, 8), torch.randn(3, 12), ex, 1, ex, 0., 1., 4, 4)
    with pytest.raises(ValueError, match=r"_grow_topk: k must be >= 0, got -1"):
        ops._grow_topk(torch.randn(3, 8), torch.randn(3, 12), ex, -1, None, 0., 1., 4, 4)
    with pytest.raises(RuntimeError, match=r"_grow_topk: exclude must have shape \[2, 3\]"):
        ops._grow_topk(torch.randn(3, 8), torch.randn(3, 12), ex[:1], 1, None, 0., 1., 4, 4)
    cmask = torch.ones(4, 2, 3, 3, dtype=torch.bool)
    ctopo = build_topology(cmask.flatten(1), (1, 1)).tensors
    cw = torch.randn(4, 2, 3, 3)
    with pytest.raises(RuntimeError, match=r"_conv2d: x and w must have the same dtype"):
        ops._conv2d(torch.randn(1, 2, 5, 5).bfloat16(), cw, cmask, ctopo, 1, 1, *CONV_ARGS)
    with pytest.raises(RuntimeError, match=r"_conv2d: x must be 4-D"):
        ops._conv2d(torch.randn(2, 5, 5), cw, cmask, ctopo, 1, 1, *CONV_ARGS)
    with pytest.raises(RuntimeError, match=r"_conv2d_grad_input: dy and w must have the same dtype"):
        ops._conv2d_grad_input(torch.randn(1, 4, 5, 5).bfloat16(), cw, cmask, ctopo, 1, 1, [5, 5],
                               *CONV_ARGS)
    with pytest.raises(RuntimeError, match=r"_conv2d_grad_input: dy must be float32 or bfloat16"):
        ops._conv2d_grad_input(torch.randn(1, 4, 5, 5).double(), cw.double(), cmask, ctopo, 1, 1,
                               [5, 5], *CONV_ARGS)
