"""DST methods against hand-worked examples and invariants (ALGORITHMS.md), through the real
layer path (growth scores come from the layers' fused backward)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import dst
from sparsekern import reference as ref
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.topology import block_reduce_any

LAYOUTS_BLOCKS = [("dense", (1, 1)), ("dense", (2, 2)), ("bsr", (1, 1)), ("bsr", (2, 2))]


class Net(nn.Module):
    """conv [4,2,3,3] (2-D view [4,18]) -> fc1 [16,64] -> fc2 [3,16] (ragged for 2x2 blocks)."""

    def __init__(self, layout="dense", block=(1, 1), dtype=torch.float32):
        super().__init__()
        kw = dict(block_size=block, layout=layout, dtype=dtype)
        self.conv = SparseConv2d(2, 4, 3, padding=1, sparsity=0.5, **kw)
        self.fc1 = SparseLinear(64, 16, sparsity=0.75, **kw)
        self.fc2 = SparseLinear(16, 3, sparsity=0.5, **kw)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


def batch(step, n=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def units(layer):
    m2 = layer.mask.flatten(1)
    return m2.clone() if layer.block_size == (1, 1) else block_reduce_any(m2, layer.block_size)


def dense_of(layer, t):
    return layer.values_to_dense(t.detach()).clone()


def layers_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}


METHODS = {
    "static": (dst.Static, {}),
    "set": (dst.SET, dict(delta_t=2)),
    "rigl": (dst.RigL, dict(delta_t=2)),
    "dst-ee": (dst.DSTEE, dict(delta_t=2)),
    "bidst": (dst.BiDST, dict(refresh_every=2, search_space=0.2, lam=1e-3)),
    "mest": (dst.MEST, dict(update_every=2, gap=0.1)),
    "gse": (dst.GSE, dict(delta_t=2, sampler="grabo", t_end=0.75)),
}


def run_method(name, layout, block, steps=10, lr=0.0, opt="sgd", seed=0, model=None, **extra):
    torch.manual_seed(seed)
    model = model or Net(layout, block)
    optim = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt == "sgd"
             else torch.optim.Adam(model.parameters(), lr=lr))
    cls, kw = METHODS[name]
    m = cls(model, optim, total_steps=steps, **{**kw, **extra})
    return model, optim, m


@pytest.mark.parametrize("layout,block", LAYOUTS_BLOCKS)
@pytest.mark.parametrize("name", list(METHODS))
def test_invariants(name, layout, block):
    """Density exactly at target after every update; new weights and optimizer state zero;
    entries active before and after keep their values; IoU and R as computed by hand."""
    steps = 10
    opt = "adam" if name in ("rigl", "mest") else "sgd"
    model, optim, m = run_method(name, layout, block, steps=steps, opt=opt)
    lays = layers_of(model)
    target = {n: int(units(l).sum()) for n, l in lays.items()}
    ever = {n: units(l) for n, l in lays.items()}
    n_changes = 0
    for t in range(1, steps + 1):
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        if name == "bidst":  # lr = 0 leaves ψ still: move it by hand to exercise refreshes
            with torch.no_grad():
                for l in lays.values():
                    l.scores.copy_(torch.rand(l.scores.shape))
        before = {n: (units(l), dense_of(l, l.weight), l.mask.clone(),
                      {k: dense_of(l, v) for k, v in optim.state.get(l.weight, {}).items()
                       if torch.is_tensor(v) and v.shape == l.weight.shape})
                  for n, l in lays.items()}
        updated = m.step()
        assert updated == m.is_update_step(t)
        if name == "bidst" and not updated:
            for n, l in lays.items():
                assert torch.equal(l.mask, before[n][2]), "BiDST mask changed between refreshes"
        st = m.stats()
        assert st["step"] == t
        for n, l in lays.items():
            u_old, w_old, mask_old, state_old = before[n]
            u_new = units(l)
            assert int(u_new.sum()) == target[n], (n, t)
            assert st["layer_density"][n] == pytest.approx(l.density)
            newly = l.mask & ~mask_old
            kept = l.mask & mask_old
            w_new = dense_of(l, l.weight)
            if name == "bidst":
                ever_entries = ever[n]
                if block != (1, 1):
                    from sparsekern.topology import expand_blocks
                    ever_entries = expand_blocks(ever[n], block, tuple(l.mask.flatten(1).shape))
                ever_entries = ever_entries.reshape(l.mask.shape)
                if layout == "dense":
                    assert torch.equal(w_new[newly & ever_entries], w_old[newly & ever_entries])
                assert (w_new[newly & ~ever_entries] == 0).all()
            else:
                assert (w_new[newly] == 0).all(), (n, t)
            assert torch.equal(w_new[kept], w_old[kept]), (n, t)  # lr = 0
            for k, v in optim.state.get(l.weight, {}).items():
                if torch.is_tensor(v) and v.shape == l.weight.shape:
                    assert (dense_of(l, v)[newly] == 0).all(), (n, t, k)
            if updated and not torch.equal(u_new, u_old):
                n_changes += 1
                inter, union = (u_new & u_old).sum().item(), (u_new | u_old).sum().item()
                assert st["layer_iou"][n] == pytest.approx(inter / union)
                assert st["layer_n_net_swapped"][n] == int((u_new & ~u_old).sum())
            ever[n] |= u_new
            assert st["layer_exploration"][n] == pytest.approx(ever[n].float().mean().item())
        R = sum(e.sum().item() for e in ever.values()) / sum(e.numel() for e in ever.values())
        assert st["exploration"] == pytest.approx(R)
        optim.zero_grad()
    assert m.n_updates == (0 if name == "static" else 3)  # t = 2, 4, 6 < 0.75·10
    if name != "static":
        assert n_changes > 0


def _checkvector_layer():
    lay = SparseLinear(8, 4, bias=False)
    i = torch.arange(32)
    mask = (i % 2 == 0).view(4, 8)
    lay.set_mask(mask)
    with torch.no_grad():
        lay.weight.copy_(torch.where(mask.flatten(), (i + 1) / 10, torch.zeros(32)).view(4, 8))
    g = torch.where(i % 3 == 0, -1.0, 1.0) * (((7 * i) % 32) + 1) / 10
    return lay, g.view(4, 8)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_rigl_check_vector(backend):
    """ALGORITHMS.md's RigL check vector, G = dyᵀx fed through the layer's fused backward,
    on every available backend."""
    why = sk.available_backends()[backend]
    if why != "ok":
        pytest.skip(f"backend {backend} unavailable: {why}")
    sk.set_backend(backend)
    lay, G = _checkvector_layer()
    model = nn.Sequential(lay)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    m = dst.RigL(model, opt, total_steps=1000, delta_t=100, alpha=0.3, t_end=1.0)
    for _ in range(99):
        assert not m.step()
    opt.state[lay.weight]["momentum_buffer"] = torch.ones(4, 8)
    x, dy = torch.eye(8), G.t().contiguous()  # dyᵀx = G exactly
    (model(x) * dy).sum().backward()
    assert m.drop_fraction(100) == pytest.approx(0.292658, abs=1e-6)
    assert m.step()
    active = lay.mask.flatten().nonzero().flatten().tolist()
    assert active == [4, 8, 9, 10, 12, 13, 14, 16, 18, 20, 22, 24, 26, 27, 28, 30]
    w = lay.weight.detach().flatten()
    assert w[4].item() == pytest.approx(0.5)
    assert w[[9, 13, 27]].tolist() == [0, 0, 0]
    mom = opt.state[lay.weight]["momentum_buffer"].flatten()
    assert mom[[9, 13, 27]].tolist() == [0, 0, 0] and mom[4].item() == 1.0
    st = m.stats()
    assert (st["layer_n_dropped"]["0"], st["layer_n_grown"]["0"],
            st["layer_n_net_swapped"]["0"]) == (4, 4, 3)
    assert st["last_update"] == {"step": 100, "n_dropped": 4, "n_grown": 4, "n_net_swapped": 3}
    assert st["layer_iou"]["0"] == st["iou"] == pytest.approx(13 / 19)
    assert st["layer_exploration"]["0"] == st["exploration"] == pytest.approx(19 / 32)


def test_erk_check_vector():
    from sparsekern.sparsify import erk_densities
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]
    d = erk_densities(shapes, 0.9)
    assert [1 - v for v in d] == pytest.approx([0.433126, 0.885208, 0.945793, 0.0], abs=1e-5)
    n = [math.prod(s) for s in shapes]
    assert sum(v * k for v, k in zip(d, n)) / sum(n) == pytest.approx(0.100075, abs=1e-5)
    d = erk_densities(shapes, 0.5)
    assert [1 - v for v in d] == pytest.approx([0.0, 0.17488, 0.61036, 0.0], abs=1e-5)


def _train_masks(name, steps=8, **extra):
    model, optim, m = run_method(name, "dense", (1, 1), steps=steps, lr=0.05, **extra)
    for t in range(1, steps + 1):
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        m.step()
        optim.zero_grad()
    return {n: l.mask.clone() for n, l in layers_of(model).items()}, m


def test_dstee_c0_equals_rigl():
    a, _ = _train_masks("rigl")
    b, _ = _train_masks("dst-ee", c=0.0)
    for n in a:
        assert torch.equal(a[n], b[n])


def test_dstee_large_c_prefers_never_active():
    model, optim, m = run_method("dst-ee", "dense", (1, 1), steps=10, lr=0.05, c=1e6,
                                 c_relative=False)
    lays = layers_of(model)
    for t in range(1, 3):
        before = {n: units(l) for n, l in lays.items()}
        counters = {ls.name: ls.extra["counter"].clone() for ls in m.layers}
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        m.step()
        optim.zero_grad()
    for ls in m.layers:
        grown = units(ls.module) & ~before[ls.name]
        assert grown.any()
        assert (counters[ls.name][grown] == 0).all(), ls.name
        assert torch.equal(ls.extra["counter"], counters[ls.name] + units(ls.module).int())


def test_bidst_psi_grad_and_refresh():
    torch.manual_seed(0)
    model = Net()
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    m = dst.BiDST(model, optim, total_steps=20, refresh_every=3, search_space=0.2, lam=0.05,
                  tau=0.0, phi="abs")
    fc1 = model.fc1
    ls = next(s for s in m.layers if s.name == "fc1")
    inputs = {}

    def hook(mod, args, out):
        inputs["x"] = args[0].detach()
        out.register_hook(lambda g: inputs.__setitem__("dy", g))

    fc1.register_forward_hook(hook)
    for t in range(1, 4):
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        cand = m.candidates(ls)
        g = ref.dense_grad(inputs["dy"], inputs["x"])
        expect = ref.psi_grad(g, fc1.weight.detach(), fc1.mask, cand, 0.05, "abs")
        torch.testing.assert_close(fc1.scores.grad, expect)
        assert (fc1.scores.grad[~cand] == 0).all()
        mask_before = fc1.mask.clone()
        if t == 3:  # make the refresh move: ψ at random (its SGD step still follows)
            with torch.no_grad():
                fc1.scores.copy_(torch.rand(fc1.scores.shape))
        m.step()
        optim.zero_grad()
        if t < 3:
            assert torch.equal(fc1.mask, mask_before)
    # t = 3 was a refresh with tau = 0: the exact top-n of psi (after its step) over C
    psi = fc1.scores.detach()
    expect = torch.zeros_like(cand)
    idx = cand.flatten().nonzero().flatten()
    pos, _ = ref.stable_topk(psi.flatten()[idx], int(mask_before.sum()))
    expect.view(-1)[idx[pos]] = True
    assert torch.equal(fc1.mask, expect)
    assert not torch.equal(fc1.mask, mask_before)


@pytest.mark.parametrize("name", ["rigl", "dst-ee", "set", "bidst", "mest"])
def test_resume_bit_for_bit(name):
    steps, stop = 12, 5  # step 6 is an update step of rigl/set/dst-ee/mest: its request is armed
    extra = dict(tau=0.01) if name == "bidst" else {}

    def fresh():
        model, optim, m = run_method(name, "dense", (1, 1), steps=steps, lr=0.05, seed=3, **extra)
        return model, optim, m

    def train(model, optim, m, t0, t1):
        for t in range(t0, t1 + 1):
            x, y = batch(t)
            F.cross_entropy(model(x), y).backward()
            m.step()
            optim.zero_grad()

    model, optim, m = fresh()
    train(model, optim, m, 1, steps)
    want = {n: l.mask.clone() for n, l in layers_of(model).items()}
    want_stats = m.stats()

    model, optim, m = fresh()
    train(model, optim, m, 1, stop)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optim.state_dict(), "dst": m.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # a different fresh model
    model2 = Net()
    optim2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    cls, kw = METHODS[name]
    m2 = cls(model2, optim2, total_steps=steps, **{**kw, **extra})
    model2.load_state_dict(ck["model"])
    optim2.load_state_dict(ck["opt"])
    m2.load_state_dict(ck["dst"])
    train(model2, optim2, m2, stop + 1, steps)
    got = {n: l.mask for n, l in layers_of(model2).items()}
    for n in want:
        assert torch.equal(got[n], want[n]), n
    st = m2.stats()
    for key in ("n_updates", "layer_iou", "iou", "exploration", "n_grown", "flops_relative",
                "last_update"):
        assert st[key] == want_stats[key], key


def test_block_counts_in_blocks():
    model, optim, m = run_method("rigl", "bsr", (2, 2), steps=10, lr=0.05)
    x, y = batch(1)
    F.cross_entropy(model(x), y).backward()
    m.step()
    optim.zero_grad()
    x, y = batch(2)
    F.cross_entropy(model(x), y).backward()
    m.step()
    st = m.stats()
    for ls in m.layers:
        n_active = int(units(ls.module).sum())
        assert st["layer_n_dropped"][ls.name] == int(m.drop_fraction(2 - m.delta_t) * n_active)
        assert ls.module.weight.shape[0] == n_active  # the bsr parameter keeps its shape


def test_flops_relative():
    lay = SparseLinear(8, 4, sparsity=0.5, bias=False)
    model = nn.Sequential(lay)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    m = dst.RigL(model, opt, total_steps=8, delta_t=2, t_end=0.5)
    for t in range(1, 9):
        (model(torch.randn(4, 8)) ** 2).sum().backward()
        m.step()
        opt.zero_grad()
    # updates at t = 2 (t < 4 only): 2·d + 1, else 3·d, over 3 per step
    d = 0.5
    assert m.stats()["flops_relative"] == pytest.approx((7 * 3 * d + 2 * d + 1) / (3 * 8))
    model = Net()
    s = dst.Static(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=3)
    model(batch(1)[0])
    assert s._probe.flops == {"conv": 2 * 4 * 2 * 9 * 16, "fc1": 2 * 16 * 64, "fc2": 2 * 3 * 16}
    s.step()
    dens = {"conv": 0.5, "fc1": 0.25, "fc2": 0.5}
    want = sum(dens[k] * v for k, v in s._probe.flops.items()) / sum(s._probe.flops.values())
    assert s.stats()["flops_relative"] == pytest.approx(want)


def test_plain_model_is_sparsified_and_optimizer_follows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    m = dst.RigL(model, opt, total_steps=20, sparsity=0.8, distribution="uniform", delta_t=2,
                 layout="bsr", block_size=(2, 2))
    assert m.sparsity == 0.8 and m.distribution == "uniform"
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    for ls in m.layers:
        assert id(ls.module.weight) in held
    for t in range(1, 5):
        (model(torch.randn(6, 20)) ** 2).mean().backward()
        m.step()
        opt.zero_grad()
    assert m.n_updates == 2


def test_presparsified_model_keeps_masks():
    torch.manual_seed(0)
    model = Net()
    masks = {n: l.mask.clone() for n, l in layers_of(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = dst.SET(model, opt, total_steps=10)
    assert m.sparsity is None and m.distribution is None
    for n, l in layers_of(model).items():
        assert torch.equal(l.mask, masks[n])
    with pytest.warns(UserWarning, match="already holds sparse layers"):
        dst.SET(model, opt, total_steps=10, sparsity=0.5)


def test_bad_input():
    def mk():
        return nn.Sequential(nn.Linear(4, 4))

    def opt(mod):
        return torch.optim.SGD(mod.parameters(), lr=0.1)

    for s in (-0.1, 1.0, 1.5):
        model = mk()
        with pytest.raises(ValueError, match="sparsity"):
            dst.RigL(model, opt(model), total_steps=10, sparsity=s)
    for d in (0, -5, 1.5):
        model = mk()
        with pytest.raises(ValueError, match="delta_t"):
            dst.RigL(model, opt(model), total_steps=10, delta_t=d)
    for e in (0.0, -0.2, 1.01):
        model = mk()
        with pytest.raises(ValueError, match="t_end"):
            dst.RigL(model, opt(model), total_steps=10, t_end=e)
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="no sparsifiable layer"):
        dst.RigL(model, opt(model), total_steps=10)
    model = mk()
    other = torch.optim.SGD(nn.Linear(4, 4).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        dst.RigL(model, other, total_steps=10)
    assert type(model[0]) is nn.Linear  # checked before the model was changed
    with pytest.raises(ValueError, match="total_steps"):
        model = mk()
        dst.RigL(model, opt(model), total_steps=0)
    with pytest.raises(ValueError, match="phi"):
        model = mk()
        dst.BiDST(model, opt(model), total_steps=10, phi="nope")
    # a state dict of a different model
    a = Net()
    ma = dst.RigL(a, opt(a), total_steps=10)
    b = nn.Sequential(SparseLinear(8, 4, sparsity=0.5))
    mb = dst.RigL(b, opt(b), total_steps=10)
    with pytest.raises(ValueError, match="different model"):
        mb.load_state_dict(ma.state_dict())
    ms = dst.SET(a, opt(a), total_steps=10)
    with pytest.raises(ValueError, match="from 'RigL'"):
        ms.load_state_dict(ma.state_dict())


def test_epochs_to_steps():
    assert dst.epochs_to_steps(8, 100) == 800
    assert dst.epochs_to_steps(0.001, 10) == 1
    with pytest.raises(ValueError):
        dst.epochs_to_steps(1, 0)


@pytest.mark.parametrize("mode", ["EM", "EM&S"])
def test_mest_bounds(mode):
    """MEST holds the upper bound after each update; the gap closes to 0 (EM&S ends at the
    target)."""
    model, optim, m = run_method("mest", "dense", (1, 1), steps=16, lr=0.05, mode=mode, gap=0.1)
    lays = layers_of(model)
    target = {n: int(units(l).sum()) for n, l in lays.items()}
    gaps = []
    for t in range(1, 17):
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        if m.step():
            gaps.append(m.gap_at(t))
            for ls in m.layers:
                lower, upper = m.bounds(ls, t)
                assert int(units(ls.module).sum()) == upper
                assert upper == target[ls.name] if mode == "EM" else upper >= target[ls.name]
        optim.zero_grad()
    assert gaps == pytest.approx([0.1, 0.1 * 2 / 3, 0.1 / 3, 0.1 / 3, 0.0])
    for n, l in lays.items():
        assert int(units(l).sum()) == target[n]


def _integer_rigl_masks(backend, layout, block):
    """Masks after one RigL update from integer-valued weights, inputs and output gradient
    (every product exact in fp32, so every backend must pick the same units, ties to the lower
    index)."""
    sk.set_backend(backend)
    torch.manual_seed(0)
    model = Net(layout, block)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for l in layers_of(model).values():
            l.weight.copy_(torch.randint(-3, 4, l.weight.shape, generator=g).float())
            l.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = dst.RigL(model, opt, total_steps=2, delta_t=1, t_end=1.0, alpha=0.5)
    x = torch.randint(-2, 3, (4, 2, 4, 4), generator=g).float()
    r = torch.randint(-2, 3, (4, 3), generator=g).float()
    (model(x) * r).sum().backward()
    assert m.step()
    return {n: l.mask.clone() for n, l in layers_of(model).items()}


@pytest.mark.parametrize("layout,block", [("dense", (1, 1)), ("bsr", (2, 2))])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_growth_same_on_every_backend(backend, layout, block):
    why = sk.available_backends()[backend]
    if why != "ok":
        pytest.skip(f"backend {backend} unavailable: {why}")
    want = _integer_rigl_masks("reference", layout, block)
    got = _integer_rigl_masks(backend, layout, block)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_bidst_eq9_form_is_the_papers_equation():
    """``phi="eq9"``: ``dψ = W⊙G − G/λ`` on C (the paper's eq. 9 as written)."""
    torch.manual_seed(0)
    model = Net()
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    m = dst.BiDST(model, optim, total_steps=20, refresh_every=3, search_space=0.2, lam=0.5,
                  phi="eq9")
    fc1, ls = model.fc1, next(s for s in m.layers if s.name == "fc1")
    inputs = {}

    def hook(mod, args, out):
        inputs["x"] = args[0].detach()
        out.register_hook(lambda g: inputs.__setitem__("dy", g))

    fc1.register_forward_hook(hook)
    x, y = batch(1)
    F.cross_entropy(model(x), y).backward()
    g = ref.dense_grad(inputs["dy"], inputs["x"])
    cand = m.candidates(ls)
    expect = torch.where(cand, g * fc1.weight.detach() - g / 0.5, torch.zeros_like(g))
    torch.testing.assert_close(fc1.scores.grad, expect)


def test_bidst_default_grows_never_active_units():
    """With its defaults (phi="abs") a search-space unit whose weight was never active gains
    score and enters the mask; the first default (sq_active) kept exploration at the start."""
    explored = {}
    for phi in ("abs", "sq_active"):
        kw = {} if phi == "abs" else {"phi": phi, "lam": 1e-4}
        explored[phi] = _bidst_run(**kw)
    m = explored["abs"]
    assert any(bool((ls.ever & ~ls.extra["initial"]).any()) for ls in m.layers)
    assert m.stats()["exploration"] > explored["sq_active"].stats()["exploration"]
    assert explored["sq_active"].stats()["exploration"] == pytest.approx(
        sum(ls.n_target for ls in m.layers) / sum(ls.n_units for ls in m.layers))


def _bidst_run(**kw):
    torch.manual_seed(0)
    model = Net()
    optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    m = dst.BiDST(model, optim, total_steps=12, refresh_every=2, search_space=0.2, **kw)
    for ls in m.layers:
        ls.extra["initial"] = ls.unit_mask()
    for t in range(1, 11):
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        m.step()
        optim.zero_grad()
    assert m.n_updates >= 4
    return m


def test_dstee_default_explores_more_than_rigl():
    """At its default ``c`` DST-EE grows a different set than RigL and its exploration gain over
    the initial density is at least 1.25x RigL's on the same run."""
    a, ma = _train_masks("rigl", steps=12)
    b, mb = _train_masks("dst-ee", steps=12)
    assert any(not torch.equal(a[n], b[n]) for n in a)
    start = sum(ls.n_target for ls in ma.layers) / sum(ls.n_units for ls in ma.layers)
    gain_rigl = ma.stats()["exploration"] - start
    gain_ee = mb.stats()["exploration"] - start
    assert gain_rigl > 0
    assert gain_ee >= 1.25 * gain_rigl


def test_rigl_kth_update_uses_previous_drop_fraction():
    """The k-th update (t = kΔT) drops ``int(f((k−1)ΔT)·n)``, as the official RigL code: the
    first one the full ``α``."""
    lay = SparseLinear(10, 10, sparsity=0.5, bias=False)
    model = nn.Sequential(lay)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = dst.RigL(model, opt, total_steps=40, delta_t=10, alpha=0.3, t_end=1.0)
    drops = []
    for t in range(1, 21):
        model(torch.randn(4, 10)).pow(2).sum().backward()
        if m.step():
            drops.append(m.stats()["last_update"]["n_dropped"])
        opt.zero_grad()
    assert drops == [int(0.3 * 50), int(m.drop_fraction(10) * 50)] == [15, 12]


def test_mest_gap_schedule_expresses_the_official_one():
    """2% gap until epoch 90 of 160, 1% until 120, then 0."""
    model, optim, m = run_method("mest", "dense", (1, 1), steps=160, update_every=10,
                                 gap_schedule=[(90 / 160, 0.02), (120 / 160, 0.01)], t_end=1.0)
    assert [m.gap_at(t) for t in (10, 89, 90, 119, 120, 150)] == \
        [0.02, 0.02, 0.01, 0.01, 0.0, 0.0]
    for bad in ([(0.8, 0.02), (0.5, 0.01)], [(1.5, 0.02)], [(0.5, 2.0)], "x"):
        with pytest.raises(ValueError, match="gap_schedule"):
            run_method("mest", "dense", (1, 1), gap_schedule=bad)


@pytest.mark.parametrize("cls, kw, name", [
    (dst.DSTEE, {"c": float("nan")}, "c"), (dst.DSTEE, {"c": float("inf")}, "c"),
    (dst.DSTEE, {"eps": float("nan")}, "eps"), (dst.DSTEE, {"eps": float("inf")}, "eps"),
    (dst.BiDST, {"lam": float("nan")}, "lam"), (dst.BiDST, {"tau": float("nan")}, "tau"),
    (dst.BiDST, {"lam": float("inf")}, "lam"), (dst.BiDST, {"phi": "eq9", "lam": 0.0}, "lam"),
    (dst.MEST, {"gamma": float("nan")}, "gamma"),
    (dst.BiDST, {"delta_t": 5, "refresh_every": 7}, "delta_t"),
    (dst.MEST, {"delta_t": 5, "update_every": 7}, "delta_t"),
    (dst.Static, {"delta_t": 5}, "delta_t"),
])
def test_bad_hyperparameters_are_rejected(cls, kw, name):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=name):
        cls(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, **kw)


@pytest.mark.parametrize("cls, own", [(dst.BiDST, "refresh_every"), (dst.MEST, "update_every")])
def test_delta_t_is_an_alias_of_the_update_period(cls, own):
    model = nn.Sequential(nn.Linear(8, 8))
    m = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, delta_t=3)
    assert m.delta_t == getattr(m, own) == 3


def test_planted_benchmark_smoke(tmp_path):
    """``benchmarks/dst_planted.py`` on a minimal config writes both tasks' JSON, and on the
    linear task (an identifiable planted mask) RigL recovers far more of it than static."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dst_planted.py"
    spec = importlib.util.spec_from_file_location("dst_planted", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.json"
    methods = ["static", "rigl", "gse-graest", "bidst:phi='eq9',lam=1.0"]
    assert mod.main(["--sizes", "8", "16", "4", "--linear-sizes", "32", "16", "--steps", "40",
                     "--batch", "64", "--delta-t", "4", "--lr", "1e-2", "--seeds", "0",
                     "--sparsities", "0.8", "--methods", *methods, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {f"{t}/{m}@0.8" for t in ("linear", "mlp") for m in methods}
    assert res["machine"]["threads"] == 1 and res["cpu_s"] > 0
    r = res["results"]["mlp/rigl@0.8"][0]
    assert r["n_updates"] >= 1 and r["exploration"] > 0.2
    static, rigl = (res["results"][f"linear/{m}@0.8"][0]["recovery"] for m in ("static", "rigl"))
    assert static < 0.35 and rigl > static + 0.25  # chance is the density, 0.2
