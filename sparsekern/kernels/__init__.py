"""Triton backend of sparsekern (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

Provider contract (see ``sparsekern.ops``): importing this module imports ``triton`` (an
ImportError makes the backend unavailable), ``DEVICES`` lists the device types it runs on and
``IMPLS`` maps op names to launchers with the signatures of the same-named functions in
``sparsekern.reference``. Each launcher is also registered as an opaque custom op
``sparsekern_triton::<name>`` (``OPS``) with the schema and fake of its :mod:`sparsekern.spec`
entry: ``triton_op`` fails ``opcheck`` under the interpreter, an opaque op passes it and
``torch.compile``.

Launchers route to the reference for what the kernels do not run: fp64 (and other non
fp32/fp16/bf16) inputs, block sizes whose tile would pass 128 elements, and growth score grids of
2^31 entries or more.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
import triton  # noqa: F401  (ImportError here = backend unavailable)
from torch import Tensor

from .. import spec
from . import bsr_mm as _bsr_mm
from . import configs, conv, topk
from . import sddmm as _sddmm

DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)

IMPLS: dict[str, Callable] = {
    "bsr_mm": _bsr_mm.bsr_mm,
    "bsr_mm_t": _bsr_mm.bsr_mm_t,
    "sddmm": _sddmm.sddmm,
    "grow_topk": topk.grow_topk,
    "fused_weight_grad": topk.fused_weight_grad,
    "conv2d": conv.conv2d,
    "conv2d_grad_input": conv.conv2d_grad_input,
    "conv2d_sddmm": conv.conv2d_sddmm,
    "conv2d_grow_topk": conv.conv2d_grow_topk,
    "conv2d_fused_weight_grad": conv.conv2d_fused_weight_grad,
}


OPS: dict[str, object] = {name: spec.custom_op(spec.BY_NAME[name], f"sparsekern_triton::{name}", fn)
                          for name, fn in IMPLS.items()}
"""Op name -> the opaque ``torch.library`` custom op ``sparsekern_triton::<name>``."""



def reference_reason(name: str, args: tuple) -> Optional[str]:
    """Why the launcher of op ``name`` runs the call ``name(*args)`` on the reference, or None
    when a Triton kernel runs it: the block size's tiling (:func:`configs.tiling`), the dtypes
    of the op's first two operands (:func:`bsr_mm.supported`) and, for the growth ops, the size
    of the score grid (:func:`topk._fits`)."""
    s = spec.BY_NAME[name]
    br, bc = s.arg(args, "br"), s.arg(args, "bc")
    growth = "k" in s.arg_names
    if configs.tiling(br, bc, allow_block_path=not growth) is None:
        return f"block size {br}x{bc}: its tile would pass {configs.MAX_EXTENT} elements"
    if not _bsr_mm.supported(args[0], args[1]):
        return (f"dtypes {args[0].dtype}/{args[1].dtype}: Triton runs "
                f"{', '.join(map(str, configs.SUPPORTED_DTYPES))}")
    if growth:
        if s.family == "conv":
            shape = (s.arg(args, "weight_shape") if "weight_shape" in s.arg_names
                     else s.arg(args, "mask").shape)
            m, k = int(shape[0]), math.prod(int(d) for d in shape[1:])
        else:
            m, k = s.arg(args, "dy").shape[1], s.arg(args, "x").shape[1]
        grid = topk._score_grid(m, k, br, bc)
        if not topk._fits(grid):
            return f"growth score grid {grid[0]}x{grid[1]}: 2^{topk.IDX_BITS} entries or more"
        if m * k == 0:
            return "empty weight"
    return None


def kernel_path(name: str, args: tuple) -> str:
    """The Triton kernel path of a call that :func:`reference_reason` lets run."""
    s = spec.BY_NAME[name]
    if "k" in s.arg_names:
        return "weight-side pass: dense gradient tiles scored and radix-selected (exact top-k)"
    t = configs.tiling(s.arg(args, "br"), s.arg(args, "bc"))
    if t.block_path:
        return "block path: one mask block per tile, walking the topology's CSR/CSC lists"
    return (f"tile path: {t.tmb}x{t.tkb} blocks per {t.pm}x{t.pk} tile, inactive tiles "
            "skipped")


__all__ = ["DEVICES", "IMPLS", "OPS", "kernel_path", "reference_reason"]
