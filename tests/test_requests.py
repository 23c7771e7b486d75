"""Requests a DST method arms on a layer: GrowRequest (exact top-k growth candidates from the
fused backward) and CandidateRequest (BiDST's mask-score gradient on the candidate set).

Inputs are small integers, so every dot product is exact in any order: top-k index sets are
compared exactly (ties are plentiful; the tie rule is "lower flat index first") and so are the
score gradients."""
import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import reference as ref
from sparsekern.nn import CandidateRequest, GrowRequest

LAYOUTS = ["dense", "bsr"]


def ints(*shape, lo=-3, hi=4, dtype=torch.float64):
    return torch.randint(lo, hi, shape).to(dtype)


def int_weights(layer, dormant=False):
    """Small-integer weights on the active entries (and on dormant ones when asked)."""
    with torch.no_grad():
        if layer.layout == "dense":
            w = ints(*layer.weight.shape, dtype=layer.weight.dtype)
            layer.weight.copy_(w if dormant else w * layer.mask)
        else:
            layer.weight.copy_(ints(*layer.weight.shape, dtype=layer.weight.dtype))
    return layer


def dense_grad(layer, x, dy):
    """The dense candidate gradient ``G`` on the 2-D weight view, from a dense nn twin."""
    if isinstance(layer, sk.SparseLinear):
        twin = nn.Linear(layer.in_features, layer.out_features, dtype=x.dtype)
    else:
        twin = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                         layer.padding, layer.dilation, layer.groups,
                         padding_mode=layer.padding_mode, dtype=x.dtype)
    with torch.no_grad():
        twin.weight.copy_(layer.dense_weight())
    twin(x).backward(dy)
    return twin.weight.grad.flatten(1)


def expected_topk(g2d, exclude, k, block_size, counter=None, bonus_scale=0.0, eps=1.0):
    """By hand: score per entry (block mean of |G| by true block size), + bonus; the k best
    allowed ones sorted by (score descending, flat index ascending)."""
    s = g2d.abs()
    if block_size != (1, 1):
        br, bc = block_size
        m, k2 = s.shape
        nbr, nbc = -(-m // br), -(-k2 // bc)
        s = torch.stack([torch.stack([s[r * br:(r + 1) * br, c * bc:(c + 1) * bc].mean()
                                      for c in range(nbc)]) for r in range(nbr)])
    if counter is not None:
        s = s + bonus_scale / (counter.to(s.dtype) + eps)
    flat = s.flatten()
    allowed = [i for i in range(flat.numel()) if not exclude.flatten()[i]]
    order = sorted(allowed, key=lambda i: (-flat[i].item(), i))[:k]
    return torch.tensor(order, dtype=torch.int64), flat[order]


def grad_outputs(layer, x, dy):
    """Output, input grad and dense-view weight grad (plain path or request path)."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.values_to_dense(layer.weight.grad)


def linear_case(layout, block_size, dtype=torch.float64):
    layer = sk.SparseLinear(11, 7, sparsity=0.5, block_size=block_size, layout=layout,
                            dtype=dtype)
    int_weights(layer)
    return layer, ints(2, 3, 11, dtype=dtype), ints(2, 3, 7, dtype=dtype)


def conv_case(layout, block_size, dtype=torch.float64):
    layer = sk.SparseConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, groups=2, sparsity=0.5,
                            block_size=block_size, layout=layout, dtype=dtype)
    int_weights(layer)
    x = ints(2, 4, 6, 5, dtype=dtype)
    dy = ints(*layer(x).shape, dtype=dtype)
    return layer, x, dy


CASES = {"linear": linear_case, "conv": conv_case}


# --------------------------------------------------------------------------- GrowRequest
@pytest.mark.parametrize("dst_ee", [False, True])
@pytest.mark.parametrize("block_size", [(1, 1), (2, 3)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_grow_request_exact_topk(kind, layout, block_size, dst_ee):
    layer, x, dy = CASES[kind](layout, block_size)
    plain = grad_outputs(layer, x, dy)
    g = dense_grad(layer, x, dy)
    grid = layer._grow_grid()
    exclude = (layer.mask.flatten(1) if block_size == (1, 1)
               else layer.topology.block_mask)  # the default: the active entries / blocks
    n_allowed = int((~exclude).sum())
    k = max(1, n_allowed // 3)
    kw = {}
    if dst_ee:
        choices = torch.tensor([0, 1, 3])
        kw = dict(counter=choices[torch.randint(0, 3, grid)], bonus_scale=0.5, eps=1.0)
    layer.request(GrowRequest(k=k, **kw))
    assert layer.grow_candidates is None
    got = grad_outputs(layer, x, dy)
    idx, scores = layer.grow_candidates
    exp_idx, exp_scores = expected_topk(g, exclude, k, block_size, **kw)
    assert torch.equal(idx, exp_idx)
    assert torch.equal(scores, exp_scores)
    # the oracle of the op says the same (linear: on the flattened batch)
    if kind == "linear":
        r_idx, r_scores = ref.grow_topk(dy.reshape(-1, 7), x.reshape(-1, 11), exclude, k,
                                        kw.get("counter"), kw.get("bonus_scale", 0.0),
                                        kw.get("eps", 1.0), *block_size)
        assert torch.equal(idx, r_idx) and torch.equal(scores, r_scores)
    # the request path gives the same output and gradients as the plain path
    for a, b in zip(plain, got):
        assert torch.equal(a, b)
    # one-shot: the next step neither recomputes nor clears the candidates
    grad_outputs(layer, x, 2 * dy)
    assert layer.grow_candidates[0] is idx


def test_grow_request_explicit_exclude_and_ties():
    layer = sk.SparseLinear(6, 4, sparsity=0.0, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.ones(3, 6, dtype=torch.float64)
    dy = torch.ones(3, 4, dtype=torch.float64)  # G = 3 everywhere: all tied
    exclude = torch.zeros(4, 6, dtype=torch.bool)
    exclude[0, :3] = True
    layer.request(GrowRequest(k=5, exclude=exclude))
    layer(x).backward(dy)
    idx, scores = layer.grow_candidates
    assert idx.tolist() == [3, 4, 5, 6, 7]
    assert scores.tolist() == [3.0] * 5


def test_grow_request_waits_for_a_grad_forward():
    layer, x, dy = linear_case("dense", (1, 1))
    layer.request(GrowRequest(k=3))
    with torch.no_grad():
        layer(x)
    assert layer._grow_request is not None
    layer(x).backward(dy)
    assert layer.grow_candidates[0].numel() == 3 and layer._grow_request is None


def test_grow_request_fp32():
    layer, x, dy = linear_case("bsr", (2, 2), dtype=torch.float32)
    g = dense_grad(layer, x, dy)
    layer.request(GrowRequest(k=4))
    layer(x).backward(dy)
    idx, scores = layer.grow_candidates
    exp_idx, exp_scores = expected_topk(g, layer.topology.block_mask, 4, (2, 2))
    assert torch.equal(idx, exp_idx) and torch.equal(scores, exp_scores)
    assert scores.dtype == torch.float32


# --------------------------------------------------------------------------- CandidateRequest
def expected_psi(g, w, active, cand, lam, phi):
    reg = {"sq_active": g * g * active, "abs": g.abs(), "signed": g}[phi]
    return torch.where(cand, g * w - lam * reg, torch.zeros_like(g))


@pytest.mark.parametrize("phi", ["sq_active", "abs", "signed"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_candidate_request_scores_grad(kind, layout, phi):
    block_size = (1, 1) if layout == "dense" else (2, 2)
    layer, x, dy = CASES[kind](layout, block_size)
    int_weights(layer, dormant=True)  # dormant weights count in G⊙W, not in the forward
    plain = grad_outputs(layer, x, dy)
    g = dense_grad(layer, x, dy)
    m2 = layer.mask.flatten(1)
    extra = (torch.rand(m2.shape) < 0.3) & ~m2
    cand = m2 | extra
    layer.enable_scores()
    layer.set_candidates(CandidateRequest(cand, lam=0.25, phi=phi))
    got = grad_outputs(layer, x, dy)
    for a, b in zip(plain, got):
        assert torch.equal(a, b)
    w_raw = layer.values_to_dense(layer.weight.detach()).flatten(1)
    expect = expected_psi(g, w_raw, m2, cand, 0.25, phi)
    dpsi = layer.scores.grad.flatten(1)
    assert layer.scores.grad.shape == layer.mask.shape
    assert torch.equal(dpsi, expect)
    assert torch.equal(dpsi, ref.psi_grad(g, w_raw, m2, cand, 0.25, phi))
    assert not dpsi[~cand].any()
    # persistent: the next step accumulates again with the cached candidate topology
    spec = layer._candidate_cache[-1]
    layer(x).backward(dy)
    assert layer._candidate_cache[-1] is spec
    assert torch.equal(layer.scores.grad.flatten(1), 2 * expect)


def test_candidate_cache_follows_mask_and_candidates():
    layer, x, dy = linear_case("dense", (1, 1))
    layer.enable_scores()
    cand = layer.mask | (torch.rand(7, 11) < 0.2)
    layer.set_candidates(CandidateRequest(cand))
    layer(x).backward(dy)
    spec = layer._candidate_cache[-1]
    cand[0] = True  # edited in place: a new topology
    layer(x).backward(dy)
    spec2 = layer._candidate_cache[-1]
    assert spec2 is not spec and spec2.pattern[0].all()
    layer.set_mask(~layer.mask)  # a new mask: a new pattern
    layer(x).backward(dy)
    assert layer._candidate_cache[-1] is not spec2
    layer.set_candidates(None)
    layer.scores.grad = None
    layer(x).backward(dy)
    assert layer.scores.grad is None


def test_grow_and_candidates_together():
    layer, x, dy = linear_case("dense", (1, 1))
    g = dense_grad(layer, x, dy)
    layer.enable_scores()
    cand = layer.mask | (torch.rand(7, 11) < 0.3)
    layer.set_candidates(CandidateRequest(cand, lam=0.5, phi="abs"))
    layer.request(GrowRequest(k=6))
    _, _, dw = grad_outputs(layer, x, dy)
    assert torch.equal(dw, g * layer.mask)
    exp_idx, _ = expected_topk(g, layer.mask, 6, (1, 1))
    assert torch.equal(layer.grow_candidates[0], exp_idx)
    assert torch.equal(layer.scores.grad, expected_psi(g, layer.weight.detach(), layer.mask,
                                                       cand, 0.5, "abs"))


def test_request_validation():
    layer = sk.SparseLinear(6, 4, sparsity=0.5, block_size=(2, 2))
    with pytest.raises(ValueError, match="k=7 exceeds"):
        layer.request(GrowRequest(k=7))  # 6 blocks, 3 active
    with pytest.raises(ValueError, match="exclude must have shape"):
        layer.request(GrowRequest(k=1, exclude=torch.zeros(4, 6, dtype=torch.bool)))
    with pytest.raises(TypeError, match="exclude must be a bool"):
        layer.request(GrowRequest(k=1, exclude=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="counter must have shape"):
        layer.request(GrowRequest(k=1, counter=torch.zeros(5)))
    with pytest.raises(ValueError, match="k must be"):
        layer.request(GrowRequest(k=-1))
    with pytest.raises(TypeError, match="GrowRequest"):
        layer.request(CandidateRequest(torch.zeros(4, 6, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="enable_scores"):
        layer.set_candidates(CandidateRequest(torch.zeros(4, 6, dtype=torch.bool)))
    layer.enable_scores()
    with pytest.raises(ValueError, match="candidates must have shape"):
        layer.set_candidates(CandidateRequest(torch.zeros(6, 4, dtype=torch.bool)))
    with pytest.raises(TypeError, match="candidates must be a bool"):
        layer.set_candidates(CandidateRequest(torch.zeros(4, 6)))
    with pytest.raises(ValueError, match="phi must be one of"):
        layer.set_candidates(CandidateRequest(torch.zeros(4, 6, dtype=torch.bool), phi="sq"))


def test_enable_scores_init():
    layer = sk.SparseConv2d(2, 4, 3, sparsity=0.5, block_size=(2, 2), layout="bsr")
    s = layer.enable_scores()
    assert s is layer.scores and isinstance(s, nn.Parameter)
    assert s.shape == layer.mask.shape
    torch.testing.assert_close(s, layer.dense_weight().detach().abs())
    assert layer.enable_scores() is s
    assert any(p is s for p in layer.parameters())


def test_requests_with_reused_bsr_slots():
    from sparsekern.topology import expand_blocks

    layer, x, dy = linear_case("bsr", (2, 2))
    bm = layer.topology.block_mask.flatten()
    bm[bm.nonzero().flatten()[:2]] = False
    bm[(~bm).nonzero().flatten()[-2:]] = True
    layer.set_mask(expand_blocks(bm.view(layer.topology.block_mask.shape), (2, 2), (7, 11)))
    assert not layer._slots_identity
    int_weights(layer)
    g = dense_grad(layer, x, dy)
    layer.enable_scores()
    cand = layer.mask | (torch.rand(7, 11) < 0.3)
    layer.set_candidates(CandidateRequest(cand, lam=0.25, phi="sq_active"))
    layer.request(GrowRequest(k=3))
    _, _, dw = grad_outputs(layer, x, dy)
    assert torch.equal(dw, g * layer.mask)
    exp_idx, _ = expected_topk(g, layer.topology.block_mask, 3, (2, 2))
    assert torch.equal(layer.grow_candidates[0], exp_idx)
    w_raw = layer.values_to_dense(layer.weight.detach())
    assert torch.equal(layer.scores.grad,
                       expected_psi(g, w_raw, layer.mask, cand, 0.25, "sq_active"))
