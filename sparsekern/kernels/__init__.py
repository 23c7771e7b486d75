"""Triton backend of sparsekern (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

Provider contract (see ``sparsekern.ops``): importing this module imports ``triton`` (an
ImportError makes the backend unavailable), ``DEVICES`` lists the device types it runs on and
``IMPLS`` maps op names to launchers with the signatures of the same-named functions in
``sparsekern.reference``. Each launcher is also registered as an opaque custom op
``sparsekern_triton::<name>`` (``OPS``) with a fake impl: ``triton_op`` fails ``opcheck`` under
the interpreter, an opaque op passes it and ``torch.compile``.

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

from . import bsr_mm as _bsr_mm
from . import conv, topk
from . import sddmm as _sddmm
from ._common import conv_out_hw

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


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _topk_fake(x: Tensor, k: int):
    return x.new_empty(k, dtype=torch.int64), x.new_empty(k, dtype=_acc(x.dtype))


def _fakes() -> dict[str, Callable]:
    """Shape/dtype-only implementations of every op (no data touched)."""

    def bsr_mm_fake(x, w, mask, topo, br, bc):
        return x.new_empty(x.shape[0], mask.shape[0])

    def bsr_mm_t_fake(dy, w, mask, topo, br, bc):
        return dy.new_empty(dy.shape[0], mask.shape[1])

    def sddmm_fake(dy, x, mask, topo, br, bc):
        return x.new_empty(topo[1].shape[0], br, bc)

    def grow_topk_fake(dy, x, exclude, k, counter, bonus_scale, eps, br, bc):
        return _topk_fake(x, k)

    def fused_fake(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps):
        return (x.new_empty(topo[1].shape[0], br, bc), *_topk_fake(x, k))

    def conv2d_fake(x, w, mask, topo, br, bc, stride, padding, dilation, groups):
        oh, ow = conv_out_hw(x.shape[2:], mask.shape[2:], stride, padding, dilation)
        return x.new_empty(x.shape[0], mask.shape[0], oh, ow)

    def conv2d_grad_input_fake(dy, w, mask, topo, br, bc, input_hw, stride, padding, dilation,
                               groups):
        return dy.new_empty(dy.shape[0], mask.shape[1] * groups, *input_hw)

    def conv2d_sddmm_fake(dy, x, mask, topo, br, bc, stride, padding, dilation, groups):
        return x.new_empty(topo[1].shape[0], br, bc)

    def conv2d_grow_topk_fake(dy, x, exclude, k, counter, bonus_scale, eps, br, bc, weight_shape,
                              stride, padding, dilation, groups):
        return _topk_fake(x, k)

    def conv2d_fused_fake(dy, x, mask, topo, br, bc, exclude, k, counter, bonus_scale, eps,
                          stride, padding, dilation, groups):
        return (x.new_empty(topo[1].shape[0], br, bc), *_topk_fake(x, k))

    return {"bsr_mm": bsr_mm_fake, "bsr_mm_t": bsr_mm_t_fake, "sddmm": sddmm_fake,
            "grow_topk": grow_topk_fake, "fused_weight_grad": fused_fake,
            "conv2d": conv2d_fake, "conv2d_grad_input": conv2d_grad_input_fake,
            "conv2d_sddmm": conv2d_sddmm_fake, "conv2d_grow_topk": conv2d_grow_topk_fake,
            "conv2d_fused_weight_grad": conv2d_fused_fake}


def _register() -> dict[str, object]:
    ops = {}
    fakes = _fakes()
    for name, fn in IMPLS.items():
        op = torch.library.custom_op(f"sparsekern_triton::{name}", fn, mutates_args=())
        op.register_fake(fakes[name])
        ops[name] = op
    return ops


OPS: dict[str, object] = _register()
"""Op name -> the opaque ``torch.library`` custom op ``sparsekern_triton::<name>``."""

__all__ = ["DEVICES", "IMPLS", "OPS"]
