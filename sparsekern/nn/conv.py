"""``SparseConv2d``: a drop-in ``nn.Conv2d`` whose weight is masked and truly sparse."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import functional as skF
from .._util import as_pair
from .base import SparseModule, check_sparsity


def _conv_args(m) -> dict:
    """Constructor arguments of an ``nn.Conv2d`` or a ``SparseConv2d`` (same attribute names)."""
    return dict(in_channels=m.in_channels, out_channels=m.out_channels,
                kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


class SparseConv2d(SparseModule):
    """2-D convolution with ``W ⊙ mask`` (as ``nn.Conv2d``, every argument supported).

    The mask's block granularity ``block_size = (br, bc)`` refers to the 2-D weight view
    ``[C_out, C_in/groups * kh * kw]`` (reduction axis ordered ``(c_in, kh, kw)``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding (int, pair, ``'same'`` or
        ``'valid'``), dilation, groups, bias, padding_mode (``'zeros'``, ``'reflect'``,
        ``'replicate'``, ``'circular'``): as ``nn.Conv2d``.
        sparsity, block_size, layout: as :class:`~sparsekern.nn.SparseLinear`.

    Attributes:
        weight (``[C_out, C_in/groups, kh, kw]``, or ``[nnzb, br, bc]`` for ``bsr``), bias,
        mask (bool ``[C_out, C_in/groups, kh, kw]``: a buffer for ``dense``, built on read from
        the ``block_mask`` buffer for ``bsr``), block_size, layout, sparsity,
        density, mask_version, topology, grow_candidates, scores.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding: Union[str, int, tuple[int, int]] = 0, dilation=1, groups: int = 1,
                 bias: bool = True, padding_mode: str = "zeros", *, sparsity: float = 0.0,
                 block_size=(1, 1), layout: str = "dense", device=None, dtype=None) -> None:
        super().__init__()
        who = "SparseConv2d"
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")
        self.kernel_size = as_pair(kernel_size, "kernel_size", who)
        stride, padding, dilation, groups = skF.check_conv_args(who, stride, padding, dilation,
                                                                groups, padding_mode)
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if v % groups:
                raise ValueError(f"{who}: {name} ({v}) must be divisible by groups={groups}")
        check_sparsity(sparsity, who)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = skF.same_padding_pad(padding, self.kernel_size,
                                                                     dilation)
        self._dense_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._factory = {"device": device, "dtype": dtype}
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._init_sparse_params(sparsity, block_size, layout)

    def forward(self, x: Tensor) -> Tensor:
        skF.check_conv_input("SparseConv2d", x, self.in_channels)
        skF.check_input_matches("SparseConv2d", x, self.weight, self.bias)
        if not torch.compiler.is_compiling():
            self._sync()
        plan = self._take_plan()
        return skF.sparse_conv2d_core(x, self._values(), self._kernel_mask(plan), self.bias,
                                      self._topo_tensors(), self.block_size, self.stride,
                                      self.padding, self.dilation, self.groups, self.padding_mode,
                                      plan, who="SparseConv2d")

    @classmethod
    def from_dense(cls, module: nn.Conv2d, *, sparsity: float, block_size=(1, 1),
                   layout: str = "dense", init: str = "magnitude",
                   seed: Optional[int] = None) -> "SparseConv2d":
        """A ``SparseConv2d`` with ``module``'s arguments, weights and bias, masked to
        ``sparsity`` (``init`` and ``seed`` as :meth:`SparseLinear.from_dense`)."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense: module must be an nn.Conv2d, got "
                            f"{type(module).__name__}")
        return cls._from_dense(module, _conv_args(module), sparsity, block_size, layout, init, seed)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same arguments holding ``W ⊙ mask`` and the bias."""
        w = self.dense_weight().detach()
        conv = nn.Conv2d(**_conv_args(self), device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else \
                f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return f"{s}, {self._sparse_repr()}"
