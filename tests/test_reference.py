"""The reference ops (the meaning of every sparsekern op) against plain PyTorch and hand-worked
examples."""
import math

import pytest
import torch
import torch.nn.functional as F

from sparsekern import reference as ref
from sparsekern.topology import build_topology, expand_blocks

F64 = torch.float64


def topo_of(mask2d, bs):
    return build_topology(mask2d, bs).tensors


def test_gather_scatter_round_trip_ragged():
    g = torch.randn(7, 10, dtype=F64)
    mask = torch.rand(7, 10) < 0.4
    t = topo_of(mask, (3, 4))
    vals = ref.gather_blocks(g, t[0], t[1], 3, 4)
    assert vals.shape == (t[1].numel(), 3, 4)
    back = ref.scatter_blocks(vals, t[0], t[1], (7, 10))
    covered = expand_blocks(build_topology(mask, (3, 4)).block_mask, (3, 4), (7, 10))
    assert torch.equal(back, g * covered)
    # the padding of ragged edge blocks is zero
    rows, cols = ref.block_coords(t[0], t[1])
    edge = (rows == 2)
    assert not vals[edge][:, 1:].any()  # block row 2 has 1 real row of 3


@pytest.mark.parametrize("bs", [(1, 1), (3, 4)])
def test_linear_ops_dense_and_bsr(bs):
    m, k, b = 7, 10, 5
    w = torch.randn(m, k, dtype=F64)
    mask = torch.rand(m, k) < 0.5
    t = topo_of(mask, bs)
    vals = ref.gather_blocks(w, t[0], t[1], *bs)  # unmasked entries inside blocks: ignored
    x, dy = torch.randn(b, k, dtype=F64), torch.randn(b, m, dtype=F64)
    we = w * mask
    for wt in (w, vals):
        torch.testing.assert_close(ref.effective_weight(wt, mask, t[0], t[1], *bs), we)
        torch.testing.assert_close(ref.bsr_mm(x, wt, mask, t, *bs), x @ we.t())
        torch.testing.assert_close(ref.bsr_mm_t(dy, wt, mask, t, *bs), dy @ we)
    got = ref.sddmm(dy, x, mask, t, *bs)
    expect = ref.gather_blocks((dy.t() @ x) * mask, t[0], t[1], *bs)
    torch.testing.assert_close(got, expect)


def test_low_precision_accumulates_in_fp32():
    assert ref.acc_dtype(torch.bfloat16) == torch.float32
    assert ref.acc_dtype(torch.float64) == torch.float64
    x = torch.randn(4, 300).bfloat16()
    w = torch.randn(6, 300).bfloat16()
    mask = torch.ones(6, 300, dtype=torch.bool)
    y = ref.bsr_mm(x, w, mask, topo_of(mask, (1, 1)), 1, 1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x.float() @ w.float().t()).bfloat16(), atol=0, rtol=0)


def test_stable_topk_ties_nan_and_negative_zero():
    s = torch.tensor([1.0, 3.0, math.nan, 3.0, -0.0, 0.0, 2.0, math.nan])
    idx, vals = ref.stable_topk(s, 6)
    assert idx.tolist() == [2, 7, 1, 3, 6, 0]
    assert vals[2:].tolist() == [3.0, 3.0, 2.0, 1.0] and vals[:2].isnan().all()
    idx, vals = ref.stable_topk(s, 8)
    assert idx.tolist()[-2:] == [4, 5]  # -0 and +0 tie: lower index first
    assert not torch.signbit(vals[-2])  # -0 is folded to +0


def test_growth_scores_blocks_and_bonus():
    g = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0], [7.0, 8.0, 9.0]], dtype=F64)
    s = ref.growth_scores(g, None, 0.0, 1.0, 2, 2)
    assert s.tolist() == [[3.0, 4.5], [7.5, 9.0]]  # ragged blocks averaged by true size
    counter = torch.tensor([[0, 1], [3, 0]])
    s = ref.growth_scores(g, counter, 1.0, 1.0, 2, 2)
    assert s.tolist() == [[4.0, 5.0], [7.75, 10.0]]


def test_topk_from_grad_exclude_and_k_too_large():
    g = torch.tensor([[5.0, -5.0], [1.0, 7.0]], dtype=F64)
    exclude = torch.tensor([[False, False], [False, True]])
    idx, vals = ref.topk_from_grad(g, exclude, 2, None, 0.0, 1.0, 1, 1)
    assert idx.tolist() == [0, 1] and vals.tolist() == [5.0, 5.0]
    with pytest.raises(ValueError, match="k=4 exceeds the 3 entries"):
        ref.topk_from_grad(g, exclude, 4, None, 0.0, 1.0, 1, 1)


def test_grow_topk_and_fused_weight_grad_agree():
    x = torch.randint(-3, 4, (6, 9)).to(F64)
    dy = torch.randint(-3, 4, (6, 5)).to(F64)
    mask = torch.rand(5, 9) < 0.5
    t = topo_of(mask, (2, 3))
    bexcl = torch.tensor([[True, False, True], [False, False, True], [True, False, False]])
    counter = torch.randint(0, 3, bexcl.shape)
    idx, sc = ref.grow_topk(dy, x, bexcl, 2, counter, 0.5, 1.0, 2, 3)
    vals, idx2, sc2 = ref.fused_weight_grad(dy, x, mask, t, 2, 3, bexcl, 2, counter, 0.5, 1.0)
    assert torch.equal(idx, idx2) and torch.equal(sc, sc2)
    assert torch.equal(vals, ref.sddmm(dy, x, mask, t, 2, 3))
    g = dy.t() @ x
    s = ref.growth_scores(g, counter, 0.5, 1.0, 2, 3).flatten()
    allowed = [i for i in range(s.numel()) if not bexcl.flatten()[i]]
    expect = sorted(allowed, key=lambda i: (-s[i].item(), i))[:2]
    assert idx.tolist() == expect


@pytest.mark.parametrize("phi", ref.PHI_CHOICES)
def test_psi_grad(phi):
    g = torch.tensor([[2.0, -1.0], [3.0, 4.0]], dtype=F64)
    w = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=F64)
    active = torch.tensor([[True, False], [False, True]])
    cand = torch.tensor([[True, True], [False, True]])
    reg = {"sq_active": [[4.0, 0.0], [0.0, 16.0]], "abs": [[2.0, 1.0], [3.0, 4.0]],
           "signed": [[2.0, -1.0], [3.0, 4.0]]}[phi]
    gw = [[2.0, -2.0], [-3.0, 2.0]]
    expect = [[gw[i][j] - 0.5 * reg[i][j] if cand[i, j] else 0.0 for j in range(2)]
              for i in range(2)]
    assert ref.psi_grad(g, w, active, cand, 0.5, phi).tolist() == expect


def test_psi_grad_bad_phi():
    z = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="phi must be one of"):
        ref.psi_grad(z, z, z.bool(), z.bool(), 0.1, "square")


@pytest.mark.parametrize("bs,layout", [((1, 1), "dense"), ((2, 4), "bsr")])
def test_conv_ops_match_autograd(bs, layout):
    conv = ([2, 1], [1, 2], [1, 2], 2)
    w = torch.randn(6, 2, 3, 2, dtype=F64)
    mask = torch.rand(6, 2, 3, 2) < 0.5
    t = topo_of(mask.flatten(1), bs)
    wt = w if layout == "dense" else ref.gather_blocks(w.flatten(1), t[0], t[1], *bs)
    x = torch.randn(2, 4, 7, 6, dtype=F64, requires_grad=True)
    we = (w * mask).requires_grad_(True)
    y_ref = F.conv2d(x, we, None, *conv)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y = ref.conv2d(x.detach(), wt, mask, t, *bs, *conv)
    torch.testing.assert_close(y, y_ref.detach())
    dx = ref.conv2d_grad_input(dy, wt, mask, t, *bs, [7, 6], *conv)
    torch.testing.assert_close(dx, x.grad)
    g = ref.conv_dense_grad(dy, x.detach(), mask.shape, *conv)
    torch.testing.assert_close(g, we.grad.flatten(1))
    vals = ref.conv2d_sddmm(dy, x.detach(), mask, t, *bs, *conv)
    torch.testing.assert_close(vals, ref.gather_blocks(g * mask.flatten(1), t[0], t[1], *bs))
    excl = (torch.arange(9).view(3, 3) % 3 == 0) if bs != (1, 1) else mask.flatten(1)
    idx, sc = ref.conv2d_grow_topk(dy, x.detach(), excl, 2, None, 0.0, 1.0, *bs,
                                   list(mask.shape), *conv)
    assert torch.equal(idx, ref.topk_from_grad(g, excl, 2, None, 0.0, 1.0, *bs)[0])
    v2, i2, s2 = ref.conv2d_fused_weight_grad(dy, x.detach(), mask, t, *bs, excl, 2, None, 0.0,
                                              1.0, *conv)
    assert torch.equal(v2, vals) and torch.equal(i2, idx) and torch.equal(s2, sc)


def test_dormant_nan_inf_never_reach_a_result():
    """Dormant entries are selected away, not multiplied: NaN/inf stored off the mask (or
    outside the topology's blocks) leave every op's result finite."""
    m, k, b = 7, 10, 5
    mask = torch.rand(m, k, generator=torch.Generator().manual_seed(1)) < 0.5
    w = torch.randn(m, k, dtype=F64)
    poisoned = w.masked_fill(~mask, float("nan"))
    poisoned[0, ~mask[0]] = float("inf")
    x, dy = torch.randn(b, k, dtype=F64), torch.randn(b, m, dtype=F64)
    for bs in [(1, 1), (3, 4)]:
        t = topo_of(mask, bs)
        for wt in (poisoned, ref.gather_blocks(poisoned, t[0], t[1], *bs)):
            torch.testing.assert_close(ref.bsr_mm(x, wt, mask, t, *bs), x @ (w * mask).t())
            torch.testing.assert_close(ref.bsr_mm_t(dy, wt, mask, t, *bs), dy @ (w * mask))
        img = torch.randn(2, k // 2, 4, 3, dtype=F64)
        args = ([1, 1], [0, 0], [1, 1], 1)
        got = ref.conv2d(img, poisoned.view(m, k // 2, 1, 2), mask.view(m, k // 2, 1, 2), t,
                         *bs, *args)
        want = torch.nn.functional.conv2d(img, (w * mask).view(m, k // 2, 1, 2))
        torch.testing.assert_close(got, want)


def test_activation_nan_propagates_as_in_the_dense_op():
    m, k, b = 6, 8, 4
    mask = torch.rand(m, k, generator=torch.Generator().manual_seed(2)) < 0.3
    w = torch.randn(m, k, dtype=F64)
    x = torch.randn(b, k, dtype=F64)
    x[1, 3] = float("nan")
    t = topo_of(mask, (1, 1))
    got = ref.bsr_mm(x, w, mask, t, 1, 1)
    want = x @ (w * mask).t()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[1]).all()
    torch.testing.assert_close(got[[0, 2, 3]], want[[0, 2, 3]])


def test_topology_restricts_the_mask():
    """Entries of ``mask`` outside the topology's blocks are structurally zero (the kernels
    never read them), so every backend agrees on a topology that does not cover the mask."""
    m, k = 6, 8
    w = torch.randn(m, k, dtype=F64)
    mask = torch.ones(m, k, dtype=torch.bool)
    part = torch.zeros(m, k, dtype=torch.bool)
    part[:3, :4] = True
    t = topo_of(part, (3, 4))
    x = torch.randn(2, k, dtype=F64)
    torch.testing.assert_close(ref.bsr_mm(x, w, mask, t, 3, 4), x @ (w * part).t())


@pytest.mark.parametrize("bad", ["neg_col", "big_col", "row_ptr", "k"])
def test_reference_rejects_bad_topology_and_k(bad):
    m, k = 6, 8
    w = torch.randn(m, k, dtype=F64)
    mask = torch.rand(m, k, generator=torch.Generator().manual_seed(3)) < 0.5
    t = [x.clone() for x in topo_of(mask, (1, 1))]
    x, dy = torch.randn(2, k, dtype=F64), torch.randn(2, m, dtype=F64)
    if bad == "k":
        with pytest.raises(ValueError, match="k must be a non-negative int"):
            ref.grow_topk(dy, x, mask, -1, None, 0.0, 1.0, 1, 1)
        return
    if bad == "neg_col":
        t[1][0] = -1
    elif bad == "big_col":
        t[1][-1] = k
    else:
        t[0][1] = t[0][2] + 1
    with pytest.raises(ValueError, match="topo"):
        ref.bsr_mm(x, w, mask, t, 1, 1)
