"""The eager fast path of the ops (``sparsekern.ops.run``): the same values and gradients as
the public custom ops, taken only in plain eager mode."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern as sk
from sparsekern import ops
from sparsekern.topology import build_topology

BACKENDS = ("reference", "cpp")


def _linear_args(dtype, layout, block):
    g = torch.Generator().manual_seed(1)
    m, k = 13, 22
    mask = torch.rand(m, k, generator=g) < 0.4
    topo = build_topology(mask, block)
    w = torch.randn(m, k, generator=g).to(dtype)
    if layout == "bsr":
        w = sk.reference.gather_blocks(w, topo.row_ptr, topo.col_idx, *block)
        mask = torch.ones((), dtype=torch.bool).expand(m, k)
    x = torch.randn(9, k, generator=g).to(dtype)
    return "bsr_mm", [x, w, mask, topo.tensors, *block]


def _conv_args(dtype, layout, block):
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(6, 5, 3, 2, generator=g) < 0.5
    topo = build_topology(mask.flatten(1), block)
    w = torch.randn(6, 5, 3, 2, generator=g).to(dtype)
    if layout == "bsr":
        w = sk.reference.gather_blocks(w.flatten(1), topo.row_ptr, topo.col_idx, *block)
        mask = torch.ones((), dtype=torch.bool).expand(6, 5, 3, 2)
    x = torch.randn(3, 5, 7, 6, generator=g).to(dtype)
    return "conv2d", [x, w, mask, topo.tensors, *block, [2, 1], [1, 0], [1, 2], 1]


def _run_both(name, args, grads):
    """(output, grads) of the fast path and of the custom op on copies of ``args``."""
    results = []
    for path in ("direct", "custom"):
        a = list(args)
        for i in (0, 1):
            a[i] = args[i].detach().clone().requires_grad_(grads[i])
        assert ops.direct_ok(*a[:3])
        out = ops.run(name, *a) if path == "direct" else ops.OPS[name](*a)
        gy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        got = torch.autograd.grad(out, [a[i] for i in (0, 1) if grads[i]], gy) \
            if any(grads) else ()
        results.append((out.detach(), got))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_linear_args, _conv_args])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,block", [("dense", (1, 1)), ("dense", (2, 3)), ("bsr", (2, 3))])
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True), (False, False)])
def test_fast_path_equals_custom_op(backend, make, dtype, layout, block, grads):
    sk.set_backend(backend)
    name, args = make(dtype, layout, block)
    (y1, g1), (y2, g2) = _run_both(name, args, grads)
    assert torch.equal(y1, y2)
    assert len(g1) == len(g2) == sum(grads)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [_linear_args, _conv_args])
def test_fast_path_recomputes_nonfinite_rows(make):
    sk.set_backend("cpp")
    name, args = make(torch.float32, "dense", (1, 1))
    args[0] = args[0].clone()
    args[0][1].view(-1)[3] = float("nan")
    args[0][2].view(-1)[0] = float("inf")
    (y1, g1), (y2, g2) = _run_both(name, args, (True, True))
    assert torch.equal(y1.isnan(), y2.isnan())
    assert y1[1].isnan().any() and y1[0].isfinite().all()
    assert torch.equal(y1.nan_to_num(), y2.nan_to_num())
    for a, b in zip(g1, g2):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_overflowing_finite_sum_is_not_a_nonfinite_row():
    """A finite activation whose total sum overflows takes the per-row check, finds no row."""
    a = torch.zeros(4, 3)
    a[:, 0] = 1e38
    assert ops._nonfinite_rows(a) is None
    a[2, 1] = float("nan")
    assert ops._nonfinite_rows(a).tolist() == [2]


class _Counting(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_fast_path_only_in_plain_eager_mode(monkeypatch):
    """Plain eager calls never touch the custom op; under a dispatch mode (fake tensors,
    opcheck, allocation counters) or torch.compile the custom op runs instead."""
    sk.set_backend("cpp")
    name, args = _conv_args(torch.float32, "dense", (1, 1))
    layer = sk.SparseConv2d(5, 6, 3, padding=1, sparsity=0.5)
    x = torch.randn(2, 5, 6, 6, requires_grad=True)

    def boom(*a):
        raise AssertionError("custom op called in eager mode")

    monkeypatch.setitem(ops.OPS, "conv2d", boom)
    layer(x).sum().backward()
    monkeypatch.undo()

    monkeypatch.setattr(ops._DIRECT_FNS["conv2d"], "apply", boom)
    with _Counting():
        assert not ops.direct_ok(*args[:3])
        layer(x).sum().backward()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    compiled(x).sum().backward()
    assert not ops.direct_ok(torch.nn.Parameter(torch.ones(1)).as_subclass(_Sub), *args[1:3])


class _Sub(torch.Tensor):
    pass
