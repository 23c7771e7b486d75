"""Requests a DST method arms on a layer before the forward of a step that needs more than the
plain backward (``grad_input`` and the active weight gradient).

All indices refer to the layer's 2-D weight view ``[M, K]`` (Linear ``[out, in]``; Conv2d
``[C_out, C_in/groups * kh * kw]``), or to its block grid ``[ceil(M/br), ceil(K/bc)]`` when the
layer's ``block_size`` is not ``(1, 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class GrowRequest:
    """Ask the next backward for the exact top-``k`` growth candidates.

    The score of an entry (block: mean over the block's entries) is ``|G|`` plus, when
    ``counter`` is given, ``bonus_scale / (counter + eps)`` (DST-EE). ``G`` is the dense
    candidate gradient of the weight, never materialised by a kernel backend.

    Args:
        k: number of candidates (entries, or blocks for block masks).
        exclude: bool on the 2-D view (or block grid): entries that may not be chosen.
            ``None`` excludes the currently active entries.
        counter: int tensor of the same shape as ``exclude`` (DST-EE's activation counts).
        bonus_scale: ``c · ln t`` of DST-EE.
        eps: DST-EE's ``ε``.

    The request stays armed until the layer's ``grow_candidates`` is read (a DST method reads
    it in ``step()``); every backward until then counts, so the candidates rank
    ``G = Σ dyᵀx`` over all micro-batches of gradient accumulation and all calls of a layer used
    more than once, the gradient the optimizer step uses. Then ``grow_candidates =
    (flat_indices int64 [k], scores [k])``, descending, ties to the lower flat index.
    """

    k: int
    exclude: Optional[Tensor] = None
    counter: Optional[Tensor] = None
    bonus_scale: float = 0.0
    eps: float = 1.0


@dataclass
class CandidateRequest:
    """BiDST: every backward while armed fills ``layer.scores.grad`` with
    ``dψ = G⊙W − lam·φ(G)`` on ``candidates`` (bool, 2-D view, active ∪ search space) and 0
    elsewhere, from one SDDMM over the candidate pattern. Stays armed until cleared."""

    candidates: Tensor
    lam: float = 1e-4
    phi: str = "sq_active"
