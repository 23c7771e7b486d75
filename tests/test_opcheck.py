"""``torch.library.opcheck`` on every ``sparsekern::*`` op (shared sample inputs, dense and bsr
weights, with and without ``requires_grad`` for the differentiable ops), and
``torch.compile(fullgraph=True)`` of a model built from both modules."""
import pytest
import torch
from torch.library import opcheck

import sparsekern as sk
from sparsekern import ops, spec
from sparsekern.reference import gather_blocks
from sparsekern.topology import TopoTensors, build_topology, grid_shape

BR, BC = 2, 4


def _linear_samples():
    g = torch.Generator().manual_seed(0)
    m, k, b = 6, 10, 5  # ragged for 2 x 4 blocks
    mask = torch.rand(m, k, generator=g) < 0.5
    topo = build_topology(mask, (BR, BC))
    w = torch.randn(m, k, generator=g)
    vals = gather_blocks(w * mask, topo.row_ptr, topo.col_idx, BR, BC)
    x, dy = torch.randn(b, k, generator=g), torch.randn(b, m, generator=g)
    excl_el = mask.clone()
    excl_bl = torch.rand(grid_shape((m, k), (BR, BC)), generator=g) < 0.4
    counter = torch.randint(0, 4, grid_shape((m, k), (BR, BC)), generator=g)
    t = topo.tensors
    return {
        "bsr_mm": [(x, w, mask, t, BR, BC), (x, vals, mask, t, BR, BC)],
        "bsr_mm_t": [(dy, w, mask, t, BR, BC), (dy, vals, mask, t, BR, BC)],
        "sddmm": [(dy, x, mask, t, BR, BC)],
        "grow_topk": [(dy, x, excl_el, 7, None, 0.0, 1.0, 1, 1),
                      (dy, x, excl_bl, 3, counter, 0.5, 1.0, BR, BC)],
        "fused_weight_grad": [(dy, x, mask, t, BR, BC, excl_bl, 3, counter, 0.5, 1.0),
                              (dy, x, mask, t, BR, BC, excl_bl, 2, None, 0.0, 1.0)],
    }


def _conv_samples():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 2, 3, 3, generator=g) < 0.5  # groups=2, C_in=4
    topo = build_topology(mask.flatten(1), (BR, BC))
    w = torch.randn(6, 2, 3, 3, generator=g)
    vals = gather_blocks((w * mask).flatten(1), topo.row_ptr, topo.col_idx, BR, BC)
    x = torch.randn(2, 4, 7, 8, generator=g)
    conv = ([2, 1], [1, 0], [1, 2], 2)
    oh, ow = ops.conv_out_hw([7, 8], [3, 3], *conv[:3])
    dy = torch.randn(2, 6, oh, ow, generator=g)
    grid = grid_shape((6, 18), (BR, BC))
    excl = torch.rand(grid, generator=g) < 0.4
    counter = torch.randint(0, 4, grid, generator=g)
    t = topo.tensors
    return {
        "conv2d": [(x, w, mask, t, BR, BC, *conv), (x, vals, mask, t, BR, BC, *conv)],
        "conv2d_grad_input": [(dy, w, mask, t, BR, BC, [7, 8], *conv),
                              (dy, vals, mask, t, BR, BC, [7, 8], *conv)],
        "conv2d_sddmm": [(dy, x, mask, t, BR, BC, *conv)],
        "conv2d_grow_topk": [(dy, x, excl, 3, counter, 0.5, 1.0, BR, BC, [6, 2, 3, 3], *conv),
                             (dy, x, mask.flatten(1), 5, None, 0.0, 1.0, 1, 1, [6, 2, 3, 3],
                              *conv)],
        "conv2d_fused_weight_grad": [(dy, x, mask, t, BR, BC, excl, 3, counter, 0.5, 1.0,
                                      *conv)],
    }


SAMPLES = {**_linear_samples(), **_conv_samples()}
DIFFERENTIABLE = ("bsr_mm", "conv2d")
CASES = [(name, i) for name, lst in SAMPLES.items() for i in range(len(lst))]


def test_ops_derive_from_the_spec():
    """Public, kernel and Triton ops take their schemas from ``sparsekern.spec``; the kernel
    ops' fakes are the spec's (no C++ meta kernels)."""
    for s in spec.SPECS:
        assert str(getattr(torch.ops.sparsekern, s.name).default._schema) == \
            f"sparsekern::{s.name}{s.schema}"
        kernel = getattr(torch.ops.sparsekern, "_" + s.name).default
        assert str(kernel._schema) == f"sparsekern::_{s.name}{s.kernel_schema}"
        fake = torch._library.simple_registry.singleton.find(kernel.name()).fake_impl.kernel
        assert fake is not None and "sparsekern/ops.py" in fake.source
    try:
        from sparsekern import kernels
    except ImportError:
        return
    for name, op in kernels.OPS.items():
        want = f"sparsekern_triton::{name}{spec.BY_NAME[name].schema}"
        assert str(op._opoverload._schema) == want


def test_topology_named_tuple_is_an_op_argument():
    x, w, mask, t, br, bc = SAMPLES["bsr_mm"][1]
    assert isinstance(t, TopoTensors) and t.col_idx is t[1]
    want = ops.bsr_mm(x, w, mask, list(t), br, bc)
    assert torch.equal(ops.bsr_mm(x, w, mask, t, br, bc), want)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x_: ops.bsr_mm(x_, w, mask, t, br, bc), fullgraph=True,
                             backend="eager")  # dynamo traces the op on fake tensors
    torch.testing.assert_close(compiled(x), want)


def test_every_op_has_samples():
    registered = {name for name, obj in vars(ops).items()
                  if isinstance(obj, torch._library.custom_ops.CustomOpDef)}
    assert registered == set(SAMPLES), registered ^ set(SAMPLES)
    assert set(ops.LINEAR_OPS + ops.CONV_OPS) <= registered


@pytest.mark.parametrize("name,i", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_opcheck(name, i):
    opcheck(getattr(ops, name), SAMPLES[name][i])


@pytest.mark.parametrize("name,i", [c for c in CASES if c[0] in DIFFERENTIABLE],
                         ids=[f"{n}-{i}" for n, i in CASES if n in DIFFERENTIABLE])
def test_opcheck_requires_grad(name, i):
    args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in SAMPLES[name][i])
    opcheck(getattr(ops, name), args)


def test_opcheck_float64_and_empty_batch():
    x, w, mask, t, br, bc = SAMPLES["bsr_mm"][0]
    opcheck(ops.bsr_mm, (x.double().requires_grad_(True), w.double(), mask, t, br, bc))
    opcheck(ops.bsr_mm, (x[:0], w, mask, t, br, bc))
    xc, wc, maskc, tc, brc, bcc, *conv = SAMPLES["conv2d"][0]
    opcheck(ops.conv2d, (xc[:0], wc, maskc, tc, brc, bcc, *conv))


# --------------------------------------------------------------------------- torch.compile
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = sk.SparseConv2d(3, 8, 3, padding=1, sparsity=0.5)
        self.c2 = sk.SparseConv2d(8, 8, (3, 2), padding="same", padding_mode="circular",
                                  groups=2, sparsity=0.6, block_size=(4, 4), layout="bsr")
        self.fc = sk.SparseLinear(8, 5, sparsity=0.5, block_size=(2, 2), layout="bsr")

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = self.c2(h).mean(dim=(2, 3))
        return self.fc(h)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    net = _Net()
    # scramble a bsr layer's slots so the compiled graph also covers the slot gather
    bm = net.c2.topology.block_mask.flatten()
    bm[bm.nonzero().flatten()[0]] = False
    bm[(~bm).nonzero().flatten()[-1]] = True
    from sparsekern.topology import expand_blocks
    net.c2.set_mask(expand_blocks(bm.view(net.c2.topology.block_mask.shape), (4, 4), (8, 24)))
    assert not net.c2._slots_identity
    with torch.no_grad():
        net.c2.weight.normal_()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(net, fullgraph=True)
    y_c = compiled(x)
    y_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    y_e = net(x)
    y_e.square().sum().backward()
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    for gc, p in zip(grads_c, net.parameters()):
        torch.testing.assert_close(gc, p.grad, atol=1e-5, rtol=1e-5)
        assert gc.abs().sum() > 0
