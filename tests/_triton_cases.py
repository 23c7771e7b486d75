"""Shared inputs for the Triton backend tests (run under ``TRITON_INTERPRET=1`` on CPU; on a GPU
without the interpreter they run on CUDA tensors).

The interpreter costs ~4 ms per tl op sequence per program iteration, so cases stay at a few
tiles: batch 13, weight 67 x 45, 32-wide tiles.
"""
from __future__ import annotations

import os

import pytest
import torch

from sparsekern import reference as ref
from sparsekern.topology import build_topology, expand_blocks, grid_shape

kernels = pytest.importorskip("sparsekern.kernels", reason="triton backend unavailable")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover - depends on the machine
    pytest.skip("Triton tests need TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

B, M, K = 13, 67, 45
BLOCKS = [(1, 1), (16, 16), (3, 5), (32, 16)]
SPARSITIES = [0.0, 0.9, 1.0]


def ints(*shape, dtype=torch.float32, gen=None):
    """Small integers as floats: every product and sum is exact in any order (exact asserts,
    plenty of ties)."""
    return torch.randint(-3, 4, shape, generator=gen).to(dtype).to(DEVICE)


def block_mask(m: int, k: int, bs, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A block-aligned random mask of ``[m, k]`` at about ``sparsity`` (exactly 0 or 1 at the
    ends)."""
    g = torch.Generator().manual_seed(seed)
    bm = torch.rand(grid_shape((m, k), bs), generator=g) >= sparsity
    if sparsity >= 1.0:
        bm[:] = False
    return expand_blocks(bm, bs, (m, k)).to(DEVICE)


def topo_of(mask2d: torch.Tensor, bs) -> list[torch.Tensor]:
    return build_topology(mask2d, tuple(bs)).tensors


def weight(mask2d, bs, layout, dtype=torch.float32, gen=None):
    """Dense-layout weight (dormant entries random, never read) or ``bsr`` values."""
    w = ints(*mask2d.shape, dtype=dtype, gen=gen)
    if layout == "bsr":
        topo = topo_of(mask2d, bs)
        return ref.gather_blocks(w, topo[0], topo[1], *bs).contiguous()
    return w


def score_grid(m, k, bs):
    return (m, k) if tuple(bs) == (1, 1) else grid_shape((m, k), bs)


def assert_same_topk(got, want):
    gi, gs = got
    wi, ws = want
    assert gi.dtype == torch.int64 and gs.dtype == ws.dtype
    assert torch.equal(gi.cpu(), wi.cpu()), f"indices differ:\n{gi}\n{wi}"
    torch.testing.assert_close(gs.cpu(), ws.cpu(), rtol=0, atol=0, equal_nan=True)


def guarded(t: torch.Tensor, pad: int = 7, transpose: bool = False):
    """``(view, buffer, guard_mask)``: ``t``'s values in a NaN-filled larger buffer, as a
    non-contiguous view (every row padded; transposed storage when asked). The guard mask marks
    the buffer entries outside the view."""
    rows, cols = t.shape
    if transpose:
        buf = torch.full((cols + 2 * pad, rows + 2 * pad), float("nan"), dtype=t.dtype,
                         device=t.device)
        view = buf[pad:pad + cols, pad:pad + rows].t()
    else:
        buf = torch.full((rows + 2 * pad, cols + 2 * pad), float("nan"), dtype=t.dtype,
                         device=t.device)
        view = buf[pad:pad + rows, pad:pad + cols]
    view.copy_(t)
    guard = torch.ones_like(buf, dtype=torch.bool)
    if transpose:
        guard[pad:pad + cols, pad:pad + rows] = False
    else:
        guard[pad:pad + rows, pad:pad + cols] = False
    return view, buf, guard
