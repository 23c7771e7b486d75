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

import os
from typing import Callable

import torch
import triton  # noqa: F401  (ImportError here = backend unavailable)
from torch import Tensor

from .. import spec
from . import bsr_mm as _bsr_mm
from . import conv, topk
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


OPS: dict[str, object] = {name: spec.custom_op(spec.BY_NAME[name], f"sparsekern_triton::{name}",
                                               spec.BY_NAME[name].with_named_topo(fn))
                          for name, fn in IMPLS.items()}
"""Op name -> the opaque ``torch.library`` custom op ``sparsekern_triton::<name>``."""



__all__ = ["DEVICES", "IMPLS", "OPS"]
