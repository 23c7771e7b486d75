"""The one specification of every sparsekern op: name, schema, fake (shape/dtype) function,
activation argument and autograd.

Everything else is derived from :data:`SPECS`: the public ``sparsekern::<op>`` custom ops
(:mod:`sparsekern.ops`), the schemas of the C++/CUDA kernel ops ``sparsekern::_<op>`` (the
extension only registers implementations), the Triton provider's opaque
``sparsekern_triton::<op>`` ops, and the op-name lists. A backend provider only maps op names
to implementations. Adding an op: an entry here, its meaning in :mod:`sparsekern.reference`,
and an implementation in each backend that runs it.

Schemas use ``SymInt`` for the Python custom ops (``torch.compile`` may trace sizes
symbolically); the C++ kernel ops take the same schema with ``int`` (:attr:`OpSpec.kernel_schema`).
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_true

from ._util import acc_dtype, conv_out_hw
from .topology import TopoTensors, as_topo, block_coords, scatter_blocks


@dataclass(frozen=True)
class OpSpec:
    """One op. ``act`` names the activation argument: its device picks the backend, and with
    ``nonfinite_rows`` its rows (images) holding NaN/inf are recomputed by the reference (the
    sparse kernels skip products with dormant weights; the op's meaning is the dense op's,
    NaN·0 = NaN). ``backward``/``setup_context`` are the autograd formula, where it has one."""

    name: str
    family: str  # "linear" or "conv"
    schema: str  # "(args) -> returns", torch.library syntax
    fake: Callable
    doc: str
    act: str
    nonfinite_rows: bool = False
    backward: Optional[Callable] = None
    setup_context: Optional[Callable] = None

    @functools.cached_property
    def arg_names(self) -> tuple[str, ...]:
        """The argument names, in schema order."""
        parsed = torch._C.parse_schema(f"sparsekern::{self.name}{self.schema}")
        return tuple(a.name for a in parsed.arguments)

    def index(self, arg: str) -> int:
        """Position of argument ``arg``."""
        return self.arg_names.index(arg)

    def arg(self, args: tuple, name: str):
        """Argument ``name`` of a positional call ``args``."""
        return args[self.index(name)]

    @property
    def kernel_schema(self) -> str:
        """The schema of the C++/CUDA kernel op ``sparsekern::_<name>``."""
        return self.schema.replace("SymInt", "int")

    def with_named_topo(self, fn: Callable) -> Callable:
        """``fn`` (a fake) called with its ``topo`` argument as :class:`TopoTensors`: an op's
        functions receive a list. Implementations unpack it by name instead (no per-call
        conversion on the hot path)."""
        if "topo" not in self.arg_names:
            return fn
        at = self.index("topo")

        @functools.wraps(fn)
        def wrapped(*args):
            return fn(*args[:at], as_topo(args[at]), *args[at + 1:])

        return wrapped


def custom_op(spec: OpSpec, qualname: str, fn: Callable):
    """The opaque ``torch.library`` custom op ``qualname`` running ``fn``, with ``spec``'s
    schema and fake."""
    op = torch.library.custom_op(qualname, fn, mutates_args=(), schema=spec.schema)
    op.register_fake(spec.with_named_topo(spec.fake))
    return op


# --------------------------------------------------------------------------- fakes
def _topk_out(x: Tensor, k):
    return x.new_empty(k, dtype=torch.int64), x.new_empty(k, dtype=acc_dtype(x.dtype))


def _blocks_out(x: Tensor, topo: TopoTensors, br, bc) -> Tensor:
    torch._check(isinstance(topo, TopoTensors),
                 lambda: f"topo must hold the 5 tensors {TopoTensors._fields}, got {len(topo)}")
    return x.new_empty(topo.col_idx.shape[0], br, bc)


def _bsr_mm_fake(x, w, mask, topo, br, bc):
    torch._check(x.shape[1] == mask.shape[1], lambda: "bsr_mm: x and mask disagree on K")
    return x.new_empty(x.shape[0], mask.shape[0])


def _bsr_mm_t_fake(dy, w, mask, topo, br, bc):
    torch._check(dy.shape[1] == mask.shape[0], lambda: "bsr_mm_t: dy and mask disagree on M")
    return dy.new_empty(dy.shape[0], mask.shape[1])


def _sddmm_fake(dy, x, mask, topo, br, bc):
    return _blocks_out(x, topo, br, bc)


def _grow_topk_fake(dy, x, exclude, k, counter, bonus_scale, eps, br, bc):
    return _topk_out(x, k)


def _fused_weight_grad_fake(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps):
    return (_blocks_out(x, topo, br, bc), *_topk_out(x, k))


def _conv2d_fake(x, w, mask, topo, br, bc, stride, padding, dilation, groups):
    oh, ow = conv_out_hw(x.shape[2:], mask.shape[2:], stride, padding, dilation)
    return x.new_empty(x.shape[0], mask.shape[0], oh, ow)


def _conv2d_grad_input_fake(dy, w, mask, topo, br, bc, input_hw, stride, padding, dilation,
                            groups):
    return dy.new_empty(dy.shape[0], mask.shape[1] * groups, *input_hw)


def _conv2d_sddmm_fake(dy, x, mask, topo, br, bc, stride, padding, dilation, groups):
    return _blocks_out(x, topo, br, bc)


def _conv2d_grow_topk_fake(dy, x, exclude, k, counter, bonus_scale, eps, br, bc, weight_shape,
                           stride, padding, dilation, groups):
    return _topk_out(x, k)


def _conv2d_fused_weight_grad_fake(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale,
                                   eps, stride, padding, dilation, groups):
    return (_blocks_out(x, topo, br, bc), *_topk_out(x, k))


# --------------------------------------------------------------------------- autograd
_SCATTER_INDEX: dict[int, tuple] = {}


def _scatter_index(topo: TopoTensors, br: int, bc: int, m: int, k: int) -> tuple[Tensor, Tensor]:
    """``(src, dst)``: positions in the flattened ``[nnzb, br, bc]`` values and in the flattened
    ``[M, K]`` matrix of every block entry inside the matrix. Cached per topology (keyed by its
    ``col_idx`` tensor, which a mask change replaces; dropped with it), so a backward does not
    rebuild it."""
    key = topo.col_idx
    tag = (key._version, topo.row_ptr._version, br, bc, m, k)
    hit = _SCATTER_INDEX.get(id(key))
    if hit is not None and hit[0]() is key and hit[1] == tag:
        return hit[2], hit[3]
    rows, cols = block_coords(topo.row_ptr, topo.col_idx)  # O(nnzb·br·bc), no [M, K]
    if (br, bc) == (1, 1):  # element masks: every entry is inside, in slot order
        src, dst = torch.arange(rows.numel(), device=key.device), rows.mul_(k).add_(cols)
    else:
        r = (rows * br)[:, None, None] + torch.arange(br, device=key.device)[None, :, None]
        c = (cols * bc)[:, None, None] + torch.arange(bc, device=key.device)[None, None, :]
        src = ((r < m) & (c < k)).flatten().nonzero().flatten()
        dst = (r * k + c).flatten()[src]
    ident = id(key)
    alive = weakref.ref(key, lambda _r: _SCATTER_INDEX.pop(ident, None))
    _SCATTER_INDEX[ident] = (alive, tag, src, dst)
    return src, dst


def weight_grad_from_blocks(values: Tensor, w: Tensor, topo, shape) -> Tensor:
    """The weight's gradient from compact block values: the values themselves for the ``bsr``
    layout, scattered into the weight's dense shape (zero off the pattern) otherwise."""
    if w.dim() == 3:
        return values.to(w.dtype)
    topo = as_topo(topo)
    m, k = shape[0], math.prod(shape[1:])
    if torch.compiler.is_compiling():
        dense = scatter_blocks(values, topo.row_ptr, topo.col_idx, (m, k))
        return dense.view(shape).to(w.dtype)
    src, dst = _scatter_index(topo, values.shape[1], values.shape[2], m, k)
    vals = values.flatten()
    if guard_or_true(src.numel() != vals.numel()):  # a proper subset: ragged edge blocks
        vals = vals[src]
    out = torch.zeros(m * k, dtype=w.dtype, device=w.device)
    out[dst] = vals.to(w.dtype)
    return out.view(shape)


def _save_operands(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], *inputs[3])
    ctx.args = inputs[4:]


def _backward_ops(ctx):
    """The ops a backward calls: the custom ops ``torch.ops.sparsekern``, or, for the eager fast
    path of :mod:`sparsekern.ops`, the same ops without the custom-op layers (``ctx.ops``)."""
    return getattr(ctx, "ops", None) or torch.ops.sparsekern


def _bsr_mm_backward(ctx, dy):
    x, w, mask, *topo = ctx.saved_tensors
    br, bc = ctx.args
    sk = _backward_ops(ctx)
    dx = sk.bsr_mm_t(dy, w, mask, topo, br, bc) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        dw = weight_grad_from_blocks(sk.sddmm(dy, x, mask, topo, br, bc), w, topo, w.shape)
    return dx, dw, None, [None] * len(topo), None, None


def _conv2d_backward(ctx, dy):
    x, w, mask, *topo = ctx.saved_tensors
    br, bc, stride, padding, dilation, groups = ctx.args
    sk = _backward_ops(ctx)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = sk.conv2d_grad_input(dy, w, mask, topo, br, bc, list(x.shape[2:]), stride, padding,
                                  dilation, groups)
    if ctx.needs_input_grad[1]:
        vals = sk.conv2d_sddmm(dy, x, mask, topo, br, bc, stride, padding, dilation, groups)
        dw = weight_grad_from_blocks(vals, w, topo, w.shape)
    return dx, dw, None, [None] * len(topo), None, None, None, None, None, None


# --------------------------------------------------------------------------- the specs
_TOPK = "Tensor exclude, SymInt k, Tensor? counter, float bonus_scale, float eps"
_CONV = "SymInt[] stride, SymInt[] padding, SymInt[] dilation, SymInt groups"
_OP = "Tensor mask, Tensor[] topo, SymInt br, SymInt bc"

SPECS: tuple[OpSpec, ...] = (
    OpSpec("bsr_mm", "linear", f"(Tensor x, Tensor w, {_OP}) -> Tensor", _bsr_mm_fake,
           "``x [B, K] @ (W ⊙ mask)ᵀ`` -> ``[B, M]``; ``w`` is ``[M, K]`` or "
           "``[nnzb, br, bc]``.",
           act="x", nonfinite_rows=True, backward=_bsr_mm_backward,
           setup_context=_save_operands),
    OpSpec("bsr_mm_t", "linear", f"(Tensor dy, Tensor w, {_OP}) -> Tensor", _bsr_mm_t_fake,
           "``dy [B, M] @ (W ⊙ mask)`` -> ``[B, K]``.", act="dy", nonfinite_rows=True),
    OpSpec("sddmm", "linear", f"(Tensor dy, Tensor x, {_OP}) -> Tensor", _sddmm_fake,
           "``(dyᵀ x) ⊙ mask`` on the topology's blocks -> ``[nnzb, br, bc]``.", act="x"),
    OpSpec("grow_topk", "linear",
           f"(Tensor dy, Tensor x, {_TOPK}, SymInt br, SymInt bc) -> (Tensor, Tensor)",
           _grow_topk_fake,
           "Exact top-``k`` of ``|dyᵀx|`` (block mean when ``(br, bc) != (1, 1)``) plus "
           "``bonus_scale / (counter + eps)`` over entries where ``exclude`` is False.\n"
           "Returns ``(flat_indices int64 [k], scores [k])``; ties to the lower index, NaN "
           "highest.", act="x"),
    OpSpec("fused_weight_grad", "linear",
           f"(Tensor dy, Tensor x, {_OP}, {_TOPK}) -> (Tensor, Tensor, Tensor)",
           _fused_weight_grad_fake,
           "``sddmm`` and ``grow_topk`` from one pass: ``(values, flat_indices, scores)``.",
           act="x"),
    OpSpec("conv2d", "conv", f"(Tensor x, Tensor w, {_OP}, {_CONV}) -> Tensor", _conv2d_fake,
           "Convolution of ``x [N, C_in, H, W]`` with ``W ⊙ mask`` (mask "
           "``[C_out, C_in/g, kh, kw]``).", act="x", nonfinite_rows=True,
           backward=_conv2d_backward, setup_context=_save_operands),
    OpSpec("conv2d_grad_input", "conv",
           f"(Tensor dy, Tensor w, {_OP}, SymInt[] input_hw, {_CONV}) -> Tensor",
           _conv2d_grad_input_fake,
           "Gradient of :func:`conv2d`'s input -> ``[N, C_in, *input_hw]``.", act="dy",
           nonfinite_rows=True),
    OpSpec("conv2d_sddmm", "conv", f"(Tensor dy, Tensor x, {_OP}, {_CONV}) -> Tensor",
           _conv2d_sddmm_fake,
           ":func:`conv2d`'s weight gradient on the topology's blocks -> ``[nnzb, br, bc]``.",
           act="x"),
    OpSpec("conv2d_grow_topk", "conv",
           f"(Tensor dy, Tensor x, {_TOPK}, SymInt br, SymInt bc, SymInt[] weight_shape, "
           f"{_CONV}) -> (Tensor, Tensor)", _conv2d_grow_topk_fake,
           ":func:`grow_topk` for :func:`conv2d`'s weight gradient on its 2-D view.", act="x"),
    OpSpec("conv2d_fused_weight_grad", "conv",
           f"(Tensor dy, Tensor x, {_OP}, {_TOPK}, {_CONV}) -> (Tensor, Tensor, Tensor)",
           _conv2d_fused_weight_grad_fake,
           ":func:`conv2d_sddmm` and :func:`conv2d_grow_topk` from one pass.", act="x"),
)
BY_NAME: dict[str, OpSpec] = {s.name: s for s in SPECS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
LINEAR_OPS: tuple[str, ...] = tuple(s.name for s in SPECS if s.family == "linear")
CONV_OPS: tuple[str, ...] = tuple(s.name for s in SPECS if s.family == "conv")
