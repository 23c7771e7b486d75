"""GSE (ALGORITHMS.md): a hand-worked update, seeded sampling without replacement, the subset
gradient against the dense reference, top-k within the subset, no dense-candidate op, every
sampler, block masks, the bsr layout and data parallelism."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import dst
from sparsekern import reference as ref
from sparsekern.dst.gse import sample_factorised
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.topology import block_reduce, block_reduce_any

SAMPLERS = ["uniform", "grabo", "graest"]
LAYOUTS_BLOCKS = [("dense", (1, 1)), ("dense", (2, 2)), ("bsr", (1, 1)), ("bsr", (2, 2))]


class Net(nn.Module):
    """conv [4,2,3,3] -> fc1 [16,64] -> fc2 [3,16]; layer densities below 0.5 so GSE samples."""

    def __init__(self, layout="dense", block=(1, 1), dtype=torch.float64):
        super().__init__()
        kw = dict(block_size=block, layout=layout, dtype=dtype)
        self.conv = SparseConv2d(2, 4, 3, padding=1, sparsity=0.7, **kw)
        self.fc1 = SparseLinear(64, 16, sparsity=0.75, **kw)
        self.fc2 = SparseLinear(16, 3, sparsity=0.6, **kw)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))

    def dense_forward(self, x, ws):
        h = F.relu(F.conv2d(x, ws[0], self.conv.bias, padding=1)).flatten(1)
        return F.linear(F.relu(F.linear(h, ws[1], self.fc1.bias)), ws[2], self.fc2.bias)


def batch(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                   generator=g)


def units(layer):
    m2 = layer.mask.flatten(1)
    return m2.clone() if layer.block_size == (1, 1) else block_reduce_any(m2, layer.block_size)


def test_hand_worked_update():
    """Linear [2, 4], active (0,0)=0.1 (0,1)=−0.5 (0,2)=0.3; G = dyᵀx chosen by hand; γ = 2
    samples every inactive unit, α = 0.5 at t = ΔT swaps ⌈0.5·3⌉ = 2: drop |W| 0.1 and 0.3,
    grow |G| 0.7 (flat 4) and 0.5 (flat 6)."""
    lay = SparseLinear(4, 2, bias=False, dtype=torch.float64)
    w = torch.tensor([[0.1, -0.5, 0.3, 0], [0, 0, 0, 0]], dtype=torch.float64)
    lay.set_mask(w != 0)
    with torch.no_grad():
        lay.weight.copy_(w)
    model = nn.Sequential(lay)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    m = dst.GSE(model, opt, total_steps=10, delta_t=1, alpha=0.5, t_end=1.0, gamma=2.0,
                sampler="grabo")
    g = torch.tensor([[9, 9, 9, 0.2], [-0.7, 0.1, 0.5, -0.3]], dtype=torch.float64)
    (model(torch.eye(4, dtype=torch.float64)) * g.t()).sum().backward()
    assert m.step()
    assert lay.mask.flatten().nonzero().flatten().tolist() == [1, 4, 6]
    assert lay.weight.detach().flatten()[[1, 4, 6]].tolist() == [-0.5, 0.0, 0.0]
    info = m.last_subsets["0"]
    assert info["subset"].tolist() == [3, 4, 5, 6, 7]
    assert info["scores"].tolist() == pytest.approx([0.2, 0.7, 0.1, 0.5, 0.3], abs=1e-12)
    assert info["grown"].tolist() == [4, 6]
    st = m.stats()
    assert (st["n_dropped"], st["n_grown"], st["n_net_swapped"]) == (2, 2, 2)


def test_sampling_is_seeded_without_replacement_and_follows_p():
    u = torch.tensor([1.0, 3.0], dtype=torch.float64)
    v = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    taken = torch.tensor([True, False, False, False, False, False])

    def draw(seed, n):
        return sample_factorised(u, v, taken.clone(), n, torch.Generator().manual_seed(seed))

    a, b = draw(5, 4), draw(5, 4)
    assert torch.equal(a, b)
    assert a.unique().numel() == 4 and not taken[a].any()
    assert draw(0, 5).tolist() == [1, 2, 3, 4, 5]
    # first draw ∝ u_i·v_j over the untaken cells: weights 1, 2, 3, 3, 6 (sum 15)
    counts = torch.bincount(torch.cat([draw(s, 1) for s in range(3000)]), minlength=6).double()
    p = torch.tensor([0, 1, 2, 3, 3, 6], dtype=torch.float64) / 15
    assert torch.allclose(counts / 3000, p, atol=0.035)  # > 4 standard deviations


def _dense_grads(model, x, y):
    ws = [lay.dense_weight().detach().clone().requires_grad_() for lay in
          (model.conv, model.fc1, model.fc2)]
    F.cross_entropy(model.dense_forward(x, ws), y).backward()
    return {"conv": ws[0].grad.flatten(1), "fc1": ws[1].grad, "fc2": ws[2].grad}


def _one_update(sampler, layout, block, monkeypatch=None, seed=0):
    torch.manual_seed(0)
    model = Net(layout, block)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    m = dst.GSE(model, opt, total_steps=20, delta_t=2, t_end=1.0, alpha=0.3, sampler=sampler,
                seed=seed)
    for t in (1, 2):
        x, y = batch(t)
        if t == 2:
            dense_g = _dense_grads(model, x, y)
            before = {n: units(getattr(model, n)) for n in dense_g}
        F.cross_entropy(model(x), y).backward()
        m.step()
        opt.zero_grad()
    return model, m, dense_g, before


@pytest.mark.parametrize("layout,block", LAYOUTS_BLOCKS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_subset_gradient_and_topk_within_subset(sampler, layout, block, monkeypatch):
    """G on the subset equals the dense reference gradient there (block means for blocks), the
    grown units are the subset's top-k and the dense-candidate top-k ops are never called."""
    def forbidden(*a, **k):
        raise AssertionError("GSE called a dense-candidate top-k op")
    for name in ("grow_topk", "fused_weight_grad", "conv2d_grow_topk",
                 "conv2d_fused_weight_grad"):
        monkeypatch.setattr(sk.ops, name, forbidden)
    model, m, dense_g, before = _one_update(sampler, layout, block)
    assert m.n_updates == 1
    for name, g in dense_g.items():
        lay, info = getattr(model, name), m.last_subsets[name]
        s = info["subset"]
        score = g.abs() if block == (1, 1) else block_reduce(g.abs(), block, "mean")
        n_active = int(before[name].sum())
        assert s.numel() == n_active  # γ = 1
        assert not before[name].flatten()[s].any()
        assert torch.allclose(info["scores"], score.flatten()[s], rtol=1e-9, atol=1e-12)
        k = len(info["grown"])
        assert k == -(-3 * n_active // 10)  # ⌈0.3·|A|⌉ at t = ΔT
        pos, _ = ref.stable_topk(info["scores"], k)
        assert info["grown"].tolist() == sorted(s[pos].tolist())
        after = units(lay)
        assert after.flatten()[info["grown"]].all()
        assert int(after.sum()) == n_active
        if layout == "bsr":
            assert lay.weight.shape[0] == n_active


def test_reproducible_and_seed_dependent():
    a = _one_update("graest", "dense", (1, 1))[1].last_subsets
    b = _one_update("graest", "dense", (1, 1))[1].last_subsets
    c = _one_update("graest", "dense", (1, 1), seed=1)[1].last_subsets
    assert all(torch.equal(a[n]["subset"], b[n]["subset"]) for n in a)
    assert any(not torch.equal(a[n]["subset"], c[n]["subset"]) for n in a)


def test_grabo_prefers_rows_and_columns_with_signal():
    """GraBo never samples a column whose input is always 0 (only the ε floor), uniform does."""
    torch.manual_seed(0)
    hits = {}
    for sampler in ("uniform", "grabo"):
        lay = SparseLinear(64, 32, sparsity=0.9, bias=False, dtype=torch.float64)
        model = nn.Sequential(lay)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        m = dst.GSE(model, opt, total_steps=10, delta_t=1, t_end=1.0, sampler=sampler)
        x = torch.randn(16, 64, dtype=torch.float64)
        x[:, 32:] = 0
        model(x).pow(2).sum().backward()
        m.step()
        hits[sampler] = int((m.last_subsets["0"]["subset"] % 64 >= 32).sum())
    assert hits["grabo"] == 0 and hits["uniform"] > 0


def test_dense_layers_fall_back_to_every_inactive_unit():
    lay = SparseLinear(8, 4, sparsity=0.25, bias=False)
    model = nn.Sequential(lay)
    m = dst.GSE(model, torch.optim.SGD(model.parameters(), lr=0.0), total_steps=10, delta_t=1,
                t_end=1.0)
    model(torch.randn(3, 8)).sum().backward()
    m.step()
    assert m.last_subsets["0"]["subset"].numel() == 8


def test_bad_arguments():
    def mk():
        model = nn.Sequential(nn.Linear(4, 4))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    for kw, name in [({"sampler": "gumbel"}, "sampler"), ({"gamma": float("nan")}, "gamma"),
                     ({"gamma": 0.0}, "gamma"), ({"alpha": float("inf")}, "alpha"),
                     ({"delta_t": 0}, "delta_t")]:
        with pytest.raises(ValueError, match=name):
            dst.GSE(*mk(), total_steps=10, **kw)


def test_missing_backward_is_a_clear_error():
    model = nn.Sequential(SparseLinear(8, 4, sparsity=0.75))
    m = dst.GSE(model, torch.optim.SGD(model.parameters(), lr=0.0), total_steps=10, delta_t=1,
                t_end=1.0)
    with pytest.raises(RuntimeError, match="forward and backward"):
        m.step()


# ---------------------------------------------------------------------------- data parallel
WORLD = 2


def _train_dp(sampler, rank=0, world=1):
    sk.set_backend("reference")
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    m = dst.GSE(model, opt, total_steps=10, delta_t=2, t_end=1.0, sampler=sampler)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    for t in range(1, 6):
        x, y = batch(t)
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        F.cross_entropy(net(x), y).backward()
        m.step()
        opt.zero_grad()
    return {n: getattr(model, n).mask.clone() for n in ("conv", "fc1", "fc2")}


def _worker(rank, port, out_dir):
    import warnings
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # rank 0's masks must not be needed
            res = [_train_dp(s, rank, WORLD) for s in SAMPLERS]
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_data_parallel_identical_masks(tmp_path):
    """Two gloo ranks pick the same units without the rank-0 broadcast; with the uniform
    sampler (data-independent subset) the masks equal one process on the global batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0, r1):
        assert all(torch.equal(a[n], b[n]) for n in a)
    single = _train_dp("uniform")
    assert all(torch.equal(r0[0][n], single[n]) for n in single)
