"""The single registry of ``sparsekern::*`` ops and the one place a backend is chosen.

Every op is a ``torch.library`` custom op with a fake impl (so ``torch.compile`` traces it and
``opcheck`` passes). Its body asks :func:`impl_for` for the implementation of the active
backend; the reference implementation (:mod:`sparsekern.reference`) defines the meaning.

A backend provider is a module exposing ``IMPLS`` (op name -> callable with the op's
signature) and ``DEVICES`` (device types it runs on); ops it does not implement fall back to
the reference.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference as ref
from ._util import acc_dtype, conv_out_hw  # noqa: F401  (conv_out_hw: part of the ops API)
from .topology import block_coords, scatter_blocks

BACKENDS = ("auto", "triton", "cpp", "cuda", "reference")
_PROVIDERS = {"triton": "sparsekern.kernels", "cpp": "sparsekern.cpp_backend",
              "cuda": "sparsekern.cuda_backend"}
_loaded: dict[str, object] = {}
_reasons: dict[str, str] = {}
_current = ["auto"]


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _provider(name: str):
    """The provider module of ``name``, or None (with the reason recorded)."""
    if name not in _loaded and name not in _reasons:
        try:
            mod = importlib.import_module(_PROVIDERS[name])
            if not isinstance(getattr(mod, "IMPLS", None), dict) or not hasattr(mod, "DEVICES"):
                raise ImportError(f"{_PROVIDERS[name]} defines no IMPLS/DEVICES")
            _loaded[name] = mod
        except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable
            _reasons[name] = f"{type(e).__name__}: {e}"
    return _loaded.get(name)


def available_backends() -> dict[str, str]:
    """Backend name -> ``"ok"`` or the reason it is unavailable."""
    out = {"reference": "ok"}
    for name in _PROVIDERS:
        out[name] = "ok" if _provider(name) is not None else _reasons[name]
    return out


def set_backend(name: str) -> None:
    """Choose the backend for every op: ``auto`` (Triton for CUDA tensors, or for CPU tensors
    under ``TRITON_INTERPRET=1``; C++ for CPU tensors; reference otherwise), or one by name.
    Naming an unavailable backend raises with the reason."""
    _check_name(name)
    if name not in ("auto", "reference") and _provider(name) is None:
        raise RuntimeError(f"sparsekern backend {name!r} is unavailable: {_reasons[name]}")
    _current[0] = name


def get_backend() -> str:
    """The backend name set by :func:`set_backend` (``auto`` by default)."""
    return _current[0]


@contextlib.contextmanager
def backend(name: str):
    """Context manager: use backend ``name`` inside the block."""
    previous = _current[0]
    set_backend(name)
    try:
        yield
    finally:
        _current[0] = previous


def _auto_order(device_type: str) -> tuple[str, ...]:
    if device_type == "cuda":
        return ("triton", "cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("triton", "cpp")
    return ("cpp",)


def resolve_backend(device: torch.device) -> str:
    """The backend an op on ``device`` runs with now."""
    name = _current[0]
    if name == "reference":
        return name
    if name != "auto":
        prov = _provider(name)
        if prov is None:
            raise RuntimeError(f"sparsekern backend {name!r} (from set_backend or "
                               f"SPARSEKERN_BACKEND) is unavailable: {_reasons[name]}")
        if device.type not in prov.DEVICES:
            raise RuntimeError(f"sparsekern backend {name!r} does not run on {device.type} "
                               f"tensors (it runs on {', '.join(prov.DEVICES)})")
        return name
    for cand in _auto_order(device.type):
        prov = _provider(cand)
        if prov is not None and device.type in prov.DEVICES:
            return cand
    return "reference"


def impl_for(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device`` under the current backend."""
    name = resolve_backend(device)
    if name != "reference":
        fn = _loaded[name].IMPLS.get(op)
        if fn is not None:
            return fn
    return getattr(ref, op)


def _nonfinite_rows(a: Tensor) -> Optional[Tensor]:
    """Indices along dim 0 of ``a`` whose slice holds a NaN/inf (a row sum that is not finite:
    one cheap pass; a finite row that overflows the sum only costs a recomputation), or None."""
    if a.numel() == 0:
        return None
    bad = ~torch.isfinite(a.reshape(a.shape[0], -1).sum(1, dtype=_acc(a.dtype)))
    if not bool(bad.any()):
        return None
    return bad.nonzero().flatten()


def _dispatch(op: str, args: tuple, act: int = 0):
    """Run ``op`` on the current backend. Rows (images) of the activation ``args[act]`` that
    hold a NaN/inf are recomputed by the reference, whose meaning is the dense op's (NaN·0 =
    NaN): sparse kernels skip the products with dormant weights, so without this a non-finite
    activation would vanish or not depending on the backend and density."""
    fn = impl_for(op, args[act].device)
    out = fn(*args)
    reference = getattr(ref, op)
    if fn is not reference:
        rows = _nonfinite_rows(args[act])
        if rows is not None:
            sub = list(args)
            sub[act] = args[act][rows]
            out[rows] = reference(*sub)
    return out


if "SPARSEKERN_BACKEND" in os.environ:
    _current[0] = _check_name(os.environ["SPARSEKERN_BACKEND"])


# --------------------------------------------------------------------------- linear ops
def _acc(dtype: torch.dtype) -> torch.dtype:
    return acc_dtype(dtype)


@torch.library.custom_op("sparsekern::bsr_mm", mutates_args=())
def bsr_mm(x: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int) -> Tensor:
    """``x [B, K] @ (W ⊙ mask)ᵀ`` -> ``[B, M]``; ``w`` is ``[M, K]`` or ``[nnzb, br, bc]``."""
    return _dispatch("bsr_mm", (x, w, mask, topo, br, bc))


@bsr_mm.register_fake
def _(x, w, mask, topo, br, bc):
    torch._check(x.shape[1] == mask.shape[1], lambda: "bsr_mm: x and mask disagree on K")
    return x.new_empty(x.shape[0], mask.shape[0])


@torch.library.custom_op("sparsekern::bsr_mm_t", mutates_args=())
def bsr_mm_t(dy: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int) -> Tensor:
    """``dy [B, M] @ (W ⊙ mask)`` -> ``[B, K]``."""
    return _dispatch("bsr_mm_t", (dy, w, mask, topo, br, bc))


@bsr_mm_t.register_fake
def _(dy, w, mask, topo, br, bc):
    torch._check(dy.shape[1] == mask.shape[0], lambda: "bsr_mm_t: dy and mask disagree on M")
    return dy.new_empty(dy.shape[0], mask.shape[1])


@torch.library.custom_op("sparsekern::sddmm", mutates_args=())
def sddmm(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int) -> Tensor:
    """``(dyᵀ x) ⊙ mask`` on the topology's blocks -> ``[nnzb, br, bc]``."""
    return impl_for("sddmm", x.device)(dy, x, mask, topo, br, bc)


@sddmm.register_fake
def _(dy, x, mask, topo, br, bc):
    return x.new_empty(topo[1].shape[0], br, bc)


@torch.library.custom_op("sparsekern::grow_topk", mutates_args=())
def grow_topk(dy: Tensor, x: Tensor, exclude: Tensor, k: int, counter: Optional[Tensor],
              bonus_scale: float, eps: float, br: int, bc: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of ``|dyᵀx|`` (block mean when ``(br, bc) != (1, 1)``) plus
    ``bonus_scale / (counter + eps)`` over entries where ``exclude`` is False.
    Returns ``(flat_indices int64 [k], scores [k])``; ties to the lower index, NaN highest."""
    return impl_for("grow_topk", x.device)(dy, x, exclude, k, counter, bonus_scale, eps, br, bc)


@grow_topk.register_fake
def _(dy, x, exclude, k, counter, bonus_scale, eps, br, bc):
    return x.new_empty(k, dtype=torch.int64), x.new_empty(k, dtype=_acc(x.dtype))


@torch.library.custom_op("sparsekern::fused_weight_grad", mutates_args=())
def fused_weight_grad(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                      exclude: Tensor, k: int, counter: Optional[Tensor], bonus_scale: float,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``sddmm`` and ``grow_topk`` from one pass: ``(values, flat_indices, scores)``."""
    return impl_for("fused_weight_grad", x.device)(dy, x, mask, topo, br, bc, exclude, k,
                                                   counter, bonus_scale, eps)


@fused_weight_grad.register_fake
def _(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps):
    return (x.new_empty(topo[1].shape[0], br, bc), x.new_empty(k, dtype=torch.int64),
            x.new_empty(k, dtype=_acc(x.dtype)))


# --------------------------------------------------------------------------- conv ops
@torch.library.custom_op("sparsekern::conv2d", mutates_args=())
def conv2d(x: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
           stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """Convolution of ``x [N, C_in, H, W]`` with ``W ⊙ mask`` (mask ``[C_out, C_in/g, kh, kw]``)."""
    return _dispatch("conv2d", (x, w, mask, topo, br, bc, stride, padding, dilation, groups))


@conv2d.register_fake
def _(x, w, mask, topo, br, bc, stride, padding, dilation, groups):
    oh, ow = conv_out_hw(x.shape[2:], mask.shape[2:], stride, padding, dilation)
    return x.new_empty(x.shape[0], mask.shape[0], oh, ow)


@torch.library.custom_op("sparsekern::conv2d_grad_input", mutates_args=())
def conv2d_grad_input(dy: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                      input_hw: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int) -> Tensor:
    """Gradient of :func:`conv2d`'s input -> ``[N, C_in, *input_hw]``."""
    return _dispatch("conv2d_grad_input", (dy, w, mask, topo, br, bc, input_hw, stride,
                                           padding, dilation, groups))


@conv2d_grad_input.register_fake
def _(dy, w, mask, topo, br, bc, input_hw, stride, padding, dilation, groups):
    return dy.new_empty(dy.shape[0], mask.shape[1] * groups, *input_hw)


@torch.library.custom_op("sparsekern::conv2d_sddmm", mutates_args=())
def conv2d_sddmm(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """:func:`conv2d`'s weight gradient on the topology's blocks -> ``[nnzb, br, bc]``."""
    return impl_for("conv2d_sddmm", x.device)(dy, x, mask, topo, br, bc, stride, padding,
                                              dilation, groups)


@conv2d_sddmm.register_fake
def _(dy, x, mask, topo, br, bc, stride, padding, dilation, groups):
    return x.new_empty(topo[1].shape[0], br, bc)


@torch.library.custom_op("sparsekern::conv2d_grow_topk", mutates_args=())
def conv2d_grow_topk(dy: Tensor, x: Tensor, exclude: Tensor, k: int, counter: Optional[Tensor],
                     bonus_scale: float, eps: float, br: int, bc: int, weight_shape: list[int],
                     stride: list[int], padding: list[int], dilation: list[int],
                     groups: int) -> tuple[Tensor, Tensor]:
    """:func:`grow_topk` for :func:`conv2d`'s weight gradient on its 2-D view."""
    return impl_for("conv2d_grow_topk", x.device)(dy, x, exclude, k, counter, bonus_scale, eps,
                                                  br, bc, weight_shape, stride, padding,
                                                  dilation, groups)


@conv2d_grow_topk.register_fake
def _(dy, x, exclude, k, counter, bonus_scale, eps, br, bc, weight_shape, stride, padding,
      dilation, groups):
    return x.new_empty(k, dtype=torch.int64), x.new_empty(k, dtype=_acc(x.dtype))


@torch.library.custom_op("sparsekern::conv2d_fused_weight_grad", mutates_args=())
def conv2d_fused_weight_grad(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int,
                             bc: int, exclude: Tensor, k: int, counter: Optional[Tensor],
                             bonus_scale: float, eps: float, stride: list[int],
                             padding: list[int], dilation: list[int],
                             groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`conv2d_sddmm` and :func:`conv2d_grow_topk` from one pass."""
    return impl_for("conv2d_fused_weight_grad", x.device)(
        dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps, stride, padding,
        dilation, groups)


@conv2d_fused_weight_grad.register_fake
def _(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps, stride, padding,
      dilation, groups):
    return (x.new_empty(topo[1].shape[0], br, bc), x.new_empty(k, dtype=torch.int64),
            x.new_empty(k, dtype=_acc(x.dtype)))


# --------------------------------------------------------------------------- autograd
_SCATTER_INDEX: dict[int, tuple] = {}


def _scatter_index(topo: list[Tensor], br: int, bc: int, m: int, k: int) -> tuple[Tensor, Tensor]:
    """``(src, dst)``: positions in the flattened ``[nnzb, br, bc]`` values and in the flattened
    ``[M, K]`` matrix of every block entry inside the matrix. Cached per topology (keyed by its
    ``col_idx`` tensor, which a mask change replaces; dropped with it), so a backward does not
    rebuild it."""
    key = topo[1]
    tag = (key._version, topo[0]._version, br, bc, m, k)
    hit = _SCATTER_INDEX.get(id(key))
    if hit is not None and hit[0]() is key and hit[1] == tag:
        return hit[2], hit[3]
    rows, cols = block_coords(topo[0], topo[1])  # O(nnzb·br·bc), no [M, K] temporary
    r = (rows * br)[:, None, None] + torch.arange(br, device=key.device)[None, :, None]
    c = (cols * bc)[:, None, None] + torch.arange(bc, device=key.device)[None, None, :]
    src = ((r < m) & (c < k)).flatten().nonzero().flatten()
    dst = (r * k + c).flatten()[src]
    ident = id(key)
    alive = weakref.ref(key, lambda _r: _SCATTER_INDEX.pop(ident, None))
    _SCATTER_INDEX[ident] = (alive, tag, src, dst)
    return src, dst


def weight_grad_from_blocks(values: Tensor, w: Tensor, topo: list[Tensor], shape) -> Tensor:
    """The weight's gradient from compact block values: the values themselves for the ``bsr``
    layout, scattered into the weight's dense shape (zero off the pattern) otherwise."""
    if w.dim() == 3:
        return values.to(w.dtype)
    m, k = shape[0], math.prod(shape[1:])
    if torch.compiler.is_compiling():
        return scatter_blocks(values, topo[0], topo[1], (m, k)).view(shape).to(w.dtype)
    src, dst = _scatter_index(topo, values.shape[1], values.shape[2], m, k)
    out = torch.zeros(m * k, dtype=w.dtype, device=w.device)
    out[dst] = values.flatten()[src].to(w.dtype)
    return out.view(shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], *inputs[3])
    ctx.args = inputs[4:]


def _bsr_mm_backward(ctx, dy):
    x, w, mask, *topo = ctx.saved_tensors
    br, bc = ctx.args
    dx = bsr_mm_t(dy, w, mask, topo, br, bc) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        dw = weight_grad_from_blocks(sddmm(dy, x, mask, topo, br, bc), w, topo, w.shape)
    return dx, dw, None, [None] * len(topo), None, None


bsr_mm.register_autograd(_bsr_mm_backward, setup_context=_setup)


def _conv2d_backward(ctx, dy):
    x, w, mask, *topo = ctx.saved_tensors
    br, bc, stride, padding, dilation, groups = ctx.args
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = conv2d_grad_input(dy, w, mask, topo, br, bc, list(x.shape[2:]), stride, padding,
                               dilation, groups)
    if ctx.needs_input_grad[1]:
        vals = conv2d_sddmm(dy, x, mask, topo, br, bc, stride, padding, dilation, groups)
        dw = weight_grad_from_blocks(vals, w, topo, w.shape)
    return dx, dw, None, [None] * len(topo), None, None, None, None, None, None


conv2d.register_autograd(_conv2d_backward, setup_context=_setup)

LINEAR_OPS = ("bsr_mm", "bsr_mm_t", "sddmm", "grow_topk", "fused_weight_grad")
CONV_OPS = ("conv2d", "conv2d_grad_input", "conv2d_sddmm", "conv2d_grow_topk",
            "conv2d_fused_weight_grad")
