"""Exact growth top-k (radix select over recomputed GEMM tiles) and the fused weight-side op.

Tie rule: scores are compared as the reference's stable descending sort orders them — equal
scores go to the lower flat index, NaN above everything. Small-integer inputs make every dot
product exact, so indices must match exactly and ties are plentiful.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from _triton_cases import (B, DEVICE, K, M, assert_same_topk, block_mask, guarded, ints, kernels,
                           score_grid, topo_of)
from sparsekern import reference as ref
from sparsekern.kernels import topk

IMPLS = kernels.IMPLS
TOPK_BLOCKS = [(1, 1), (16, 16), (3, 5), (32, 32)]


def _inputs(bs, seed=0, excluded=0.3):
    g = torch.Generator().manual_seed(seed)
    dy, x = ints(B, M, gen=g), ints(B, K, gen=g)
    grid = score_grid(M, K, bs)
    exclude = (torch.rand(grid, generator=g) < excluded).to(DEVICE)
    counter = torch.randint(0, 4, grid, generator=g, dtype=torch.int32).to(DEVICE)
    return dy, x, exclude, counter, int((~exclude).sum())


@pytest.mark.parametrize("bs", TOPK_BLOCKS, ids=str)
def test_grow_topk_exact_with_ties(bs):
    dy, x, exclude, counter, n_valid = _inputs(bs)
    for k in sorted({1, min(17, n_valid), n_valid}):
        for cnt, bonus in ((None, 0.0), (counter, 0.75)):
            args = (dy, x, exclude, k, cnt, bonus, 1.0, *bs)
            assert_same_topk(IMPLS["grow_topk"](*args), ref.grow_topk(*args))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_grow_topk_nan_highest_and_eps():
    """A NaN in ``x`` makes a whole column of ``G`` NaN: those entries come first, by index."""
    dy, x, exclude, counter, _ = _inputs((1, 1), seed=4, excluded=0.1)
    x[3, 7] = float("nan")
    x[5, 20] = float("inf")
    for k in (4, M + 10):
        args = (dy, x, exclude, k, counter, 0.3, 0.5, 1, 1)
        got = IMPLS["grow_topk"](*args)
        assert_same_topk(got, ref.grow_topk(*args))
    assert got[1][:4].isnan().all()


def test_grow_topk_tiny_buffer_needs_more_passes(monkeypatch):
    """A candidate buffer far below the boundary bucket forces finer radix digits (extra
    recomputation passes); the answer stays exact."""
    calls = []
    real = topk.launch_wgrad

    def counting(*a, **kw):
        calls.append(kw["pass_id"])
        return real(*a, **kw)

    monkeypatch.setattr(topk, "launch_wgrad", counting)
    dy, x, exclude, counter, n_valid = _inputs((1, 1), seed=5, excluded=0.0)
    for k, buffer in ((1, 0), (40, 2), (n_valid - 3, 1)):
        calls.clear()
        got = topk.grow_topk_impl(dy, x, exclude, k, None, 0.0, 1.0, 1, 1, buffer=buffer)
        assert_same_topk(got, ref.grow_topk(dy, x, exclude, k, None, 0.0, 1.0, 1, 1))
        assert calls[0] == 1 and calls[-1] == 3
    assert calls.count(2) >= 1, calls  # the last case needed at least one finer digit


def test_grow_topk_k_zero_all_excluded_and_too_large():
    dy, x, exclude, _, n_valid = _inputs((1, 1), seed=6)
    idx, scores = IMPLS["grow_topk"](dy, x, exclude, 0, None, 0.0, 1.0, 1, 1)
    assert idx.shape == (0,) and scores.shape == (0,) and scores.dtype == torch.float32
    with pytest.raises(ValueError, match="exceeds"):
        IMPLS["grow_topk"](dy, x, exclude, n_valid + 1, None, 0.0, 1.0, 1, 1)
    everything = torch.ones_like(exclude)
    with pytest.raises(ValueError, match="exceeds"):
        IMPLS["grow_topk"](dy, x, everything, 1, None, 0.0, 1.0, 1, 1)


def test_grow_topk_empty_batch_is_all_ties():
    _, _, exclude, counter, _ = _inputs((3, 5), seed=7)
    dy, x = ints(0, M), ints(0, K)
    args = (dy, x, exclude, 9, counter, 0.5, 1.0, 3, 5)
    assert_same_topk(IMPLS["grow_topk"](*args), ref.grow_topk(*args))


def test_grow_topk_guarded_views_half_inputs():
    """Strided views inside NaN-filled buffers, fp16 and bf16 inputs (small integers are exact
    in both)."""
    for dtype in (torch.float16, torch.bfloat16):
        dy0, x0, exclude, counter, _ = _inputs((1, 1), seed=8)
        dy0, x0 = dy0.to(dtype), x0.to(dtype)
        dy, _, _ = guarded(dy0, transpose=True)
        x, xbuf, xguard = guarded(x0)
        args = (exclude, 25, counter, 0.25, 1.0, 1, 1)
        got = IMPLS["grow_topk"](dy, x, *args)
        assert_same_topk(got, ref.grow_topk(dy0.float(), x0.float(), *args))
        assert xbuf[xguard].isnan().all()


class _NewStorages(TorchDispatchMode):
    """Records the byte size of every new storage an aten op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((t.untyped_storage().nbytes(), str(func)))
        return out


def test_no_tensor_of_the_dense_gradient_size():
    """grow_topk (and the fused op at 90% sparsity) allocate nothing of M*K bytes — not even a
    bool copy of the dense shape — while the reference materialises the fp32 gradient. (The
    candidate buffer is set small here: its default floor of 4096 entries is a constant.)"""
    m, k = 128, 96
    g = torch.Generator().manual_seed(9)
    dy, x = ints(B, m, gen=g), ints(B, k, gen=g)
    exclude = (torch.rand(m, k, generator=g) < 0.1).to(DEVICE)
    mask = block_mask(m, k, (1, 1), 0.9, seed=9)
    topo = topo_of(mask, (1, 1))
    budget = m * k  # bytes
    with _NewStorages() as rec_ref:
        ref.grow_topk(dy, x, exclude, 10, None, 0.0, 1.0, 1, 1)
    assert max(rec_ref.sizes)[0] >= 4 * m * k  # the tracker sees the dense gradient
    with _NewStorages() as rec:
        got = topk.grow_topk_impl(dy, x, exclude, 10, None, 0.0, 1.0, 1, 1, buffer=200)
        fused = topk.fused_weight_grad_impl(dy, x, mask, topo, 1, 1, exclude, 10, None, 0.0,
                                            1.0, buffer=200)
    assert max(rec.sizes)[0] < budget, sorted(rec.sizes)[-3:]
    assert_same_topk(got, ref.grow_topk(dy, x, exclude, 10, None, 0.0, 1.0, 1, 1))
    assert torch.equal(fused[0], ref.sddmm(dy, x, mask, topo, 1, 1))


@pytest.mark.parametrize("bs", TOPK_BLOCKS, ids=str)
def test_fused_weight_grad_exact(bs):
    dy, x, exclude, counter, n_valid = _inputs(bs, seed=10)
    mask = block_mask(M, K, bs, 0.6, seed=10)
    topo = topo_of(mask, bs)
    for k in (0, min(6, n_valid)):
        args = (dy, x, mask, topo, *bs, exclude, k, counter, 0.5, 1.0)
        vals, idx, scores = IMPLS["fused_weight_grad"](*args)
        rvals, ridx, rscores = ref.fused_weight_grad(*args)
        assert vals.dtype == x.dtype and torch.equal(vals, rvals)
        assert_same_topk((idx, scores), (ridx, rscores))
