"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is masked and truly sparse."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as skF
from .base import SparseModule, check_sparsity


class SparseLinear(SparseModule):
    """``y = x @ (W ⊙ mask)ᵀ + b`` over the last dimension of ``x`` (as ``nn.Linear``).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        sparsity: fraction of inactive entries (blocks when ``block_size != (1, 1)``) of the
            initial random mask (global RNG); exactly ``n - floor(sparsity·n)`` stay active.
            The weight is drawn as ``nn.Linear``'s (kaiming uniform) and zeroed off the mask
            (``bsr``: only the stored blocks are drawn, no dense weight is built).
        block_size: ``(br, bc)`` granularity of the mask on the ``[out, in]`` weight.
        layout: ``"dense"`` (``weight`` is ``[out, in]``) or ``"bsr"`` (``weight`` stores the
            active blocks, ``[nnzb, br, bc]``; the mask must be block-aligned).

    Attributes:
        weight, bias, mask (bool ``[out, in]``: a buffer for ``dense``, built on read from the
        ``block_mask`` buffer ``[ceil(out/br), ceil(in/bc)]`` for ``bsr``, which holds no
        ``M·K`` tensor), block_size, layout, sparsity, density,
        mask_version, topology, grow_candidates, scores (after :meth:`enable_scores`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 sparsity: float = 0.0, block_size=(1, 1), layout: str = "dense",
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SparseLinear: {name} must be a positive int, got {v!r}")
        check_sparsity(sparsity, "SparseLinear")
        self.in_features = in_features
        self.out_features = out_features
        self._dense_shape = (out_features, in_features)
        self._factory = {"device": device, "dtype": dtype}
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._init_sparse_params(sparsity, block_size, layout)

    def forward(self, x: Tensor) -> Tensor:
        skF.check_linear_input("SparseLinear", x, self.in_features)
        skF.check_input_matches("SparseLinear", x, self.weight, self.bias)
        if not torch.compiler.is_compiling():
            self._sync()
        plan = self._take_plan()
        return skF.sparse_linear_core(x, self._values(), self._kernel_mask(plan), self.bias,
                                      self._topo_tensors(), self.block_size, plan)

    @classmethod
    def from_dense(cls, module: nn.Linear, *, sparsity: float, block_size=(1, 1),
                   layout: str = "dense", init: str = "magnitude",
                   seed: Optional[int] = None) -> "SparseLinear":
        """A ``SparseLinear`` holding ``module``'s weights and bias, masked to ``sparsity``:
        ``init="magnitude"`` keeps the largest ``|W|`` (block means for blocks; ties to the
        lower index), ``"random"`` draws the mask uniformly (``seed`` seeds a private
        generator; the global RNG when None). Weights off the mask are zeroed."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: module must be an nn.Linear, got "
                            f"{type(module).__name__}")
        args = dict(in_features=module.in_features, out_features=module.out_features,
                    bias=module.bias is not None)
        return cls._from_dense(module, args, sparsity, block_size, layout, init, seed)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding ``W ⊙ mask`` and the bias."""
        w = self.dense_weight().detach()
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._sparse_repr()}")
