"""CUDA C++ backend: the block-sparse ops of ``csrc/cuda`` for GPUs without Triton.

The kernels are registered by ``sparsekern._C`` (built with a CUDA torch and ``CUDA_HOME``) as
the CUDA implementations of the internal ops ``sparsekern::_bsr_mm``, ``_bsr_mm_t``, ``_sddmm``
and ``_grow_topk`` (schemas from :mod:`sparsekern.spec`). This module wraps them with the
signatures of :mod:`sparsekern.reference`; inputs the kernels do not take (mixed dtypes, a
non-bool mask, fp64 growth scores) go to the reference instead. Importing it raises
:class:`ImportError` with the reason when the backend cannot run here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference as ref

DEVICES = ("cuda",)

_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TOPK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp32 scores, 32-bit keys


def _unavailable_reason() -> Optional[str]:
    """Why the CUDA kernels cannot run in this process, or None when they can."""
    if not torch.cuda.is_available():
        return (f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"torch.version.cuda={torch.version.cuda})")
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except ImportError as e:
        return f"sparsekern._C is not built ({e})"
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::_bsr_mm", "CUDA")
    except RuntimeError:  # the op itself is not registered
        has = False
    if not has:
        return ("sparsekern._C has no CUDA kernels (build it with a CUDA torch and CUDA_HOME "
                "set: pip install --no-build-isolation -e .)")
    return None


_REASON = _unavailable_reason()
if _REASON is not None:
    raise ImportError(f"sparsekern CUDA backend unavailable: {_REASON}")


_OPERANDS = {"bsr_mm": (0, 1, 2, _MM_DTYPES), "bsr_mm_t": (0, 1, 2, _MM_DTYPES),
             "sddmm": (1, 0, 2, _MM_DTYPES), "grow_topk": (1, 0, 2, _TOPK_DTYPES),
             "fused_weight_grad": (1, 0, 2, _TOPK_DTYPES)}


def reference_reason(name: str, args: tuple) -> Optional[str]:
    """Why the call ``name(*args)`` runs on the reference instead of the CUDA kernel (op
    ``name`` in :data:`IMPLS`), or None when the kernel runs it: the activation and the other
    operand must share one of the kernels' dtypes and the mask (``exclude``) must be bool;
    ``fused_weight_grad`` also needs a bool ``exclude`` (else it runs as ``sddmm`` +
    ``grow_topk``, each judged alone)."""
    act_at, other_at, mask_at, dtypes = _OPERANDS[name]
    act, other, mask = args[act_at], args[other_at], args[mask_at]
    if act.dtype not in dtypes or other.dtype != act.dtype:
        return (f"dtypes {act.dtype}/{other.dtype}: the CUDA kernels take one of "
                f"{', '.join(map(str, dtypes))} for both")
    if mask.dtype != torch.bool:
        return f"a {mask.dtype} mask: the CUDA kernels take a bool mask"
    if name == "fused_weight_grad" and args[6].dtype != torch.bool:
        return f"a {args[6].dtype} exclude: the fused CUDA kernel takes a bool exclude"
    return None


def bsr_mm(x: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int) -> Tensor:
    """``x [B, K] @ (W ⊙ mask)ᵀ -> [B, M]``; ``w`` dense ``[M, K]`` or bsr ``[nnzb, br, bc]``."""
    if reference_reason("bsr_mm", (x, w, mask)) is not None:
        return ref.bsr_mm(x, w, mask, topo, br, bc)
    return torch.ops.sparsekern._bsr_mm(x, w, mask, list(topo), br, bc)


def bsr_mm_t(dy: Tensor, w: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int) -> Tensor:
    """``dy [B, M] @ (W ⊙ mask) -> [B, K]`` (the CSC view of the topology, no transpose)."""
    if reference_reason("bsr_mm_t", (dy, w, mask)) is not None:
        return ref.bsr_mm_t(dy, w, mask, topo, br, bc)
    return torch.ops.sparsekern._bsr_mm_t(dy, w, mask, list(topo), br, bc)


def sddmm(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int) -> Tensor:
    """``(dyᵀ x) ⊙ mask`` on the topology's blocks -> ``[nnzb, br, bc]``."""
    if reference_reason("sddmm", (dy, x, mask)) is not None:
        return ref.sddmm(dy, x, mask, topo, br, bc)
    return torch.ops.sparsekern._sddmm(dy, x, mask, list(topo), br, bc)


def grow_topk(dy: Tensor, x: Tensor, exclude: Tensor, k: int, counter: Optional[Tensor],
              bonus_scale: float, eps: float, br: int, bc: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` growth candidates without the dense gradient:
    ``(flat_indices int64 [k], scores fp32 [k])``, ties to the lower index, NaN highest."""
    if reference_reason("grow_topk", (dy, x, exclude)) is not None:
        return ref.grow_topk(dy, x, exclude, k, counter, bonus_scale, eps, br, bc)
    return torch.ops.sparsekern._grow_topk(dy, x, exclude, k, counter, float(bonus_scale),
                                           float(eps), br, bc)


def fused_weight_grad(dy: Tensor, x: Tensor, mask: Tensor, topo: list[Tensor], br: int, bc: int,
                      exclude: Tensor, k: int, counter: Optional[Tensor], bonus_scale: float,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``sddmm`` and ``grow_topk``: ``(values [nnzb, br, bc], flat_indices, scores)`` from two
    kernel passes over ``dy``/``x``, neither of which writes the dense gradient."""
    if reference_reason("fused_weight_grad", (dy, x, mask, topo, br, bc, exclude)) is None:
        return torch.ops.sparsekern._fused_weight_grad(dy, x, mask, list(topo), br, bc, exclude,
                                                       k, counter, float(bonus_scale),
                                                       float(eps))
    vals = sddmm(dy, x, mask, topo, br, bc)
    idx, scores = grow_topk(dy, x, exclude, k, counter, bonus_scale, eps, br, bc)
    return vals, idx, scores


IMPLS = {
    "bsr_mm": bsr_mm,
    "bsr_mm_t": bsr_mm_t,
    "sddmm": sddmm,
    "grow_topk": grow_topk,
    "fused_weight_grad": fused_weight_grad,
}
