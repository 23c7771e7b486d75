"""``MultiheadAttention``: ``nn.MultiheadAttention`` with its four projections as separate
``nn.Linear``-like modules, so that :func:`sparsekern.sparsify` can make each of them a
:class:`~sparsekern.nn.SparseLinear` (``nn.MultiheadAttention`` keeps ``q``/``k``/``v`` packed in
one ``in_proj_weight`` Parameter that its forward reads directly).

It computes what ``nn.MultiheadAttention`` computes (same arguments, masks, ``need_weights``,
``batch_first``, unbatched input, ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``) with
``scaled_dot_product_attention``, and never takes PyTorch's fused attention or
``TransformerEncoderLayer`` fast paths: those read ``in_proj_weight`` and ``linear1.weight``
as dense matrices, which a sparse layer's weight is not. It reports ``in_proj_bias = None`` and
``_qkv_same_embed_dim = False``, which is how ``nn.TransformerEncoderLayer`` and
``nn.TransformerEncoder`` decide not to take them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiheadAttention"]


def _additive(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """A bool mask (True: not allowed) or a float mask as a float mask added to the scores."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"MultiheadAttention: {name} must be a Tensor or None, got "
                        f"{type(mask).__name__}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"MultiheadAttention: {name} must be a bool or floating-point tensor, "
                        f"got dtype {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(nn.Module):
    """Multi-head attention as ``nn.MultiheadAttention`` (same constructor and ``forward``),
    with projections ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear``, or
    ``SparseLinear`` after :func:`sparsekern.sparsify`).

    :meth:`from_torch` loads an ``nn.MultiheadAttention`` (``in_proj_weight`` split by rows into
    ``q``/``k``/``v``); :meth:`to_torch` gives one back (``W ⊙ mask`` for sparse projections).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MultiheadAttention: {name} must be a positive int, got {v!r}")
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim={embed_dim} must be divisible by "
                             f"num_heads={num_heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
                not 0.0 <= dropout <= 1.0:
            raise ValueError(f"MultiheadAttention: dropout must be in [0, 1], got {dropout!r}")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        self._qkv_same_embed_dim = False  # PyTorch's fused paths are never taken (module doc)
        self.register_parameter("in_proj_weight", None)
        self.register_parameter("in_proj_bias", None)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """As ``nn.MultiheadAttention``: Xavier-uniform projections (of the packed
        ``[3E, E]`` matrix when the dimensions agree), zero biases, Xavier-normal
        ``bias_k``/``bias_v``."""
        e = self.embed_dim
        if self.kdim == e and self.vdim == e:
            packed = torch.empty(3 * e, e, device=self.q_proj.weight.device,
                                 dtype=self.q_proj.weight.dtype)
            nn.init.xavier_uniform_(packed)
            for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), packed.chunk(3)):
                proj.weight.copy_(part)
        else:
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                proj.bias.zero_()
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    # ----------------------------------------------------------------- conversion
    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """The equivalent module holding ``mha``'s weights. ``out_proj`` is ``mha.out_proj``
        itself and ``bias_k``/``bias_v`` are ``mha``'s Parameters; ``q``/``k``/``v`` get new
        Parameters (copies of the rows of ``in_proj_weight``, or of ``q/k/v_proj_weight``),
        keeping ``requires_grad``."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttention.from_torch: expected an nn.MultiheadAttention, "
                            f"got {type(mha).__name__}")
        w = mha.out_proj.weight
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.embed_dim, out.num_heads = mha.embed_dim, mha.num_heads
        out.kdim, out.vdim, out.head_dim = mha.kdim, mha.vdim, mha.head_dim
        out.dropout, out.batch_first = float(mha.dropout), bool(mha.batch_first)
        out.add_zero_attn = bool(mha.add_zero_attn)
        out._qkv_same_embed_dim = False
        out.register_parameter("in_proj_weight", None)
        out.register_parameter("in_proj_bias", None)
        e = mha.embed_dim
        if mha.in_proj_weight is not None:
            weights = list(mha.in_proj_weight.detach().chunk(3))
            grads = [mha.in_proj_weight.requires_grad] * 3
        else:
            ps = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            weights = [p.detach() for p in ps]
            grads = [p.requires_grad for p in ps]
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
        for name, wt, b, rg in zip(("q_proj", "k_proj", "v_proj"), weights, biases, grads):
            lin = nn.Linear(wt.shape[1], e, bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(wt)
                if b is not None:
                    lin.bias.copy_(b)
            lin.weight.requires_grad_(rg)
            if b is not None:
                lin.bias.requires_grad_(mha.in_proj_bias.requires_grad)
            setattr(out, name, lin)
        out.out_proj = mha.out_proj
        out.bias_k, out.bias_v = mha.bias_k, mha.bias_v
        out.train(mha.training)
        return out

    def to_torch(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` computing the same (sparse projections as
        ``W ⊙ mask``)."""
        dense = {}
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            m = getattr(self, name)
            dense[name] = m.to_dense() if callable(getattr(m, "to_dense", None)) else m
        biased = {dense[n].bias is not None for n in dense}
        if len(biased) != 1:
            raise ValueError("MultiheadAttention.to_torch: nn.MultiheadAttention needs all four "
                             "projections with a bias or all without")
        w = dense["out_proj"].weight
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=biased.pop(),
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
            kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first, device=w.device,
            dtype=w.dtype)
        q, k, v = (dense[n] for n in ("q_proj", "k_proj", "v_proj"))
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            else:
                mha.q_proj_weight.copy_(q.weight)
                mha.k_proj_weight.copy_(k.weight)
                mha.v_proj_weight.copy_(v.weight)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            mha.out_proj.weight.copy_(dense["out_proj"].weight)
            if mha.out_proj.bias is not None:
                mha.out_proj.bias.copy_(dense["out_proj"].bias)
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        return mha.train(self.training)

    # ----------------------------------------------------------------- forward
    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """As ``nn.MultiheadAttention.forward``: ``(attn_output, attn_weights)``, the weights
        (after dropout, averaged over heads when ``average_attn_weights``) only when
        ``need_weights``. Bool masks are True where attention is not allowed; float masks are
        added to the scores. ``is_causal`` is a hint that ``attn_mask`` is causal (required
        with it, as in PyTorch)."""
        who = "MultiheadAttention"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}")
            if t.dim() != query.dim() or t.dim() not in (2, 3):
                raise ValueError(f"{who}: query, key and value must all be 3-D (batched) or "
                                 f"2-D (unbatched), got shapes {tuple(query.shape)}, "
                                 f"{tuple(key.shape)}, {tuple(value.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError(f"{who}: is_causal=True needs attn_mask (it is a hint that "
                             f"attn_mask is the causal mask), as in nn.MultiheadAttention")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, e = query.shape
        if e != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"{who}: expected query/key/value feature sizes "
                             f"({self.embed_dim}, {self.kdim}, {self.vdim}), got "
                             f"({e}, {key.shape[-1]}, {value.shape[-1]})")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != n:
            raise ValueError(f"{who}: key and value must have the same batch and sequence "
                             f"sizes as each other (and the batch size of query), got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        dt = q.dtype
        mask = _additive(attn_mask, "attn_mask", dt)
        kpm = _additive(key_padding_mask, "key_padding_mask", dt)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(dt).expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.to(dt).expand(n, 1, e)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        h, d = self.num_heads, self.head_dim
        q = q.reshape(n, length, h, d).transpose(1, 2)
        k = k.reshape(n, -1, h, d).transpose(1, 2)
        v = v.reshape(n, -1, h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, d)], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        s = k.shape[2]
        if mask is not None:
            if mask.dim() == 2 and tuple(mask.shape) == (length, s):
                mask = mask.view(1, 1, length, s)
            elif mask.dim() == 3 and tuple(mask.shape) == (n * h, length, s):
                mask = mask.view(n, h, length, s)
            else:
                raise ValueError(f"{who}: attn_mask must have shape ({length}, {s}) or "
                                 f"({n * h}, {length}, {s}), got {tuple(attn_mask.shape)}")
        if kpm is not None:
            if tuple(kpm.shape) != (n, s):
                raise ValueError(f"{who}: key_padding_mask must have shape ({n}, {s}), got "
                                 f"{tuple(key_padding_mask.shape)}")
            kpm = kpm.view(n, 1, 1, s)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, e))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.batch_first:
            s += ", batch_first=True"
        return s
