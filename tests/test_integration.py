"""sparsekern in real models and training loops: Transformers (attention projections sparsified,
PyTorch's fused inference paths not taken), one-shot magnitude pruning, ``to_sparse_bsr``,
exported state_dicts, and ``torch.compile(fullgraph=True)`` under every DST method.

Reference models are pure PyTorch: ``densify`` of a deep copy (``nn.MultiheadAttention`` and
``nn.Linear`` holding ``W ⊙ mask``), which in ``eval()`` under ``no_grad`` takes PyTorch's fused
fast path. Float64 on the reference backend: outputs agree to 1e-10 (summation order only)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import dst
from sparsekern.nn import MultiheadAttention
from sparsekern.sparsify import keep_count

TOL = dict(rtol=1e-10, atol=1e-10)


def encoder_layer(batch_first, d=16, heads=4, ff=32):
    return nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=batch_first,
                                      dtype=torch.float64)


def masks(n=3, length=6):
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    kpm = torch.zeros(n, length, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2, 5:] = True
    return [dict(), dict(src_mask=causal, is_causal=True), dict(src_key_padding_mask=kpm),
            dict(src_mask=causal.double() * -1e9, src_key_padding_mask=kpm.double() * -1e9)]


def two_d_weights(model):
    """(active, total) entries over every 2-D weight of the model, sparse or dense."""
    active = total = 0
    for m in model.modules():
        if isinstance(m, (sk.SparseLinear, sk.SparseConv2d)):
            active += int(m.mask.sum())
            total += m.mask.numel()
        else:
            for p in m.parameters(recurse=False):
                if p.dim() == 2:
                    active += p.numel()
                    total += p.numel()
    return active, total


# --------------------------------------------------------------------------- attention module
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias_kv,zero_attn,kdim", [(False, False, None), (True, True, 6)])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_attention_module_matches_nn_multiheadattention(batch_first, bias_kv, zero_attn, kdim,
                                                        need_weights, average):
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim,
                                vdim=kdim, batch_first=batch_first, dtype=torch.float64)
    ours = MultiheadAttention.from_torch(mha)
    n, length, s, kd = 3, 4, 5, kdim or 8
    q, k, v = (torch.randn(n, length, 8, dtype=torch.float64),
               torch.randn(n, s, kd, dtype=torch.float64), torch.randn(n, s, kd,
                                                                       dtype=torch.float64))
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    am = torch.rand(length, s) > 0.6
    am[:, 0] = False
    kpm = torch.rand(n, s) > 0.6
    kpm[:, 0] = False
    kw = dict(need_weights=need_weights, average_attn_weights=average)
    for extra in (dict(), dict(attn_mask=am, key_padding_mask=kpm),
                  dict(attn_mask=torch.randn(n * 2, length, s, dtype=torch.float64))):
        want, got = mha(q, k, v, **kw, **extra), ours(q, k, v, **kw, **extra)
        torch.testing.assert_close(got[0], want[0], **TOL)
        assert (got[1] is None) == (want[1] is None)
        if need_weights:
            torch.testing.assert_close(got[1], want[1], **TOL)
    one = (lambda t: t[0]) if batch_first else (lambda t: t[:, 0])
    want, got = mha(one(q), one(k), one(v), **kw), ours(one(q), one(k), one(v), **kw)
    torch.testing.assert_close(got[0], want[0], **TOL)
    back = ours.to_torch()
    torch.testing.assert_close(back(q, k, v, **kw)[0], mha(q, k, v, **kw)[0], **TOL)


def test_attention_module_rejects_bad_input_clearly():
    ours = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="is_causal=True needs attn_mask"):
        ours(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        ours(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be a bool or floating-point"):
        ours(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="embed_dim=8 must be divisible by num_heads=3"):
        MultiheadAttention(8, 3)


# --------------------------------------------------------------------------- encoder layers
@pytest.mark.parametrize("layout,block", [("dense", (1, 1)), ("bsr", (4, 4))])
@pytest.mark.parametrize("batch_first", [False, True])
def test_sparsified_encoder_layer_matches_dense_w_times_mask(layout, block, batch_first):
    torch.manual_seed(0)
    layer = encoder_layer(batch_first)
    sk.sparsify(layer, 0.6, distribution="uniform", layout=layout, block_size=block, seed=1)
    attn = layer.self_attn
    assert isinstance(attn, MultiheadAttention)
    assert all(isinstance(getattr(attn, p), sk.SparseLinear)
               for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    sparse = [m for m in layer.modules() if isinstance(m, sk.SparseLinear)]
    assert len(sparse) == 6  # q, k, v, out, linear1, linear2: no 2-D weight left dense
    area = block[0] * block[1]
    want = sum(keep_count(m.mask.numel() // area, 0.6) * area for m in sparse)
    assert two_d_weights(layer) == (want, sum(m.mask.numel() for m in sparse))
    ref = sk.densify(copy.deepcopy(layer))
    assert type(ref.self_attn) is nn.MultiheadAttention
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    for kw in masks():
        for mode in ("train", "eval"):
            layer.train(mode == "train")
            ref.train(mode == "train")
            if mode == "train":
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                ya, yb = layer(xa, **kw), ref(xb, **kw)
                g = torch.randn_like(ya)
                ya.backward(g)
                yb.backward(g)
                torch.testing.assert_close(xa.grad, xb.grad, **TOL)
            else:
                with torch.no_grad():  # the reference takes PyTorch's fused fast path
                    ya, yb = layer(x, **kw), ref(x, **kw)
            torch.testing.assert_close(ya, yb, **TOL, equal_nan=True)
    # weight gradients: the dense model's restricted to the mask
    g_sparse = layer.linear1.values_to_dense(layer.linear1.weight.grad)
    torch.testing.assert_close(g_sparse, ref.linear1.weight.grad * layer.linear1.mask, **TOL)


@pytest.mark.parametrize("layout,block", [("dense", (1, 1)), ("bsr", (4, 4))])
def test_fused_fast_path_not_taken_with_dense_attention_and_sparse_ffn(layout, block):
    """An excluded attention stays an nn.MultiheadAttention; the sparse FFN must still keep
    nn.TransformerEncoderLayer off its fused path (which would read dormant values, or fail on
    the 3-D bsr weight)."""
    torch.manual_seed(0)
    layer = encoder_layer(True)
    sk.sparsify(layer, 0.3, layout=layout, block_size=block, exclude=["self_attn"], seed=0)
    assert 0.2 < layer.linear1.density < 0.8 and 0.2 < layer.linear2.density < 0.8
    if layout == "dense":
        with torch.no_grad():  # dormant values (a DST drop leaves them) that would show if read
            layer.linear1.weight[~layer.linear1.mask] = 5.0
    assert type(layer.self_attn) is nn.MultiheadAttention
    assert isinstance(layer.linear1, sk.SparseLinear)
    ref = sk.densify(copy.deepcopy(layer)).eval()
    layer.eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), **TOL)


def test_encoder_stack_with_padding_mask_in_eval_matches_dense():
    """nn.TransformerEncoder's nested-tensor path is switched off for sparse stacks."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(encoder_layer(True), 2, enable_nested_tensor=True)
    assert enc.use_nested_tensor
    sk.sparsify(enc, 0.7, seed=0)
    assert not enc.use_nested_tensor
    ref = sk.densify(copy.deepcopy(enc)).eval()
    enc.eval()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    kpm = masks()[2]["src_key_padding_mask"]
    with torch.no_grad():
        got = enc(x, src_key_padding_mask=kpm)
        want = ref(x, src_key_padding_mask=kpm)
    keep = ~kpm  # padded positions are not defined by the nested path
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    with pytest.raises(TypeError, match="nested-tensor input is not supported"):
        enc.layers[0].linear1(torch.nested.nested_tensor([torch.randn(2, 16, dtype=torch.float64)],
                                                         layout=torch.jagged))


class SDPABlock(nn.Module):
    """A hand-written attention block: packed qkv projection, SDPA, output projection, MLP."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        n, length, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, length, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(n, length, d))
        return x + self.mlp(self.norm(x))


@pytest.mark.parametrize("layout,block", [("dense", (1, 1)), ("bsr", (4, 8))])
def test_hand_written_sdpa_block_matches_dense(layout, block):
    torch.manual_seed(0)
    block_model = SDPABlock().double()
    sk.sparsify(block_model, 0.8, layout=layout, block_size=block, seed=3)
    assert sum(isinstance(m, sk.SparseLinear) for m in block_model.modules()) == 4
    ref = sk.densify(copy.deepcopy(block_model))
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(block_model(x), ref(x), **TOL)


def test_dst_on_encoder_counts_attention_and_moves_optimizer_state():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(encoder_layer(True), 2, enable_nested_tensor=False)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    enc(x).square().mean().backward()
    opt.step()
    in_proj = enc.layers[0].self_attn.in_proj_weight
    avg = opt.state[in_proj]["exp_avg"].clone()
    m = dst.RigL(enc, opt, total_steps=20, delta_t=2, sparsity=0.7, distribution="uniform")
    attn = enc.layers[0].self_attn
    assert [ls.name for ls in m.layers][:4] == [f"layers.0.self_attn.{p}_proj"
                                                for p in ("q", "k", "v", "out")]
    for part, proj in zip(avg.chunk(3), (attn.q_proj, attn.k_proj, attn.v_proj)):
        assert torch.equal(opt.state[proj.weight]["exp_avg"], part)  # split by rows
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in enc.parameters())
    active, total = two_d_weights(enc)
    assert m.stats()["density"] == pytest.approx(active / total)
    assert abs(m.stats()["density"] - 0.3) < 0.01
    for _ in range(4):
        enc(x).square().mean().backward()
        m.step()
        opt.zero_grad()
    assert m.n_updates == 2 and m.stats()["n_grown"] > 0


def test_subclasses_warn_unless_excluded_and_errors_leave_the_model_intact():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(8, 8), Scaled(8, 8))
    with pytest.warns(UserWarning, match=r"\['1'\] are subclasses of nn.Linear"):
        sk.sparsify(copy.deepcopy(model), 0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sk.sparsify(model, 0.5, seed=0, exclude=["1"])
    assert type(out[1]) is Scaled and isinstance(out[0], sk.SparseLinear)

    a = nn.Linear(8, 8)
    tied = nn.Sequential(nn.MultiheadAttention(8, 2), a, nn.Linear(8, 8))
    tied[2].weight = a.weight
    attn = tied[0]
    with pytest.raises(ValueError, match="tied weights"):
        sk.sparsify(tied, 0.5, seed=0)
    assert tied[0] is attn  # the attention conversion was undone
    with pytest.raises(ValueError, match=r"exclude names \['0.w_proj'\]"):
        sk.sparsify(tied, 0.5, seed=0, exclude=["0.w_proj"])
    sk.sparsify(tied, 0.5, seed=0, exclude=["0.q_proj", "1", "2"])
    assert type(tied[0].q_proj) is nn.Linear and isinstance(tied[0].k_proj, sk.SparseLinear)


# --------------------------------------------------------------------------- torch.compile
def _train(method, layout, compiled, steps=12):
    """A small MLP trained by ``method`` for its ``total_steps`` (masks update every 2nd step
    before ``0.75·total_steps``); the masks, update count and the training-FLOPs ratio."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = dict(delta_t=2) if method is not dst.BiDST else dict(delta_t=2, search_space=0.2)
    m = method(model, opt, total_steps=steps, sparsity=0.5, layout=layout, seed=0,
               block_size=(1, 1) if layout == "dense" else (4, 4), **kw)
    # aot_eager: dynamo and AOTAutograd trace the same graphs as inductor, without codegen time
    fwd = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        F.cross_entropy(fwd(x), y).backward()
        m.step()
        opt.zero_grad()
    return [ls.module.mask.clone() for ls in m.layers], m.n_updates, m.stats()["flops_relative"]


@pytest.mark.parametrize("method,layout", [(dst.RigL, "dense"), (dst.SET, "bsr"),
                                           (dst.BiDST, "dense")])
def test_compiled_fullgraph_training_matches_eager_without_recompiling(method, layout):
    from torch._dynamo.utils import counters
    from torch._dynamo import eval_frame
    masks_e, n_e, flops_e = _train(method, layout, compiled=False)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        masks_c, n_c, flops_c = _train(method, layout, compiled=True)
    assert n_c == n_e == 4
    assert all(torch.equal(a, b) for a, b in zip(masks_c, masks_e))
    assert flops_c == flops_e
    # one graph, run on the steps that record nothing for the method (none for BiDST, whose
    # every backward feeds its mask scores)
    assert counters["stats"]["unique_graphs"] == (0 if method is dst.BiDST else 1)
    assert eval_frame._stance.stance == "default"  # restored after the forced-eager steps
    torch._dynamo.reset()


# --------------------------------------------------------------------------- export helpers
@pytest.mark.parametrize("layout,block", [("dense", (1, 1)), ("dense", (2, 4)), ("bsr", (4, 2))])
def test_to_sparse_bsr_equals_the_masked_weight(layout, block):
    lin = sk.SparseLinear(8, 12, sparsity=0.6, block_size=block, layout=layout)
    conv = sk.SparseConv2d(4, 8, 2, sparsity=0.5, block_size=block, layout=layout)
    for layer in (lin, conv):
        with torch.no_grad():
            if layout == "dense":
                layer.weight[~layer.mask] = 7.0  # dormant values stay out of the export
        bsr = layer.to_sparse_bsr()
        assert bsr.layout == torch.sparse_bsr and bsr.values().shape[1:] == block
        assert bsr.values().shape[0] == layer.topology.nnzb
        assert torch.equal(bsr.to_dense(), layer.dense_weight().detach().flatten(1))
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        sk.SparseLinear(7, 12, sparsity=0.5, block_size=(2, 2)).to_sparse_bsr()


def test_densified_state_dict_zeroes_dormant_values_and_loads_into_a_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    plain = copy.deepcopy(model)
    sk.sparsify(model, 0.6, seed=0)
    with torch.no_grad():
        model[0].weight[~model[0].mask] = 3.0  # a DST drop leaves dormant values behind
    assert (model.state_dict()["0.weight"] == 3.0).any()  # the checkpoint keeps them
    exported = sk.densify(copy.deepcopy(model)).state_dict()
    assert set(exported) == set(plain.state_dict())
    assert not (exported["0.weight"] == 3.0).any()
    plain.load_state_dict(exported)
    x = torch.randn(4, 6)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-6, atol=1e-6)


def test_linear_output_is_not_a_view():
    lin = sk.SparseLinear(4, 5, sparsity=0.5)
    for shape in ((3, 4), (2, 3, 4), (4,)):
        y = lin(torch.randn(shape))
        assert y._base is None and y.shape == (*shape[:-1], 5)


def test_sparsify_magnitude_init_prunes_the_smallest_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    before = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    sk.sparsify(model, 0.75, init="magnitude")
    for layer, w in zip((model[0], model[2]), before):
        kept, dropped = w[layer.mask].abs(), w[~layer.mask].abs()
        assert kept.numel() and dropped.numel() and kept.min() > dropped.max()
        assert torch.equal(layer.weight[layer.mask], w[layer.mask])
    with pytest.raises(ValueError, match="init must be one of"):
        sk.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, init="largest")


def test_forced_eager_stance_is_given_back_when_a_run_stops_early():
    import gc

    from torch._dynamo import eval_frame

    def method(cls, **kw):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return cls(model, opt, total_steps=10, sparsity=0.5, **kw)

    assert eval_frame._stance.stance == "default"
    a = method(dst.BiDST)  # its every step feeds the mask scores: eager from the start
    b = method(dst.RigL, delta_t=2)  # its first step measures FLOPs
    assert eval_frame._stance.stance == "force_eager"
    a.release_eager()
    assert eval_frame._stance.stance == "force_eager"  # b still needs it
    del b
    gc.collect()
    assert eval_frame._stance.stance == "default"
    del a
