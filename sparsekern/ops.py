"""The registry of ``sparsekern::*`` ops, derived from :mod:`sparsekern.spec`, and the one
place a backend is chosen.

For every spec this module defines the public custom op ``sparsekern::<name>`` (the spec's
schema, fake and autograd; ``torch.compile`` traces it and ``opcheck`` passes) and the schema of
its kernel op ``sparsekern::_<name>``, which ``sparsekern._C`` implements (so this module is
imported before ``_C`` is loaded). An op's body asks :func:`impl_for` for the implementation of
the active backend; the reference implementation (:mod:`sparsekern.reference`) defines the
meaning.

A backend provider is a module exposing ``IMPLS`` (op name -> callable with the op's
signature) and ``DEVICES`` (device types it runs on); ops it does not implement fall back to
the reference.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import types
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import reference as ref
from . import spec
from ._util import acc_dtype, conv_out_hw  # noqa: F401  (conv_out_hw: part of the ops API)
from .spec import _scatter_index, weight_grad_from_blocks  # noqa: F401  (part of the ops API)

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
    """Indices along dim 0 of ``a`` whose slice holds a NaN/inf, or None. One reduction over
    the whole tensor decides (a finite sum means every entry is finite); only a non-finite sum
    (a NaN/inf, or finite values overflowing it: then nothing is recomputed) pays the per-row
    pass."""
    if a.numel() == 0:
        return None
    acc = acc_dtype(a.dtype)
    if math.isfinite(a.sum(dtype=acc).item()):
        return None
    bad = ~torch.isfinite(a.reshape(a.shape[0], -1).sum(1, dtype=acc))
    if not bool(bad.any()):
        return None
    return bad.nonzero().flatten()


def _dispatch(s: spec.OpSpec, act: int, args: tuple):
    """Run op ``s`` on the current backend (chosen by the device of its activation
    ``args[act]``, the argument ``s.act``).
    With ``s.nonfinite_rows``, rows (images) of the activation that hold a NaN/inf are recomputed
    by the reference, whose meaning is the dense op's (NaN·0 = NaN): sparse kernels skip the
    products with dormant weights, so without this a non-finite activation would vanish or not
    depending on the backend and density."""
    fn = impl_for(s.name, args[act].device)
    out = fn(*args)
    reference = getattr(ref, s.name)
    if s.nonfinite_rows and fn is not reference:
        rows = _nonfinite_rows(args[act])
        if rows is not None:
            sub = list(args)
            sub[act] = args[act][rows]
            out[rows] = reference(*sub)
    return out


if "SPARSEKERN_BACKEND" in os.environ:
    _current[0] = _check_name(os.environ["SPARSEKERN_BACKEND"])


# --------------------------------------------------------------------------- the ops
def _direct_call(s: spec.OpSpec):
    """``s`` on the active backend (:func:`_dispatch`): the body of the public custom op and
    the eager fast path's call."""
    act = s.index(s.act)

    def call(*args):
        return _dispatch(s, act, args)

    call.__name__ = call.__qualname__ = s.name
    return call


def _public_op(s: spec.OpSpec):
    """The public ``sparsekern::<name>`` custom op of ``s``: dispatch to the active backend,
    the spec's fake and autograd."""

    run = _direct_call(s)
    run.__doc__ = s.doc
    op = spec.custom_op(s, f"sparsekern::{s.name}", run)
    if s.backward is not None:
        op.register_autograd(s.backward, setup_context=s.setup_context)
    return op


def _define_kernel_op(s: spec.OpSpec) -> None:
    """Declare ``sparsekern::_<name>``, the op the C++/CUDA kernels of ``sparsekern._C``
    implement (the extension registers implementations only), with the spec's fake."""
    qualname = f"sparsekern::_{s.name}"
    torch.library.define(qualname, s.kernel_schema)
    torch.library.register_fake(qualname, s.with_named_topo(s.fake))


for _s in spec.SPECS:
    _define_kernel_op(_s)
OPS: dict[str, object] = {s.name: _public_op(s) for s in spec.SPECS}
"""Op name -> the public custom op ``sparsekern::<name>`` (also a module attribute)."""
globals().update(OPS)


# --------------------------------------------------------------------------- eager fast path
_DIRECT_OPS = types.SimpleNamespace(**{s.name: _direct_call(s) for s in spec.SPECS})
"""The ops without the custom-op layers (same dispatch), for the eager fast path's backward."""


def _direct_fn(s: spec.OpSpec):
    """A plain ``autograd.Function`` with ``s``'s forward and backward, calling
    :data:`_DIRECT_OPS`."""
    forward_call = getattr(_DIRECT_OPS, s.name)

    def forward(ctx, *args):
        out = forward_call(*args)
        s.setup_context(ctx, args, out)
        ctx.ops = _DIRECT_OPS
        return out

    def backward(ctx, *grads):
        return tuple(None if isinstance(g, list) else g for g in s.backward(ctx, *grads))

    return type(f"Direct_{s.name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_DIRECT_FNS = {s.name: _direct_fn(s) for s in spec.SPECS if s.backward is not None}
_PLAIN = (Tensor, torch.nn.Parameter)


def direct_ok(*tensors: Tensor) -> bool:
    """Whether an op on ``tensors`` may take the eager fast path: not traced by
    ``torch.compile``, no dispatch or function mode (fake tensors, ``opcheck``, profilers of
    allocations), no functorch transform, plain tensors only (no subclass such as DTensor)."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active()
            and all(type(t) in _PLAIN for t in tensors))


def run(name: str, *args):
    """Op ``name`` (one with a backward: ``bsr_mm``, ``conv2d``) on ``args``: in plain eager mode (:func:`direct_ok`) through a plain
    ``autograd.Function`` (the custom op's dispatch and autograd, without its per-call layers,
    which cost more than the kernels on small layers), otherwise the custom op
    ``sparsekern::<name>``. Both give the same values and gradients."""
    if direct_ok(args[0], args[1], args[2]):
        return _DIRECT_FNS[name].apply(*args)
    return OPS[name](*args)
LINEAR_OPS = spec.LINEAR_OPS
CONV_OPS = spec.CONV_OPS
