"""Memory proportional to density for layout="bsr" (issue 13, item 6): no tensor of M·K entries
in a bsr layer, its DST state, its state_dict, its construction or a training/update step."""
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sparsekern as sk
from sparsekern import dst
from sparsekern.topology import block_reduce, block_reduce_any, expand_blocks

METHODS = {
    "rigl": lambda m, o: dst.RigL(m, o, total_steps=20, delta_t=1, seed=0),
    "set": lambda m, o: dst.SET(m, o, total_steps=20, delta_t=1, seed=0),
    "dst_ee": lambda m, o: dst.DSTEE(m, o, total_steps=20, delta_t=1, seed=0),
    "mest": lambda m, o: dst.MEST(m, o, total_steps=20, delta_t=1, gamma=0.5, seed=0),
    "gse": lambda m, o: dst.GSE(m, o, total_steps=20, delta_t=1, seed=0),
}


def _linear():
    return sk.SparseLinear(67, 45, sparsity=0.75, block_size=(8, 8), layout="bsr")


def _conv():
    return sk.SparseConv2d(12, 20, 3, padding=1, sparsity=0.75, block_size=(4, 8), layout="bsr")


def _input(layer, n=4):
    if isinstance(layer, sk.SparseConv2d):
        return torch.randn(n, layer.in_channels, 6, 5)
    return torch.randn(n, layer.in_features)


def _tensors(obj):
    """Every tensor reachable from ``obj`` (dicts, lists, tuples, dataclass-like objects)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v)


def _largest(*objs) -> int:
    return max((t.numel() for o in objs for t in _tensors(o)), default=0)


def _module_tensors(model):
    return [*model.parameters(), *model.buffers(), *[p.grad for p in model.parameters()
                                                     if p.grad is not None]]


def _method_tensors(m):
    out = [m.state_dict()]
    for ls in m.layers:
        out += [ls.ever, ls.extra, ls.armed or {}]
    return out


class _Allocations(TorchDispatchMode):
    """Records the largest tensor any op allocates (outputs that are views of an input do not
    count)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                if torch.is_tensor(t) and not t.is_meta}
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t) and not t.is_meta and \
                    t.untyped_storage().data_ptr() not in seen:
                n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
                if n > self.largest:
                    self.largest, self.op = n, str(func)
        return out


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_dense_tensor_in_layer_state_or_update(make, method):
    torch.manual_seed(0)
    layer = make()
    mk = math.prod(layer.shape2d)
    model = nn.Sequential(layer)
    assert _largest(_module_tensors(model), model.state_dict()) < mk
    assert "0.mask" not in model.state_dict() and "0.block_mask" in model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    m = METHODS[method](model, opt)
    for _ in range(3):
        opt.zero_grad()
        model(_input(layer)).square().mean().backward()
        m.step()
    assert m.n_updates >= 2 and m.stats()["n_grown"] > 0
    assert _largest(_module_tensors(model), model.state_dict(), opt.state_dict(),
                    _method_tensors(m)) < mk
    state = m.state_dict()
    fresh_model = nn.Sequential(make())
    fresh_model.load_state_dict(model.state_dict())
    fresh = METHODS[method](fresh_model, torch.optim.SGD(fresh_model.parameters(), lr=0.1))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.layers[0].module.block_mask, layer.block_mask)
    assert _largest(_module_tensors(fresh_model), _method_tensors(fresh)) < mk


@pytest.mark.parametrize("method", ["rigl", "set", "dst_ee", "mest", "gse"])
def test_update_step_allocates_no_dense_tensor(method):
    """A dispatch mode sees every op of construction, a RigL-style update step (forward,
    backward with the growth request, drop scores, install, optimizer) and a state_dict
    round trip of a 512 x 768 layer: none allocates M·K entries."""
    torch.manual_seed(0)
    with _Allocations() as rec:
        layer = sk.SparseLinear(768, 512, sparsity=0.9, block_size=(32, 32), layout="bsr")
    mk = 512 * 768
    assert rec.largest < mk, rec.op
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    m = METHODS[method](model, opt)
    x = torch.randn(16, 768)
    with _Allocations() as rec:
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            m.step()
        sd, msd = model.state_dict(), m.state_dict()
        model.load_state_dict(sd)
        m.load_state_dict(msd)
        m.stats()
    assert m.n_updates == 2
    assert rec.largest < mk // 4, (rec.largest, rec.op)


def test_sparsify_and_rigl_build_bsr_layers_without_dense_tensors():
    """``RigL(model, layout="bsr")`` on an nn model: besides the model's own dense weights,
    nothing of M·K entries is allocated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with _Allocations() as rec:
        m = dst.RigL(model, opt, total_steps=10, sparsity=0.9, distribution="uniform",
                     block_size=(32, 32), layout="bsr")
    assert rec.largest < 512 * 1024 // 4, (rec.largest, rec.op)
    assert all(ls.module.layout == "bsr" for ls in m.layers)


@pytest.mark.parametrize("layout", ["dense", "bsr"])
def test_meta_construction_then_to_empty_and_reset(layout):
    layer = sk.SparseLinear(67, 45, sparsity=0.75, block_size=(8, 8), layout=layout,
                            device="meta")
    assert layer.weight.is_meta and "sparsity=0.7" in repr(layer)  # density from the count
    layer.to_empty(device="cpu")
    torch.manual_seed(1)
    layer.reset_parameters()
    ref = sk.SparseLinear(67, 45, sparsity=0.75, block_size=(8, 8), layout=layout)
    assert layer.weight.shape == ref.weight.shape
    bm = block_reduce_any(layer.mask, (8, 8))
    assert int(bm.sum()) == int(block_reduce_any(ref.mask, (8, 8)).sum())
    assert torch.equal(expand_blocks(bm, (8, 8), (45, 67)), layer.mask)
    assert layer.topology.nnzb == int(bm.sum())
    bound = 1 / math.sqrt(67)
    w = layer.dense_weight()
    assert bool((w.abs() <= bound).all()) and bool((w[layer.mask] != 0).all())
    assert bool((w[~layer.mask] == 0).all())
    x = torch.randn(5, 67)
    _check_trains(nn.Sequential(layer), x)


def _check_trains(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = dst.RigL(model, opt, total_steps=10, delta_t=1, seed=0)
    before = [ls.unit_mask() for ls in m.layers]
    for _ in range(2):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        m.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, ls.unit_mask()) for b, ls in zip(before, m.layers))
    for ls in m.layers:
        y = ls.module
        assert torch.equal(y.dense_weight() != 0, y.mask & (y.dense_weight() != 0))


def test_sparsify_meta_model_bsr():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10),
                              nn.Unflatten(1, (10, 1, 1)), nn.Conv2d(10, 16, 1))
    sk.sparsify(model, 0.8, block_size=(8, 8), layout="bsr", distribution="uniform",
                dense_first_conv=False)
    assert all(isinstance(model[i], (sk.SparseLinear, sk.SparseConv2d)) for i in (0, 2, 4))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, (sk.SparseLinear, sk.SparseConv2d)):
            mod.reset_parameters()
    for i in (0, 2, 4):
        lay = model[i]
        assert lay.weight.device.type == "cpu" and torch.isfinite(lay.weight).all()
        assert lay.block_mask.sum() == lay.topology.nnzb == lay.weight.shape[0]
    _check_trains(model, torch.randn(3, 64))


def test_bsr_drop_scores_and_density_from_blocks():
    """Block means of |W| from the stored blocks (ragged edges by their true size) equal those
    of the dense weight; density counts ragged blocks by their true size."""
    torch.manual_seed(0)
    for layer in (_linear(), _conv()):
        bm = layer.block_mask.clone()  # scramble slots so that slot_map is not the identity
        on, off = bm.flatten().nonzero().flatten(), (~bm).flatten().nonzero().flatten()
        bm.view(-1)[on[0]] = False
        bm.view(-1)[off[-1]] = True
        layer.set_mask(bm)
        with torch.no_grad():
            layer.weight.normal_()
            layer.weight[layer.slot_map] *= torch.rand(layer.slot_map.numel(), 1, 1) + 0.1
        assert not layer._slots_identity
        w2d = layer.dense_weight().detach().reshape(layer.shape2d).abs()
        want = block_reduce(w2d, layer.block_size, "mean")
        torch.testing.assert_close(layer.unit_magnitude(), want, rtol=1e-6, atol=0)
        ls = dst.RigL(nn.Sequential(layer), torch.optim.SGD(layer.parameters(), lr=0.1),
                      total_steps=5).layers[0]
        torch.testing.assert_close(ls.magnitude(), want, rtol=1e-6, atol=0)
        assert layer.density == int(layer.mask.sum()) / layer.mask.numel()
        assert torch.equal(layer.unit_mask(), block_reduce_any(layer.mask.flatten(1),
                                                               layer.block_size))


@pytest.mark.parametrize("layout", ["dense", "bsr"])
def test_set_mask_takes_the_block_grid(layout):
    torch.manual_seed(0)
    a = sk.SparseLinear(67, 45, sparsity=0.5, block_size=(8, 8), layout=layout)
    b = sk.SparseLinear(67, 45, sparsity=0.5, block_size=(8, 8), layout=layout)
    b.load_state_dict(a.state_dict())
    grid = torch.rand(6, 9) < 0.3
    na = a.set_mask(grid)
    nb = b.set_mask(expand_blocks(grid, (8, 8), (45, 67)))
    assert torch.equal(na, nb) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.unit_mask(), grid)
    x = torch.randn(3, 67)
    torch.testing.assert_close(a(x), b(x))


def test_bsr_construction_draws_only_the_stored_blocks():
    torch.manual_seed(0)
    layer = _conv()
    k = layer.shape2d[1]
    w = layer.weight.detach()
    nbc = layer.block_mask.shape[1]
    blocks = layer.block_mask.flatten().nonzero().flatten()
    inside = torch.stack([((torch.arange(4)[:, None] + (b // nbc) * 4) < layer.shape2d[0])
                          & ((torch.arange(8)[None, :] + (b % nbc) * 8) < k) for b in blocks])
    assert bool((w[~inside] == 0).all()) and bool((w[inside] != 0).all())
    assert bool((w.abs() <= 1 / math.sqrt(k)).all())
    assert w[inside].std() > 0.5 / math.sqrt(3 * k)  # uniform(-b, b) has std b/sqrt(3)
    assert "block_mask" in layer.state_dict() and "mask" not in layer.state_dict()


def test_old_bsr_state_dict_with_dense_mask_loads():
    torch.manual_seed(0)
    a, b = _linear(), _linear()
    sd = dict(a.state_dict())
    del sd["block_mask"]
    sd["mask"] = a.mask.clone()  # the format before block_mask
    b.load_state_dict(sd)
    assert torch.equal(a.block_mask, b.block_mask) and torch.equal(a.mask, b.mask)
    x = torch.randn(3, 67)
    torch.testing.assert_close(a(x), b(x))
    bad = dict(sd, mask=~a.mask)
    bad["mask"][0, 0] = ~bad["mask"][0, 0]
    with pytest.raises(ValueError, match="not block-aligned"):
        b.load_state_dict(bad)


def test_old_dst_state_dict_with_weight_shaped_masks_loads():
    torch.manual_seed(0)
    model = nn.Sequential(_linear())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = dst.RigL(model, opt, total_steps=20, delta_t=1, seed=0)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 67)).sum().backward()
        m.step()
    state = m.state_dict()
    assert tuple(state["layers"][0]["mask"].shape) == (6, 9)  # the unit grid
    state["layers"][0]["mask"] = model[0].mask.clone()  # version 1 stored the weight's shape
    state["version"] = 1
    model2 = nn.Sequential(_linear())
    m2 = dst.RigL(model2, torch.optim.SGD(model2.parameters(), lr=0.1), total_steps=20,
                  delta_t=1, seed=0)
    m2.load_state_dict(state)
    assert torch.equal(model2[0].block_mask, model[0].block_mask)
    assert m2.stats()["density"] == pytest.approx(m.stats()["density"])
