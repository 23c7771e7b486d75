"""DST in real training loops: frozen layers, weight sharing, gradient accumulation, GradScaler
and non-reentrant activation checkpointing.

Growth tests use small-integer inputs, weights and output gradients, so every gradient entry is
an exact integer in any summation order: grown sets are compared exactly with the top-k of the
dense accumulated gradient (ties to the lower flat index). GradScaler scales are powers of two,
so a scaled run's unscaled gradients equal an unscaled run's bit for bit, and so do its masks
and weights."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import sparsekern as sk
from sparsekern import dst
from sparsekern.nn import GrowRequest

from test_requests import expected_topk, int_weights, ints


def dense_twin(layer):
    """An nn layer holding ``layer``'s masked weight (no bias)."""
    if isinstance(layer, sk.SparseLinear):
        twin = nn.Linear(layer.in_features, layer.out_features, bias=False,
                         dtype=layer.weight.dtype)
    else:
        twin = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                         layer.padding, layer.dilation, layer.groups, bias=False,
                         padding_mode=layer.padding_mode, dtype=layer.weight.dtype)
    with torch.no_grad():
        twin.weight.copy_(layer.dense_weight())
    return twin


def default_exclude(layer):
    return layer.mask.flatten(1) if layer.block_size == (1, 1) else layer.topology.block_mask


# --------------------------------------------------------------------------- frozen layers
def test_sparsify_keeps_requires_grad_and_dst_keeps_frozen_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    sk.sparsify(model, 0.5, seed=0)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert model[2].weight.requires_grad and not model[2].bias.requires_grad

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    m = dst.RigL(model, opt, total_steps=20, delta_t=2, alpha=0.5)
    frozen_mask, frozen_w = model[0].mask.clone(), model[0].weight.detach().clone()
    live_mask = model[2].mask.clone()
    for _ in range(6):
        F.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 4, (8,))).backward()
        m.step()
        opt.zero_grad()
    assert m.n_updates == 3
    assert torch.equal(model[0].mask, frozen_mask)
    assert torch.equal(model[0].weight, frozen_w)
    assert not torch.equal(model[2].mask, live_mask)  # the trainable layer did move


# --------------------------------------------------------------------------- weight sharing
def test_sparsify_replaces_a_shared_module_everywhere():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(8, 3))
    sk.sparsify(model, 0.2, seed=0, exclude=["2"])  # any name of the shared module excludes it
    assert model[0] is lin and model[2] is lin
    sk.sparsify(model, 0.5, seed=0)
    assert isinstance(model[0], sk.SparseLinear) and model[2] is model[0]
    assert len([m for m in model.modules() if isinstance(m, sk.SparseLinear)]) == 2


def test_tied_parameters_rejected_with_a_clear_message():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    with pytest.raises(ValueError, match=r"0\.weight is the same Parameter as 2\.weight "
                                         r"\(tied weights\).*share the module"):
        sk.sparsify(model, 0.5, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="tied weights"):
        dst.RigL(model, opt, total_steps=10, sparsity=0.5)
    assert model[0] is a and model[2] is b  # nothing was swapped
    with pytest.raises(ValueError, match="tied weights"):  # swapping one side breaks the tie
        sk.sparsify(model, 0.5, seed=0, exclude=["2"])
    sk.sparsify(nn.Sequential(model, nn.Linear(8, 8)), 0.2, distribution="uniform", seed=0,
                exclude=["0.0", "0.2"])
    emb, head = nn.Embedding(5, 8), nn.Linear(8, 5, bias=False)
    head.weight = emb.weight
    with pytest.raises(ValueError, match=r"1\.weight is the same Parameter as 0\.weight"):
        sk.sparsify(nn.Sequential(emb, head), 0.5, seed=0)


# --------------------------------------------------------------------------- accumulation
def _linear(layout, block_size, dtype):
    layer = sk.SparseLinear(11, 7, sparsity=0.5, block_size=block_size, layout=layout,
                            dtype=dtype)
    return int_weights(layer), [ints(2, 3, 11, dtype=dtype), ints(4, 11, dtype=dtype),
                                ints(1, 11, dtype=dtype)]


def _conv(layout, block_size, dtype):
    layer = sk.SparseConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, groups=2, sparsity=0.5,
                            block_size=block_size, layout=layout, dtype=dtype)
    sizes = [(2, 6, 5), (1, 7, 4), (3, 5, 5)]  # micro-batches of different image sizes
    return int_weights(layer), [ints(n, 4, h, w, dtype=dtype) for n, h, w in sizes]


@pytest.mark.parametrize("kind,layout,block_size,dst_ee,backend", [
    ("linear", "dense", (1, 1), False, "reference"), ("linear", "bsr", (2, 3), True, "reference"),
    ("conv", "dense", (1, 1), True, "reference"), ("conv", "bsr", (2, 3), False, "reference"),
    ("linear", "dense", (1, 1), True, "cpp"), ("conv", "bsr", (2, 3), True, "cpp"),
    ("conv", "dense", (2, 3), False, "cpp")])
def test_growth_ranks_the_accumulated_gradient(kind, layout, block_size, dst_ee, backend):
    """Three micro-batches: the candidates are the top-k of the summed dense gradient, and
    weight.grad is the ordinary accumulated gradient."""
    sk.set_backend(backend)
    layer, xs = (_linear if kind == "linear" else _conv)(layout, block_size, torch.float32)
    twin = dense_twin(layer)
    dys = [ints(*twin(x).shape, dtype=torch.float32) for x in xs]
    for x, dy in zip(xs, dys):
        twin(x).backward(dy)
    g = twin.weight.grad.flatten(1)
    exclude = default_exclude(layer)
    k = max(1, int((~exclude).sum()) // 3)
    kw = {}
    if dst_ee:
        kw = dict(counter=torch.randint(0, 3, tuple(exclude.shape)), bonus_scale=0.5, eps=1.0)
    layer.request(GrowRequest(k=k, **kw))
    for x, dy in zip(xs, dys):
        layer(x).backward(dy)
    idx, scores = layer.grow_candidates
    exp_idx, exp_scores = expected_topk(g.double(), exclude, k, block_size, **kw)
    assert torch.equal(idx, exp_idx)
    torch.testing.assert_close(scores.double(), exp_scores, rtol=1e-6, atol=0)
    assert torch.equal(layer.values_to_dense(layer.weight.grad),
                       (twin.weight.grad * layer.mask).to(layer.weight.dtype))


def test_growth_counts_every_use_of_a_shared_layer():
    """A layer called twice in one forward ranks dW of both calls."""
    layer = int_weights(sk.SparseLinear(6, 6, sparsity=0.5, dtype=torch.float64))
    twin = dense_twin(layer)
    x, c = ints(5, 6), ints(5, 6)
    (twin(twin(x)) * c).sum().backward()
    exclude = default_exclude(layer)
    k = int((~exclude).sum()) // 2
    layer.request(GrowRequest(k=k))
    (layer(layer(x)) * c).sum().backward()
    idx, _ = layer.grow_candidates
    assert torch.equal(idx, expected_topk(twin.weight.grad.flatten(1), exclude, k, (1, 1))[0])


def test_rigl_grows_from_every_micro_batch():
    """RigL on one integer-valued layer, three micro-batches per step: the grown set is the
    top-k of the accumulated gradient (and not that of micro-batch 0 alone)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 12, bias=False, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = dst.RigL(model, opt, total_steps=10, sparsity=0.7, delta_t=1, alpha=0.5)
    layer = int_weights(model[0])
    twin = dense_twin(layer)
    kept, k = m.layers[0].armed["exclude"].clone(), m.layers[0].armed["k"]
    first = None
    for _ in range(3):
        x, c = ints(4, 16), ints(4, 12)
        (layer(x) * c).sum().backward()
        (twin(x) * c).sum().backward()
        first = twin.weight.grad.clone() if first is None else first
    assert m.step()

    def top(g):
        out = torch.zeros_like(kept)
        out.view(-1)[expected_topk(g, kept, k, (1, 1))[0]] = True
        return out

    assert k > 0 and not torch.equal(top(first), top(twin.weight.grad))
    assert torch.equal(layer.mask & ~kept, top(twin.weight.grad))
    assert torch.equal(layer.mask & kept, kept)


# --------------------------------------------------------------------------- GradScaler
def _amp_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                          nn.Linear(24, 3))
    return model


def _data(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)


def _run(method, steps, scaler=None, overflow_at=(), layout="dense"):
    model = _amp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = dict(refresh_every=2) if method is dst.BiDST else dict(delta_t=2)
    m = method(model, opt, total_steps=3 * steps, sparsity=0.6, layout=layout,
               block_size=(1, 1) if layout == "dense" else (2, 2), scaler=scaler, **kw)
    history = []
    for t in range(1, steps + 1):
        x, y = _data(t)
        loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if t in overflow_at:
            with torch.no_grad():
                model[2].weight.grad.view(-1)[0] = float("inf")
        before = copy.deepcopy(model.state_dict())
        m.step(scaler=scaler)
        if scaler is not None:
            scaler.update()
        opt.zero_grad()
        history.append((before, copy.deepcopy(model.state_dict())))
    return m, model, history


@pytest.mark.parametrize("method", [dst.RigL, dst.DSTEE, dst.BiDST])
def test_scaled_run_matches_unscaled_run(method):
    """Unscaled growth scores (DST-EE's bonus included): same masks and weights, exactly."""
    _, plain, _ = _run(method, 6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    m, scaled, _ = _run(method, 6, scaler)
    assert m.n_updates == 3 and m.n_skipped == 0 and scaler.get_scale() > 1
    for (name, a), (_, b) in zip(plain.state_dict().items(), scaled.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("method", [dst.RigL, dst.BiDST])
def test_overflow_skips_the_step_and_the_update(method, layout):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    m, model, history = _run(method, 5, scaler, overflow_at=(2, 3), layout=layout)
    assert m.n_skipped == 2 and m.step_count == 5
    for t in (2, 3):  # an update step (2) and a plain one (3): nothing moved
        before, after = history[t - 1]
        for name in before:
            assert torch.equal(before[name], after[name]), (t, name)
    for state in history[-1]:
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert scaler.get_scale() == 2.0 ** 8  # two backoffs, applied by the user's update()
    assert m.n_updates == 1  # step 4 updated normally after the overflows
    assert not torch.equal(history[4][0]["2.bias"], history[4][1]["2.bias"])  # step 5 steps
    before, after = history[3]
    if method is dst.RigL:
        key = "2.mask" if layout == "dense" else "2.block_mask"  # bsr: the block grid
        assert not torch.equal(before[key], after[key])
    else:
        assert not torch.equal(before["2.scores"], after["2.scores"])


def test_bidst_warns_when_the_scaler_comes_late():
    """BiDST's dψ is quadratic in G: formed before the scaler is known it cannot be unscaled
    exactly, which the first step says."""
    model = _amp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = dst.BiDST(model, opt, total_steps=10, sparsity=0.6, refresh_every=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    x, y = _data(1)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.warns(UserWarning, match="formed before the GradScaler was known"):
        m.step(scaler=scaler)


def test_step_scaler_argument_checked():
    model = _amp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = dst.RigL(model, opt, total_steps=10, sparsity=0.5)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        m.step(scaler=2.0)


# --------------------------------------------------------------------------- checkpointing
class _Blocks(nn.Module):
    def __init__(self, ckpt):
        super().__init__()
        self.ckpt = ckpt
        self.a = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU())
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = checkpoint(self.a, x, use_reentrant=False) if self.ckpt else self.a(x)
        return self.head(h)


@pytest.mark.parametrize("method,layout", [(dst.RigL, "bsr"), (dst.DSTEE, "dense"),
                                           (dst.BiDST, "dense")])
def test_non_reentrant_checkpoint_matches_plain(method, layout):
    def run(ckpt):
        torch.manual_seed(0)
        model = _Blocks(ckpt)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        kw = dict(refresh_every=2) if method is dst.BiDST else dict(delta_t=2)
        m = method(model, opt, total_steps=20, sparsity=0.6, layout=layout,
                   block_size=(1, 1) if layout == "dense" else (2, 2), **kw)
        for t in range(1, 6):
            x, y = _data(t)
            F.cross_entropy(model(x), y).backward()
            m.step()
            opt.zero_grad()
        assert m.n_updates == 2
        return model.state_dict()

    plain, ckpt = run(False), run(True)
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


def test_capture_pairs_inputs_with_output_gradients_under_recomputation():
    """The data-parallel/GSE capture records a call only when its output gets a gradient: a
    checkpoint's recomputed forward (run to the end without early stop) adds nothing."""
    from types import SimpleNamespace

    from sparsekern.dst.distributed import Capture

    layer = sk.SparseLinear(6, 5, sparsity=0.5)
    cap = Capture([SimpleNamespace(index=0, module=layer)])
    x = torch.randn(4, 6, requires_grad=True)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        y = checkpoint(layer, x, use_reentrant=False)
        (2 * y).sum().backward()
    xs, dys = cap.tensors(0, "test")
    cap.remove()
    assert torch.equal(xs, x.detach()) and torch.equal(dys, torch.full((4, 5), 2.0))
