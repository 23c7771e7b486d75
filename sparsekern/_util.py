"""Small helpers shared by the production modules: the accumulation dtype, the exact top-k tie
rule, convolution output size and argument parsing. (``sparsekern.reference`` keeps its own
copies: the oracle shares no code with what it checks.)"""
from __future__ import annotations

import math

import torch
from torch import Tensor

#: forms of BiDST's mask-score regulariser ``φ`` (see ``reference.psi_grad``)
PHI_CHOICES = ("sq_active", "abs", "signed")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stable_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of a 1-D tensor: descending, NaN highest, ties to the lower index.
    Returns ``(indices, values)``."""
    s = scores + 0.0
    key = torch.where(torch.isnan(s), torch.full_like(s, math.inf), s)
    nan_first = torch.isnan(s).to(torch.int8)
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(nan_first[order], descending=True, stable=True)]
    idx = order[:k]
    return idx, s[idx]


def psi_grad(g: Tensor, w: Tensor, active: Tensor, candidates: Tensor, lam: float,
             phi: str) -> Tensor:
    """BiDST's mask-score gradient ``dψ = G⊙W − λ·φ(G)`` on the candidate set, 0 elsewhere.

    ``φ``: ``"sq_active"`` = ``M⊙G²``, ``"abs"`` = ``|G|``, ``"signed"`` = ``G``.
    """
    if phi == "sq_active":
        reg = g * g * active
    elif phi == "abs":
        reg = g.abs()
    elif phi == "signed":
        reg = g
    else:
        raise ValueError(f"psi_grad: phi must be one of {PHI_CHOICES}, got {phi!r}")
    return torch.where(candidates, g * w - lam * reg, torch.zeros_like(g))


def conv_out_hw(hw, kernel, stride, padding, dilation) -> list[int]:
    """Output height and width of a convolution."""
    return [(hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
            for i in range(2)]


def as_pair(v, name: str, who: str, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints, each ``>= minimum``, as a pair (``TypeError`` when ``v`` is
    not an int or a pair, ``ValueError`` when an entry is out of range; both name ``who`` and
    ``name``)."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise TypeError(f"{who}: {name} must be an int or a pair of ints, got {v!r}") from None
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= minimum for t in (a, b)):
        raise ValueError(f"{who}: {name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return int(a), int(b)


def check_block_size(block_size, who: str) -> tuple[int, int]:
    """``block_size`` as a pair of positive ints."""
    return as_pair(block_size, "block_size", who)
