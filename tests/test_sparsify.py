"""sparsify / densify and the layer density distributions (ALGORITHMS.md check vectors)."""
import math

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.sparsify import (erk_densities, keep_count, layer_densities, layer_generator,
                                 layer_seed)
from sparsekern.topology import block_reduce_any

CHECK_SHAPES = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]


def test_erk_check_vector_s09():
    d = erk_densities(CHECK_SHAPES, 0.9)
    sparsities = [1 - x for x in d]
    for got, want in zip(sparsities, (0.433126, 0.885208, 0.945793, 0.0)):
        assert abs(got - want) < 1e-6, (sparsities)
    sizes = [math.prod(s) for s in CHECK_SHAPES]
    overall = sum(x * n for x, n in zip(d, sizes)) / sum(sizes)
    assert abs(overall - 0.100075) < 1e-6
    # the budget is the sum of the per-layer exact counts at uniform sparsity: 2413 entries
    assert round(sum(x * n for x, n in zip(d, sizes)), 6) == 2413


def test_erk_check_vector_s05():
    sparsities = [1 - x for x in erk_densities(CHECK_SHAPES, 0.5)]
    for got, want in zip(sparsities, (0.0, 0.17488, 0.61036, 0.0)):
        assert abs(got - want) < 1e-5, sparsities


def test_erk_dense_layers_are_charged():
    dense = [True, False, False, False]
    d = erk_densities(CHECK_SHAPES, 0.9, dense_mask=dense)
    sizes = [math.prod(s) for s in CHECK_SHAPES]
    assert d[0] == 1.0
    assert abs(sum(x * n for x, n in zip(d, sizes)) - 2413) < 1e-6
    assert all(0 < x <= 1 for x in d)
    with pytest.raises(ValueError, match="dense layers"):
        erk_densities(CHECK_SHAPES, 0.99, dense_mask=[False, False, True, False])


def test_uniform_and_edge_sparsities():
    assert layer_densities(CHECK_SHAPES, 0.8, "uniform") == [pytest.approx(0.2)] * 4
    d = layer_densities(CHECK_SHAPES, 0.8, "uniform", dense_mask=[True, False, False, False])
    sizes = [math.prod(s) for s in CHECK_SHAPES]
    assert d[0] == 1.0 and d[1] == d[2] == d[3] < 0.2
    assert abs(sum(x * n for x, n in zip(d, sizes))
               - sum(keep_count(n, 0.8) for n in sizes)) < 1e-6
    assert erk_densities(CHECK_SHAPES, 0.0) == [1.0] * 4
    assert erk_densities(CHECK_SHAPES, 1.0) == [0.0] * 4
    with pytest.raises(ValueError, match="distribution"):
        layer_densities(CHECK_SHAPES, 0.5, "normal")


def test_keep_count():
    assert keep_count(10, 0.9) == 1
    assert keep_count(100, 0.29) == 71  # 0.29 * 100 = 28.999999999999996 in floating point
    assert keep_count(91, 0.5) == 46
    assert keep_count(7, 0.0) == 7 and keep_count(7, 1.0) == 0


def test_layer_seed():
    assert layer_seed(1, 0, 2) == layer_seed(1, 0, 2)
    assert len({layer_seed(1, s, i) for s in range(5) for i in range(5)}) == 25
    a = torch.randperm(50, generator=layer_generator(3, 1, 2))
    assert torch.equal(a, torch.randperm(50, generator=layer_generator(3, 1, 2)))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.block(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(self.bn(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_sparsify_counts_and_weights(distribution):
    torch.manual_seed(0)
    model = Small()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = sk.sparsify(model, 0.9, distribution=distribution, seed=0)
    assert out is model
    assert type(model.conv1) is nn.Conv2d  # the first conv stays dense
    assert isinstance(model.block[0], sk.SparseConv2d) and isinstance(model.fc, sk.SparseLinear)
    assert isinstance(model.bn, nn.BatchNorm2d)
    layers = ["conv1", "block.0", "block.2", "fc"]
    shapes = [tuple(before[n].shape) for n in layers]
    dens = layer_densities(shapes, 0.9, distribution, dense_mask=[True, False, False, False])
    for name, shape, d in zip(layers[1:], shapes[1:], dens[1:]):
        m = model.get_submodule(name)
        n = math.prod(shape)
        assert int(m.mask.sum()) == keep_count(n, 1 - d), name
        torch.testing.assert_close(m.dense_weight(), before[name] * m.mask)  # weights kept
    # overall density, first conv charged: within rounding of 1 - s
    total = sum(math.prod(s) for s in shapes)
    active = before["conv1"].numel() + sum(int(model.get_submodule(n).mask.sum())
                                           for n in layers[1:])
    assert abs(active / total - 0.1) < 4 / total
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_sparsify_seeded_and_reproducible():
    torch.manual_seed(0)
    base = Small()
    a = sk.sparsify(Small().requires_grad_(False), 0.8, seed=7)
    b = sk.sparsify(Small().requires_grad_(False), 0.8, seed=7)
    c = sk.sparsify(Small().requires_grad_(False), 0.8, seed=8)
    assert torch.equal(a.fc.mask, b.fc.mask) and torch.equal(a.block[2].mask, b.block[2].mask)
    assert not torch.equal(a.block[2].mask, c.block[2].mask)
    del base


def test_sparsify_exclude_and_options():
    model = sk.sparsify(Small(), 0.5, exclude=["fc"], dense_first_conv=False, seed=0)
    assert type(model.fc) is nn.Linear and isinstance(model.conv1, sk.SparseConv2d)
    model = sk.sparsify(Small(), 0.5, exclude=lambda name, m: name == "block.0", seed=0)
    assert isinstance(model.fc, sk.SparseLinear) and type(model.block[0]) is nn.Conv2d
    assert isinstance(model.block[2], sk.SparseConv2d)
    with pytest.raises(ValueError, match="dense layers"):  # more dense weights than the budget
        sk.sparsify(Small(), 0.5, exclude=lambda name, m: isinstance(m, nn.Conv2d))
    model = sk.sparsify(Small(), 0.75, block_size=(4, 4), layout="bsr", seed=1)
    fc = model.fc
    assert fc.layout == "bsr" and fc.block_size == (4, 4) and fc.weight.dim() == 3
    bm = block_reduce_any(fc.mask, (4, 4))
    assert fc.weight.shape[0] == int(bm.sum())
    model(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="exclude"):
        sk.sparsify(Small(), 0.5, exclude=["nope"])


def test_sparsify_bare_layer_and_densify():
    lin = sk.sparsify(nn.Linear(20, 10), 0.5, seed=0)
    assert isinstance(lin, sk.SparseLinear) and int(lin.mask.sum()) == 100
    torch.manual_seed(0)
    model = sk.sparsify(Small(), 0.9, seed=0).eval()
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    back = sk.densify(model)
    assert back is model
    assert not any(isinstance(m, (sk.SparseLinear, sk.SparseConv2d)) for m in back.modules())
    assert type(back.fc) is nn.Linear and not back.fc.training
    torch.testing.assert_close(back(x), y)
    assert isinstance(sk.densify(sk.SparseLinear(4, 3)), nn.Linear)


def test_sparsify_leaves_subclasses_and_attention():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.Sequential(mha, nn.Linear(8, 8))
    sk.sparsify(model, 0.5, seed=0)
    assert type(mha.out_proj) is not sk.SparseLinear and isinstance(model[1], sk.SparseLinear)
