"""Sparse linear and convolution as functions: ``y = x ⊛ (W ⊙ mask) + b``.

The weight is either dense (the ``nn`` layer's weight shape; entries outside ``mask`` are
ignored and get zero gradient) or the ``bsr`` values ``[nnzb, br, bc]`` of the active blocks in
the topology's (row-major) order. A weight is viewed as ``[M, K]``: Linear ``[out, in]``, Conv2d
``[C_out, C_in/groups * kh * kw]``; ``block_size`` is the granularity of that view the kernels
skip on. ``topology`` (from :func:`sparsekern.topology.build_topology` of the 2-D mask view) is
built on every call when not given: pass it (or use the modules, which cache it) in a loop.

Under autocast, fp32/fp16/bf16 operands are cast to the autocast dtype (as ``nn.Linear`` and
``nn.Conv2d`` are) and the ops run with fp32 accumulation.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from ._util import as_pair, check_block_size
from .autograd import RequestPlan, request_forward
from .topology import Topology, build_topology

__all__ = ["sparse_linear", "sparse_conv2d"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers
def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if t is None or t.dtype not in _CASTABLE or t.dtype == dtype:
        return t
    return t.to(dtype)


def _check_operands(who: str, x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                    n_out: int) -> None:
    """Types, devices and dtypes shared by the linear and conv functions."""
    for name, t in (("input", x), ("weight", weight), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{who}: mask must be a bool tensor, got dtype {mask.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"{who}: weight must be a floating-point tensor, got dtype {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{who}: bias must be a Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"{who}: bias must have shape ({n_out},), got {tuple(bias.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{who}: mask is on {mask.device} but input is on {x.device}; "
                         f"move them to the same device")
    check_input_matches(who, x, weight, bias)


def check_input_matches(who: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """``x`` is floating point, on the parameters' device, and of their dtype (unless under
    autocast)."""
    if not x.is_floating_point():
        raise TypeError(f"{who}: input must be a floating-point tensor, got dtype {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{who}: {name} is on {t.device} but input is on {x.device}; "
                             f"move them to the same device")
    if _autocast_dtype(x.device.type) is None:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"{who}: {name} has dtype {t.dtype} but input has dtype "
                                f"{x.dtype}; they must match (or run under autocast)")


def _check_weight_layout(who: str, weight: Tensor, mask: Tensor, topology: Optional[Topology],
                         block_size: tuple[int, int], mask2d_shape: tuple[int, int]) -> None:
    if topology is not None:
        if not isinstance(topology, Topology):
            raise TypeError(f"{who}: topology must be a sparsekern.topology.Topology, got "
                            f"{type(topology).__name__}")
        if tuple(topology.shape) != tuple(mask2d_shape) or tuple(topology.block_size) != block_size:
            raise ValueError(f"{who}: topology is for shape {tuple(topology.shape)} and block_size "
                             f"{tuple(topology.block_size)}, expected {tuple(mask2d_shape)} and "
                             f"{block_size}")
    if weight.dim() == 3:
        if tuple(weight.shape[1:]) != block_size:
            raise ValueError(f"{who}: bsr weight values must have shape [nnzb, {block_size[0]}, "
                             f"{block_size[1]}] (block_size), got {tuple(weight.shape)}")
    elif tuple(weight.shape) != tuple(mask.shape):
        raise ValueError(f"{who}: mask must have the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(mask.shape)}")


def _topology_for(who: str, weight: Tensor, mask2d: Tensor, block_size, topology) -> list[Tensor]:
    topo = topology if topology is not None else build_topology(mask2d, block_size)
    if topo.row_ptr.device != mask2d.device:
        topo = topo.to(mask2d.device)
    if weight.dim() == 3 and weight.shape[0] != topo.nnzb:
        raise ValueError(f"{who}: bsr weight has {weight.shape[0]} blocks but the mask's topology "
                         f"has {topo.nnzb} active blocks")
    return topo.tensors


# --------------------------------------------------------------------------- linear
def check_linear_input(who: str, x, in_features: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: input must be a Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(f"{who}: nested-tensor input is not supported (nn.TransformerEncoder "
                        f"makes one on its fast path: set its use_nested_tensor=False, as "
                        f"sparsekern.sparsify does)")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{who}: input must have in_features={in_features} as its last "
                         f"dimension, got shape {tuple(x.shape)}")


def sparse_linear_core(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                       topo: list[Tensor], block_size: tuple[int, int],
                       plan: Optional[RequestPlan] = None) -> Tensor:
    """Unchecked core of :func:`sparse_linear` (``mask`` 2-D, ``topo`` its tensors)."""
    m, k = mask.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    dt = _autocast_dtype(x.device.type)
    if dt is None:
        y = _linear2d(x2d, weight, mask, bias, topo, block_size, plan)
    else:
        x2d, weight, bias = _cast(x2d, dt), _cast(weight, dt), _cast(bias, dt)
        with torch.autocast(x.device.type, enabled=False):
            y = _linear2d(x2d, weight, mask, bias, topo, block_size, plan)
    if x.dim() == 2:
        return y
    # a fresh tensor, not a view, as nn.Linear returns (FSDP2 warns about views)
    return torch.ops.aten._unsafe_view(y, (*lead, m))


def _linear2d(x2d, weight, mask, bias, topo, block_size, plan):
    br, bc = block_size
    if plan is None:
        y = ops.run("bsr_mm", x2d, weight, mask, topo, br, bc)
    else:
        y = request_forward(x2d, weight, mask, topo, br, bc, None, plan)
    return y if bias is None else y + bias


def sparse_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None, *,
                  block_size=(1, 1), topology: Optional[Topology] = None) -> Tensor:
    """``y = x @ (W ⊙ mask)ᵀ + bias``, skipping inactive blocks.

    Args:
        x: ``[*, K]`` (batch dimensions flattened as ``nn.Linear`` does; may be empty).
        weight: dense ``[M, K]``, or ``bsr`` values ``[nnzb, br, bc]`` of the active blocks in
            the topology's order.
        mask: bool ``[M, K]``.
        bias: ``[M]`` or None.
        block_size: ``(br, bc)``, the block granularity of the kernels (ragged edges allowed).
        topology: the cached :class:`~sparsekern.topology.Topology` of ``mask``; built if None.

    Returns:
        ``[*, M]``.
    """
    who = "sparse_linear"
    _check_operands(who, x, weight, mask, bias, mask.shape[0] if mask.dim() == 2 else -1)
    if mask.dim() != 2:
        raise ValueError(f"{who}: mask must be 2-D [out_features, in_features], got shape "
                         f"{tuple(mask.shape)}")
    bs = check_block_size(block_size, who)
    _check_weight_layout(who, weight, mask, topology, bs, tuple(mask.shape))
    check_linear_input(who, x, mask.shape[1])
    topo = _topology_for(who, weight, mask, bs, topology)
    return sparse_linear_core(x, weight, mask, bias, topo, bs)


# --------------------------------------------------------------------------- conv
def resolve_conv_padding(padding, kernel_size, dilation) -> tuple[tuple[int, int], list[int]]:
    """Symmetric padding for the op and the extra ``F.pad`` of an asymmetric ``'same'``
    (``[left_w, right_w, top_h, bottom_h]`` extra, all zeros when symmetric), from a padding
    :func:`check_conv_args` validated."""
    if padding == "valid":
        return (0, 0), [0, 0, 0, 0]
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        sym = (total[0] // 2, total[1] // 2)
        return sym, [0, total[1] % 2, 0, total[0] % 2]
    return (padding[0], padding[1]), [0, 0, 0, 0]


def same_padding_pad(padding, kernel_size, dilation) -> list[int]:
    """``F.pad`` amounts (``[left_w, right_w, top_h, bottom_h]``) of a convolution's padding, as
    ``nn.Conv2d._reversed_padding_repeated_twice`` (for non-zero padding modes)."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        out = []
        for d, k in zip(reversed(dilation), reversed(kernel_size)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = padding
    return [pw, pw, ph, ph]


def check_conv_input(who: str, x, in_channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: input must be a Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{who}: input must be 4-D [N, C_in, H, W] (or 3-D unbatched), got "
                         f"shape {tuple(x.shape)}")
    if x.shape[-3] != in_channels:
        raise ValueError(f"{who}: input must have in_channels={in_channels} channels, got "
                         f"shape {tuple(x.shape)}")


def sparse_conv2d_core(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                       topo: list[Tensor], block_size: tuple[int, int], stride: tuple[int, int],
                       padding, dilation: tuple[int, int], groups: int,
                       padding_mode: str = "zeros", plan: Optional[RequestPlan] = None,
                       who: str = "sparse_conv2d") -> Tensor:
    """Core of :func:`sparse_conv2d` (operands already checked; ``x`` checked by
    :func:`check_conv_input`): padding resolution, unbatched input, autocast."""
    kernel = tuple(mask.shape[2:])
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if padding_mode != "zeros":
        x = F.pad(x, same_padding_pad(padding, kernel, dilation), mode=padding_mode)
        pad = (0, 0)
    else:
        pad, extra = resolve_conv_padding(padding, kernel, dilation)
        if any(extra):
            x = F.pad(x, extra)
    out_hw = ops.conv_out_hw(x.shape[2:], kernel, stride, pad, dilation)
    if min(out_hw) <= 0:
        raise ValueError(f"{who}: input of spatial size {tuple(x.shape[2:])} (after padding "
                         f"{pad}) is too small for kernel_size={kernel} with dilation={dilation}")
    conv = (list(stride), list(pad), list(dilation), groups)
    dt = _autocast_dtype(x.device.type)
    if dt is None:
        y = _conv4d(x, weight, mask, bias, topo, block_size, conv, plan)
    else:
        x, weight, bias = _cast(x, dt), _cast(weight, dt), _cast(bias, dt)
        with torch.autocast(x.device.type, enabled=False):
            y = _conv4d(x, weight, mask, bias, topo, block_size, conv, plan)
    return y.squeeze(0) if unbatched else y


def _conv4d(x, weight, mask, bias, topo, block_size, conv, plan):
    br, bc = block_size
    if plan is None:
        y = ops.run("conv2d", x, weight, mask, topo, br, bc, *conv)
    else:
        y = request_forward(x, weight, mask, topo, br, bc, conv, plan)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def check_conv_args(who: str, stride, padding, dilation, groups, padding_mode="zeros"):
    """Normalised ``(stride, padding, dilation, groups)``; ``padding`` stays a string for
    ``'same'``/``'valid'``."""
    stride = as_pair(stride, "stride", who)
    dilation = as_pair(dilation, "dilation", who)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{who}: groups must be a positive int, got {groups!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{who}: padding_mode must be one of {PADDING_MODES}, got "
                         f"{padding_mode!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{who}: padding must be 'same', 'valid', an int or a pair of ints, "
                             f"got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"{who}: padding='same' is not supported for strided convolutions "
                             f"(stride={stride})")
    else:
        padding = as_pair(padding, "padding", who, minimum=0)
    return stride, padding, dilation, groups


def sparse_conv2d(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None,
                  stride=1, padding: Union[str, int, tuple[int, int]] = 0, dilation=1,
                  groups: int = 1, *, block_size=(1, 1), topology: Optional[Topology] = None,
                  padding_mode: str = "zeros") -> Tensor:
    """2-D convolution of ``x`` with ``W ⊙ mask`` plus ``bias``, skipping inactive blocks.

    Args:
        x: ``[N, C_in, H, W]`` or unbatched ``[C_in, H, W]``; ``N`` may be 0.
        weight: dense ``[C_out, C_in/groups, kh, kw]``, or ``bsr`` values ``[nnzb, br, bc]`` of
            the active blocks of the 2-D view ``[C_out, C_in/groups * kh * kw]``.
        mask: bool ``[C_out, C_in/groups, kh, kw]``.
        bias: ``[C_out]`` or None.
        stride, dilation: int or pair. padding: int, pair, ``'valid'`` or ``'same'`` (stride 1;
            asymmetric when needed, extra on the right/bottom as PyTorch).
        groups: as ``nn.Conv2d``.
        block_size, topology: as :func:`sparse_linear`, on the 2-D view.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Returns:
        ``[N, C_out, H_out, W_out]`` (``[C_out, H_out, W_out]`` for unbatched input).
    """
    who = "sparse_conv2d"
    _check_operands(who, x, weight, mask, bias, mask.shape[0] if mask.dim() == 4 else -1)
    if mask.dim() != 4:
        raise ValueError(f"{who}: mask must be 4-D [C_out, C_in/groups, kh, kw], got shape "
                         f"{tuple(mask.shape)}")
    stride, padding, dilation, groups = check_conv_args(who, stride, padding, dilation, groups,
                                                        padding_mode)
    if mask.shape[0] % groups:
        raise ValueError(f"{who}: out channels ({mask.shape[0]}) must be divisible by "
                         f"groups={groups}")
    bs = check_block_size(block_size, who)
    mask2d = mask.flatten(1)
    _check_weight_layout(who, weight, mask, topology, bs, tuple(mask2d.shape))
    check_conv_input(who, x, mask.shape[1] * groups)
    topo = _topology_for(who, weight, mask2d, bs, topology)
    return sparse_conv2d_core(x, weight, mask, bias, topo, bs, stride, padding, dilation,
                              groups, padding_mode, who=who)
