"""GSE (ALGORITHMS.md): a hand-worked update, seeded sampling without replacement, the subset
gradient against the dense reference, top-k within the subset, no dense-candidate op, every
sampler, block masks, the bsr layout and data parallelism."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _dist import run_ranks
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


@pytest.mark.parametrize("mode", ["rounds", "exact"])
def test_sampling_is_seeded_without_replacement_and_follows_p(mode, monkeypatch):
    """Both ways of drawing (successive rounds of i.i.d. draws; Gumbel top-k, used for small
    grids and stalled rounds) are seeded, distinct, avoid taken cells and follow p."""
    import sparsekern.dst.gse as gse
    if mode == "rounds":
        monkeypatch.setattr(gse, "EXACT_CELLS", 0)
        monkeypatch.setattr(gse, "STALL", 0.0)
    else:
        monkeypatch.setattr(gse, "EXACT_CELLS", 1 << 30)
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


@pytest.mark.parametrize("nonuniform", [False, True])
def test_rounds_finish_without_a_dense_grid(nonuniform, monkeypatch):
    """On a grid above EXACT_CELLS the rounds reach n cells without the exact draw (which
    builds the dense ``len(u)·len(v)`` grid): tail rounds that need a few cells draw enough."""
    import sparsekern.dst.gse as gse

    def no_dense(*a, **k):
        raise AssertionError("the exact draw built the dense grid")

    monkeypatch.setattr(gse.torch, "outer", no_dense)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(400, generator=g, dtype=torch.float64) + 0.5 if nonuniform else \
        torch.ones(400, dtype=torch.float64)
    v = torch.rand(300, generator=g, dtype=torch.float64) + 0.5 if nonuniform else \
        torch.ones(300, dtype=torch.float64)
    taken = torch.rand(120_000, generator=g) < 0.7
    before = taken.clone()
    for seed in range(4):
        n = int((~taken).sum()) // 3
        out = sample_factorised(u, v, taken, n, torch.Generator().manual_seed(seed))
        assert out.numel() == n and out.unique().numel() == n and not before[out].any()
        assert taken[out].all()
        before = taken.clone()


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


def _train_samplers(rank, world):
    return [_train_dp(s, rank, world) for s in SAMPLERS]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_data_parallel_identical_masks(tmp_path):
    """Two gloo ranks pick the same units without the rank-0 broadcast; with the uniform
    sampler (data-independent subset) the masks equal one process on the global batch."""
    (r0, _), (r1, _) = run_ranks(_train_samplers, tmp_path, WORLD, strict_warnings=True)
    for a, b in zip(r0, r1):
        assert all(torch.equal(a[n], b[n]) for n in a)
    single = _train_dp("uniform")
    assert all(torch.equal(r0[0][n], single[n]) for n in single)


# ---------------------------------------------------------------------------- cheap update
def test_top_positions_follow_stable_topk_ties_and_nan():
    """The O(n) selection picks the same set as the full stable sort: ties to the lower index
    (largest), their complement (smallest), NaN highest, -0.0 equal to 0.0."""
    from sparsekern.dst.gse import top_positions
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(1, 60, (1,), generator=g))
        s = torch.randint(-3, 4, (n,), generator=g).double()
        if trial % 3 == 0:
            s[torch.randint(0, n, (2,), generator=g)] = float("nan")
        if trial % 3 == 1:
            s[s == 0] = -0.0
        for k in range(n + 1):
            want = sorted(ref.stable_topk(s, k)[0].tolist())
            assert top_positions(s, k).tolist() == want
            keep = set(ref.stable_topk(s, n - k)[0].tolist())
            assert top_positions(s, k, largest=False).tolist() == sorted(set(range(n)) - keep)


def test_kth_smallest_bracket_is_exact_on_large_inputs():
    """The sampled bracket gives ``kthvalue``'s value (ties, sorted and periodic inputs that
    defeat the strided sample included), and large selections keep the tie rules."""
    from sparsekern.dst.gse import KTH_SAMPLE, kth_smallest, top_positions
    g = torch.Generator().manual_seed(1)
    n = 4 * KTH_SAMPLE + 1000
    step = n // KTH_SAMPLE
    periodic = (torch.arange(n) % step == 0).double()
    for s in (torch.rand(n, generator=g), torch.randint(-3, 4, (n,), generator=g).double(),
              torch.rand(n, generator=g).sort().values, periodic, -periodic):
        for q in (1, 2, 7, n // 10, n // 2, n - 5, n):
            assert torch.equal(kth_smallest(s, q), torch.kthvalue(s, q).values)
        for k in (1, n // 10, n // 2, n - 1):
            want = sorted(ref.stable_topk(s, k)[0].tolist())
            assert top_positions(s, k).tolist() == want
            keep = set(ref.stable_topk(s, n - k)[0].tolist())
            assert top_positions(s, k, largest=False).tolist() == sorted(set(range(n)) - keep)


@pytest.mark.parametrize("shuffle", [False, True])
def test_draws_are_iid_with_probability_f(shuffle):
    """The spacings-based inverse CDF draws ``m`` indices ∝ f (sorted unless shuffled)."""
    from sparsekern.dst.gse import _draws
    f = torch.tensor([1.0, 0.0 + 1e-9, 4.0, 2.0, 3.0], dtype=torch.float64)
    m = 40_000
    d = _draws(f, m, torch.Generator().manual_seed(1), shuffle)
    assert d.numel() == m and int(d.min()) >= 0 and int(d.max()) < 5
    assert torch.equal(d, d.sort().values) != shuffle
    freq = torch.bincount(d, minlength=5).double() / m
    assert torch.allclose(freq, f / f.sum(), atol=0.01)  # > 4 standard deviations


def _fast_vs_generic(monkeypatch, generic: bool, optim: str):
    torch.manual_seed(0)
    model = Net()
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if optim == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    if generic:
        monkeypatch.setattr(dst.GSE, "_flat_dense", staticmethod(lambda ls: False))
    m = dst.GSE(model, opt, total_steps=20, delta_t=2, t_end=1.0, alpha=0.3, sampler="grabo",
                skip_optimizer_step_on_update=False)
    for t in range(1, 6):
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        m.step()
    monkeypatch.undo()
    return model, opt, m


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_flat_fast_path_equals_generic_install(monkeypatch, optim):
    """The O(k) install of element units on dense weights leaves masks, weights, gradients,
    optimizer state and metrics exactly as the generic ``_install`` does."""
    a_model, a_opt, a = _fast_vs_generic(monkeypatch, False, optim)
    b_model, b_opt, b = _fast_vs_generic(monkeypatch, True, optim)
    assert a.n_updates == b.n_updates == 2
    for (na, pa), (nb, pb) in zip(a_model.named_parameters(), b_model.named_parameters()):
        assert torch.equal(pa, pb), na
        assert (pa.grad is None) == (pb.grad is None) and (pa.grad is None or
                                                           torch.equal(pa.grad, pb.grad)), na
        for key, va in a_opt.state[pa].items():
            assert torch.equal(va, b_opt.state[pb][key]), (na, key)
    for name in ("conv", "fc1", "fc2"):
        assert torch.equal(getattr(a_model, name).mask, getattr(b_model, name).mask)
    sa, sb = a.stats(), b.stats()
    for key in ("n_dropped", "n_grown", "n_net_swapped", "iou", "layer_iou", "exploration",
                "layer_exploration"):
        assert sa[key] == sb[key], key
    assert sa["layer_density"] == pytest.approx(sb["layer_density"], abs=1e-7)


def test_one_topology_build_per_layer_and_update(monkeypatch):
    """An update rebuilds each layer's topology once (``set_mask``); the subset's topology
    comes from its sorted indices, not from a dense pattern."""
    import sparsekern.nn.base as nn_base
    import sparsekern.topology as topology
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = dst.GSE(model, opt, total_steps=20, delta_t=2, t_end=1.0, sampler="grabo")
    calls = []
    real = topology.build_topology

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(nn_base, "build_topology", counting)
    monkeypatch.setattr(topology, "build_topology", counting)
    for t in (1, 2):
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        m.step()
        opt.zero_grad()
    assert m.n_updates == 1 and len(calls) == 3  # conv, fc1, fc2


@pytest.mark.parametrize("shape,block", [((7, 10), (1, 1)), ((7, 10), (2, 3)), ((8, 9), (4, 4))])
def test_scatter_index_without_dense_temporary(shape, block):
    """The dense-layout weight gradient's scatter positions (built after every mask change,
    now in O(nnzb·br·bc)) equal the positions read off a dense ``[M, K]`` index matrix."""
    from sparsekern.ops import _scatter_index
    from sparsekern.topology import build_topology
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) < 0.4
    topo = build_topology(mask, block).tensors
    flat = torch.arange(1, shape[0] * shape[1] + 1).view(shape)
    pos = ref.gather_blocks(flat, topo[0], topo[1], *block).flatten()
    src, dst_ = _scatter_index(topo, *block, *shape)
    assert torch.equal(src, (pos > 0).nonzero().flatten())
    assert torch.equal(dst_, pos[pos > 0] - 1)


@pytest.mark.parametrize("stride,pad,dil,groups", [((1, 1), (1, 1), (1, 1), 1),
                                                   ((2, 1), (0, 2), (1, 2), 2)])
def test_conv_tap_sums_equal_one_channel_weight_grad(stride, pad, dil, groups):
    """GraBo's conv ``v`` factor (tap sums of |x|) equals the weight gradient of a
    one-channel-per-group conv with an all-ones output gradient."""
    from sparsekern.dst.gse import conv_tap_sums
    x = torch.randn(3, 4, 7, 6, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).abs()
    oh = (7 + 2 * pad[0] - dil[0] * 2 - 1) // stride[0] + 1
    ow = (6 + 2 * pad[1] - dil[1] * 1 - 1) // stride[1] + 1
    d = torch.ones(3, groups, oh, ow, dtype=torch.float64)
    want = torch.nn.grad.conv2d_weight(x, [groups, 4 // groups, 3, 2], d, stride, pad, dil,
                                       groups).flatten(1)
    got = conv_tap_sums(x, (3, 2), stride, pad, dil, (oh, ow))
    assert torch.allclose(got.reshape(groups, -1), want, rtol=1e-12, atol=1e-12)


def test_bench_gse_smoke(monkeypatch):
    """``benchmarks/bench_gse.py`` times a plain and an update step per method on a tiny layer
    (the phase bookkeeping of its four-step cycle holds)."""
    import importlib.util
    import math
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gse.py"
    spec = importlib.util.spec_from_file_location("bench_gse", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(mod.CASES, "tiny", (lambda s: SparseLinear(16, 8, sparsity=s), (4, 16)))
    res = mod.run_case("tiny", rounds=1, warmup=0, sparsity=0.9, methods=["gse-grabo", "rigl"])
    for m in ("gse-grabo", "rigl"):  # a timing difference: finite, its sign is load noise here
        assert res[m]["plain_ms"] > 0 and math.isfinite(res[m]["update_over_plain"])
    assert res["rigl"]["update_over_rigl_update"] == 1.0
    assert res["_layer"]["active"] == 13  # 128 - floor(0.9 * 128)


@pytest.mark.parametrize("layout,block", [("dense", (1, 1)), ("bsr", (2, 2))])
def test_update_step_skips_the_unused_active_weight_gradient(layout, block, monkeypatch):
    """The update step skips the optimizer step, so its backward gives the sparse weights zero
    gradients without the active SDDMM (only the subset's SDDMM runs); the masks and weights it
    reaches equal those of a run that computes the unused gradient."""
    import sparsekern.nn.base as nn_base

    def run(skip_allowed):
        if not skip_allowed:
            monkeypatch.setattr(nn_base.SparseModule, "skip_weight_grad", lambda self, s=True: None)
        torch.manual_seed(0)
        model = Net(layout, block)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        m = dst.GSE(model, opt, total_steps=20, delta_t=2, t_end=1.0, sampler="grabo")
        sddmm_patterns = []
        real = sk.ops.impl_for

        def counting(name, device):
            if name in ("sddmm", "conv2d_sddmm"):
                sddmm_patterns.append(name)
            return real(name, device)
        monkeypatch.setattr(sk.ops, "impl_for", counting)
        grads = None
        for t in (1, 2, 3):
            x, y = batch(t)
            sddmm_patterns.clear()
            F.cross_entropy(model(x), y).backward()
            if t == 2:
                grads = [lay.weight.grad.clone() for lay in (model.conv, model.fc1, model.fc2)]
                n_backward_sddmm = len(sddmm_patterns)
            m.step()
            opt.zero_grad()
        monkeypatch.undo()
        return model, grads, n_backward_sddmm

    skipped, zero_grads, n_skip = run(True)
    full, grads, n_full = run(False)
    assert m_equal(skipped, full)
    assert all(not g.any() for g in zero_grads) and any(g.any() for g in grads)
    assert n_skip == 0 and n_full == 3


def m_equal(a, b):
    return all(torch.equal(la.unit_mask(), lb.unit_mask()) and torch.equal(la.weight, lb.weight)
               for la, lb in ((a.conv, b.conv), (a.fc1, b.fc1), (a.fc2, b.fc2)))
