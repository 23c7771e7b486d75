"""Triton forward, grad_input and SDDMM against the reference (interpreter on CPU)."""
import pytest
import torch

from _triton_cases import (B, BLOCKS, DEVICE, K, M, SPARSITIES, block_mask, guarded, ints,
                           kernels, topo_of, weight)
from sparsekern import reference as ref
from sparsekern.kernels import configs

IMPLS = kernels.IMPLS


@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("bs", BLOCKS, ids=str)
def test_forward_and_grad_input_exact(bs, sparsity, layout):
    mask = block_mask(M, K, bs, sparsity)
    topo = topo_of(mask, bs)
    w = weight(mask, bs, layout)
    x, dy = ints(B, K), ints(B, M)
    assert torch.equal(IMPLS["bsr_mm"](x, w, mask, topo, *bs), ref.bsr_mm(x, w, mask, topo, *bs))
    assert torch.equal(IMPLS["bsr_mm_t"](dy, w, mask, topo, *bs),
                       ref.bsr_mm_t(dy, w, mask, topo, *bs))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("bs", BLOCKS, ids=str)
def test_sddmm_exact(bs, sparsity):
    mask = block_mask(M, K, bs, sparsity)
    topo = topo_of(mask, bs)
    x, dy = ints(B, K), ints(B, M)
    got = IMPLS["sddmm"](dy, x, mask, topo, *bs)
    assert got.shape == (topo[1].numel(), *bs) and got.dtype == x.dtype
    assert torch.equal(got, ref.sddmm(dy, x, mask, topo, *bs))


@pytest.mark.parametrize("bs", [(16, 16), (3, 5)], ids=str)
def test_element_mask_inside_blocks(bs):
    """A mask that is not constant on its blocks: the kernels apply it inside each tile, and
    SDDMM stores zeros at the masked-off entries of active blocks."""
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(M, K, generator=g) < 0.3).to(DEVICE)
    topo = topo_of(mask, bs)
    w = weight(mask, bs, "dense")
    x, dy = ints(B, K), ints(B, M)
    assert torch.equal(IMPLS["bsr_mm"](x, w, mask, topo, *bs), ref.bsr_mm(x, w, mask, topo, *bs))
    assert torch.equal(IMPLS["bsr_mm_t"](dy, w, mask, topo, *bs),
                       ref.bsr_mm_t(dy, w, mask, topo, *bs))
    assert torch.equal(IMPLS["sddmm"](dy, x, mask, topo, *bs), ref.sddmm(dy, x, mask, topo, *bs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bs", [(1, 1), (16, 16)], ids=str)
def test_half_precision_within_twice_torch_error(dtype, bs):
    """fp16/bf16 in, fp32 accumulation: the error against an fp32 reference is at most twice
    PyTorch's own error computing the same product in that dtype."""
    g = torch.Generator().manual_seed(1)
    mask = block_mask(M, K, bs, 0.5)
    topo = topo_of(mask, bs)
    w = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    x = torch.randn(B, K, generator=g).to(DEVICE, dtype)
    dy = torch.randn(B, M, generator=g).to(DEVICE, dtype)
    weff = w * mask.to(dtype)
    cases = [
        (IMPLS["bsr_mm"](x, w, mask, topo, *bs), x.float() @ weff.float().t(), x @ weff.t()),
        (IMPLS["bsr_mm_t"](dy, w, mask, topo, *bs), dy.float() @ weff.float(), dy @ weff),
        (IMPLS["sddmm"](dy, x, mask, topo, *bs), ref.sddmm(dy.float(), x.float(), mask, topo, *bs),
         ref.gather_blocks((dy.t() @ x) * mask.to(dtype), topo[0], topo[1], *bs)),
    ]
    for got, want32, torch_lowp in cases:
        assert got.dtype == dtype
        err = (got.float() - want32).abs().max().item()
        torch_err = (torch_lowp.float() - want32).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_nan_guards_and_strided_views():
    """Inputs are non-contiguous views into NaN-filled buffers: a read outside a view would put
    NaN in the outputs; the buffers are left as they were."""
    bs = (1, 1)
    mask = block_mask(M, K, bs, 0.5)
    topo = topo_of(mask, bs)
    w0, x0, dy0 = weight(mask, bs, "dense"), ints(B, K), ints(B, M)
    x, xbuf, xg = guarded(x0, transpose=True)
    dy, dybuf, dyg = guarded(dy0)
    w, wbuf, wg = guarded(w0)
    before = [b.clone() for b in (xbuf, dybuf, wbuf)]
    y = IMPLS["bsr_mm"](x, w, mask, topo, *bs)
    dx = IMPLS["bsr_mm_t"](dy, w, mask, topo, *bs)
    vals = IMPLS["sddmm"](dy, x, mask, topo, *bs)
    assert torch.equal(y, ref.bsr_mm(x0, w0, mask, topo, *bs))
    assert torch.equal(dx, ref.bsr_mm_t(dy0, w0, mask, topo, *bs))
    assert torch.equal(vals, ref.sddmm(dy0, x0, mask, topo, *bs))
    for buf, old, guard in zip((xbuf, dybuf, wbuf), before, (xg, dyg, wg)):
        assert torch.equal(buf.isnan(), old.isnan()) and buf[guard].isnan().all()


def test_bsr_values_guarded():
    """``bsr`` values in the middle of a NaN-filled buffer (block path and tile path)."""
    for bs in [(16, 16), (3, 5)]:
        mask = block_mask(M, K, bs, 0.5)
        topo = topo_of(mask, bs)
        v0 = weight(mask, bs, "bsr")
        buf = torch.full((v0.shape[0] + 4, *bs), float("nan"), device=DEVICE)
        v = buf[2:2 + v0.shape[0]]
        v.copy_(v0)
        x, dy = ints(B, K), ints(B, M)
        assert torch.equal(IMPLS["bsr_mm"](x, v, mask, topo, *bs),
                           ref.bsr_mm(x, v0, mask, topo, *bs))
        assert torch.equal(IMPLS["bsr_mm_t"](dy, v, mask, topo, *bs),
                           ref.bsr_mm_t(dy, v0, mask, topo, *bs))


def test_empty_batch():
    bs = (16, 16)
    mask = block_mask(M, K, bs, 0.5)
    topo = topo_of(mask, bs)
    w = weight(mask, bs, "dense")
    x, dy = ints(0, K), ints(0, M)
    assert IMPLS["bsr_mm"](x, w, mask, topo, *bs).shape == (0, M)
    assert IMPLS["bsr_mm_t"](dy, w, mask, topo, *bs).shape == (0, K)
    assert torch.equal(IMPLS["sddmm"](dy, x, mask, topo, *bs), ref.sddmm(dy, x, mask, topo, *bs))


def test_fp64_and_huge_blocks_route_to_reference():
    """fp64 and block sizes whose tile would pass 128 elements are computed by the reference."""
    assert configs.tiling(200, 1) is None
    mask = block_mask(M, K, (1, 1), 0.5)
    topo = topo_of(mask, (1, 1))
    w, x = weight(mask, (1, 1), "dense").double(), ints(B, K).double()
    y = IMPLS["bsr_mm"](x, w, mask, topo, 1, 1)
    assert y.dtype == torch.float64 and torch.equal(y, ref.bsr_mm(x, w, mask, topo, 1, 1))
    mask = block_mask(201, 3, (200, 1), 0.5, seed=2)
    topo = topo_of(mask, (200, 1))
    w, x = weight(mask, (200, 1), "dense"), ints(B, 3)
    assert torch.equal(IMPLS["bsr_mm"](x, w, mask, topo, 200, 1),
                       ref.bsr_mm(x, w, mask, topo, 200, 1))


def test_bad_inputs_raise_with_names():
    mask = block_mask(M, K, (1, 1), 0.5)
    topo = topo_of(mask, (1, 1))
    w = weight(mask, (1, 1), "dense")
    with pytest.raises(RuntimeError, match="bsr_mm: input has 44 features"):
        IMPLS["bsr_mm"](ints(B, K - 1), w, mask, topo, 1, 1)
    with pytest.raises(ValueError, match="bsr values must have shape"):
        IMPLS["bsr_mm"](ints(B, K), torch.zeros(3, 2, 2, device=DEVICE), mask, topo, 1, 1)


@pytest.mark.parametrize("bs", [(16, 16), (3, 5)], ids=str)
def test_strided_and_all_true_masks(bs):
    """Masks that are views: a transposed copy's transpose, and the all-true expanded view that
    layout="bsr" modules pass on the CPU; both give the reference's result."""
    mask = block_mask(M, K, bs, 0.5)
    topo = topo_of(mask, bs)
    w = weight(mask, bs, "bsr")
    x, dy = ints(B, K), ints(B, M)
    strided = mask.t().contiguous().t()
    ones = torch.ones((), dtype=torch.bool, device=DEVICE).expand(M, K)
    for m in (strided, ones):
        assert torch.equal(IMPLS["bsr_mm"](x, w, m, topo, *bs), ref.bsr_mm(x, w, m, topo, *bs))
        assert torch.equal(IMPLS["bsr_mm_t"](dy, w, m, topo, *bs),
                           ref.bsr_mm_t(dy, w, m, topo, *bs))
        assert torch.equal(IMPLS["sddmm"](dy, x, m, topo, *bs), ref.sddmm(dy, x, m, topo, *bs))
