"""Triton implicit-GEMM convolutions (forward, grad_input, SDDMM, growth top-k, fused) against the
reference, over every conv argument."""
import pytest
import torch

from _triton_cases import (DEVICE, assert_same_topk, block_mask, guarded, ints, kernels,
                           score_grid, topo_of)
from sparsekern import reference as ref

IMPLS = kernels.IMPLS

# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups)
CASES = {
    "3x7_s2_d2_g4": (1, 8, 8, 7, 15, (3, 7), (2, 2), (1, 2), (2, 2), 4),
    "3x3_s1_p1": (2, 6, 20, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "3x3_s21_d12_g2": (1, 4, 24, 8, 9, (3, 3), (2, 1), (0, 1), (1, 2), 2),
}


def _problem(case, bs, sparsity=0.5, seed=0):
    n, cin, cout, h, w, (kh, kw), st, pd, dl, g = CASES[case]
    m, k = cout, cin // g * kh * kw
    mask2d = block_mask(m, k, bs, sparsity, seed=seed)
    topo = topo_of(mask2d, bs)
    mask = mask2d.view(cout, cin // g, kh, kw)
    x = ints(n, cin, h, w)
    conv = (list(st), list(pd), list(dl), g)
    return x, mask, topo, conv


@pytest.mark.parametrize("bs", [(1, 1), (16, 16), (2, 3)], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_conv_forward_and_grad_input_exact(case, bs):
    x, mask, topo, conv = _problem(case, bs)
    for layout in ("dense", "bsr"):
        w = ints(*mask.shape)
        if layout == "bsr":
            w = ref.gather_blocks(w.flatten(1), topo[0], topo[1], *bs).contiguous()
        y = IMPLS["conv2d"](x, w, mask, topo, *bs, *conv)
        want = ref.conv2d(x, w, mask, topo, *bs, *conv)
        assert torch.equal(y, want), layout
        dy = ints(*want.shape)
        hw = list(x.shape[2:])
        assert torch.equal(IMPLS["conv2d_grad_input"](dy, w, mask, topo, *bs, hw, *conv),
                           ref.conv2d_grad_input(dy, w, mask, topo, *bs, hw, *conv)), layout


@pytest.mark.parametrize("bs", [(1, 1), (16, 16), (2, 3)], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_conv_weight_side_exact(case, bs):
    x, mask, topo, conv = _problem(case, bs, seed=1)
    y = ref.conv2d(x, ints(*mask.shape), mask, topo, *bs, *conv)
    dy = ints(*y.shape)
    assert torch.equal(IMPLS["conv2d_sddmm"](dy, x, mask, topo, *bs, *conv),
                       ref.conv2d_sddmm(dy, x, mask, topo, *bs, *conv))
    grid = score_grid(mask.shape[0], mask[0].numel(), bs)
    g = torch.Generator().manual_seed(2)
    exclude = (torch.rand(grid, generator=g) < 0.3).to(DEVICE)
    counter = torch.randint(0, 3, grid, generator=g).to(DEVICE)
    k = min(7, int((~exclude).sum()))
    args = (dy, x, exclude, k, counter, 0.5, 1.0, *bs, list(mask.shape), *conv)
    assert_same_topk(IMPLS["conv2d_grow_topk"](*args), ref.conv2d_grow_topk(*args))
    fargs = (dy, x, mask, topo, *bs, exclude, k, None, 0.0, 1.0, *conv)
    vals, idx, scores = IMPLS["conv2d_fused_weight_grad"](*fargs)
    rvals, ridx, rscores = ref.conv2d_fused_weight_grad(*fargs)
    assert torch.equal(vals, rvals)
    assert_same_topk((idx, scores), (ridx, rscores))


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_conv_sparsity_ends(sparsity):
    x, mask, topo, conv = _problem("3x3_s1_p1", (1, 1), sparsity)
    w = ints(*mask.shape)
    want = ref.conv2d(x, w, mask, topo, 1, 1, *conv)
    assert torch.equal(IMPLS["conv2d"](x, w, mask, topo, 1, 1, *conv), want)
    dy = ints(*want.shape)
    hw = list(x.shape[2:])
    assert torch.equal(IMPLS["conv2d_grad_input"](dy, w, mask, topo, 1, 1, hw, *conv),
                       ref.conv2d_grad_input(dy, w, mask, topo, 1, 1, hw, *conv))
    assert torch.equal(IMPLS["conv2d_sddmm"](dy, x, mask, topo, 1, 1, *conv),
                       ref.conv2d_sddmm(dy, x, mask, topo, 1, 1, *conv))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_half_precision_within_twice_torch_error(dtype):
    x0, mask, topo, conv = _problem("3x3_s21_d12_g2", (1, 1))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(x0.shape, generator=g).to(DEVICE, dtype)
    w = torch.randn(mask.shape, generator=g).to(DEVICE, dtype)
    weff = w * mask.to(dtype)
    st, pd, dl, groups = conv
    got = IMPLS["conv2d"](x, w, mask, topo, 1, 1, *conv)
    want = torch.nn.functional.conv2d(x.float(), weff.float(), None, st, pd, dl, groups)
    torch_lowp = torch.nn.functional.conv2d(x, weff, None, st, pd, dl, groups)
    err = (got.float() - want).abs().max().item()
    torch_err = (torch_lowp.float() - want).abs().max().item()
    assert got.dtype == dtype and err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_conv_guarded_strided_input():
    """``x`` as a strided view (channels-last storage) inside a NaN-filled buffer."""
    x0, mask, topo, conv = _problem("3x7_s2_d2_g4", (1, 1))
    n, c, h, w = x0.shape
    flat, buf, guard = guarded(x0.permute(0, 2, 3, 1).reshape(n * h * w, c))
    x = flat.view(n, h, w, c).permute(0, 3, 1, 2)
    wt = ints(*mask.shape)
    assert torch.equal(IMPLS["conv2d"](x, wt, mask, topo, 1, 1, *conv),
                       ref.conv2d(x0, wt, mask, topo, 1, 1, *conv))
    assert buf[guard].isnan().all()
