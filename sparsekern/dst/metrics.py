"""The dense forward FLOPs of a layer, for the training-FLOPs metric of
:meth:`sparsekern.dst.DSTMethod.stats`."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    shape = getattr(module, "weight_shape", None)
    if shape is not None:
        return tuple(shape)
    m = getattr(module, "mask", None)
    return tuple(m.shape if m is not None else module.weight.shape)


def dense_forward_flops(module: nn.Module, x: Tensor, out: Tensor) -> float:
    """Dense forward FLOPs (2 per multiply-add) of ``module`` per sample of this call."""
    shape = _weight_shape(module)
    if len(shape) == 4:  # conv: every output pixel costs one dot product per output channel
        return float(2 * math.prod(shape) * math.prod(out.shape[-2:]))
    rows = x.numel() // max(shape[1], 1) // max(x.shape[0], 1) if x.dim() > 1 else 1
    return float(2 * math.prod(shape) * max(rows, 1))


def fallback_flops(module: nn.Module) -> float:
    """FLOPs per sample of a layer that has not run yet (a conv counted at one output pixel)."""
    return float(2 * math.prod(_weight_shape(module)))


class FlopsProbe:
    """Records each layer's dense forward FLOPs per sample at its first call, then unhooks.
    A DST method removes what is left after its first ``step()`` (a layer not called by then
    counts :func:`fallback_flops`), so that no hook outlives the first, eager, step under
    ``torch.compile``."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.flops: dict[str, float] = {}
        self.handles = {}
        for name, mod in modules.items():
            self.handles[name] = mod.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args, out):
            if name not in self.flops and args and isinstance(args[0], Tensor):
                with torch.no_grad():
                    self.flops[name] = dense_forward_flops(module, args[0], out)
                h = self.handles.pop(name, None)
                if h is not None:
                    h.remove()
        return hook

    def remove(self) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles = {}
