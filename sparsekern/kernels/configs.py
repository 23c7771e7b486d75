"""Tile shapes and launch configurations of the Triton kernels, from functions (no tables to
keep in sync). Under ``TRITON_INTERPRET=1`` every kernel gets one config (multi-config autotune
needs a GPU driver) and 32-wide tiles (the interpreter costs ~4 ms per program iteration
whatever the tile size, so tests stay small).

Two ways to walk a weight ``[M, K]`` with mask blocks ``br x bc``:

* **block path** (``br, bc`` in 16/32/64/128): a kernel tile is one mask block, the topology's
  CSR/CSC lists are the loop, the ``bsr`` values are addressed by slot.
* **tile path** (any other block size, ``(1, 1)`` included): a kernel tile holds
  ``tmb x tkb`` whole blocks (its element extent padded to a power of two >= 16); a per-call
  flag per tile (from the topology, no host sync) says whether it holds an active block, and
  inactive tiles are skipped. Block sizes whose tile would pass 128 elements are not run by
  Triton (the launchers fall back to the reference).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_PATH_SIZES = (16, 32, 64, 128)
MAX_EXTENT = 128
HIST_BITS = 11  # radix digit width of the top-k select: 2048 bins (a multiple of 32)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Tiling:
    """How kernels tile the 2-D weight view. ``rt x ct`` elements (``tmb x tkb`` whole blocks) per
    tile, held in a ``pm x pk`` power-of-two register tile; top-k scores of a block-masked tile
    live in an ``sm x sk`` tile (one entry per block)."""

    br: int
    bc: int
    tmb: int
    tkb: int
    pm: int
    pk: int
    block_path: bool

    @property
    def rt(self) -> int:
        return self.tmb * self.br

    @property
    def ct(self) -> int:
        return self.tkb * self.bc

    @property
    def unit(self) -> bool:
        return self.br == 1 and self.bc == 1

    @property
    def sm(self) -> int:
        """Rows of the score tile (entries for ``(1, 1)``, else blocks, padded to >= 16)."""
        return self.pm if self.unit else max(16, next_pow2(self.tmb))

    @property
    def sk(self) -> int:
        return self.pk if self.unit else max(16, next_pow2(self.tkb))

    def grid(self, m: int, k: int) -> tuple[int, int]:
        """Number of tile rows and tile columns over an ``[m, k]`` matrix."""
        return triton.cdiv(m, self.rt), triton.cdiv(k, self.ct)

    def constexprs(self) -> dict:
        return dict(BR=self.br, BC=self.bc, RT=self.rt, CT=self.ct, PM=self.pm, PK=self.pk)


def tile_target() -> int:
    return 32 if INTERPRET else 64


def tiling(br: int, bc: int, *, allow_block_path: bool = True,
           target: Optional[int] = None) -> Optional[Tiling]:
    """The tiling for mask blocks ``br x bc``, or None when Triton does not run it."""
    target = target or tile_target()
    if allow_block_path and br in BLOCK_PATH_SIZES and bc in BLOCK_PATH_SIZES:
        return Tiling(br, bc, 1, 1, br, bc, True)

    def axis(b: int) -> tuple[int, int]:
        per = max(1, target // b)
        return per, max(16, next_pow2(per * b))

    (tmb, pm), (tkb, pk) = axis(br), axis(bc)
    if pm > MAX_EXTENT or pk > MAX_EXTENT:
        return None
    return Tiling(br, bc, tmb, tkb, pm, pk, False)


# --------------------------------------------------------------------------- dtypes
def dot_dtype(*dtypes: torch.dtype):
    """The ``tl.dot`` operand type: the inputs' own half type when they agree, else fp32.
    Under the interpreter bf16 goes to the dot as fp32 (its ``tl.dot`` multiplies bf16's raw
    uint16 bit patterns; bf16 products are exact in fp32, so the emulation is faithful)."""
    import triton.language as tl

    first = dtypes[0]
    if all(d == first for d in dtypes):
        if first == torch.float16:
            return tl.float16
        if first == torch.bfloat16 and not INTERPRET:
            return tl.bfloat16
    return tl.float32


def dot_precision() -> str:
    """fp32 operands: TF32 when torch allows it for matmuls, else 3xTF32 (about fp32 accuracy on
    tensor cores). Half operands ignore it."""
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the buffer a kernel writes an output of ``dtype`` into. Under the interpreter
    bf16 outputs are written in fp32 and rounded by torch: the interpreter's fp32 -> bf16 cast
    truncates where the GPU rounds to nearest even."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


# --------------------------------------------------------------------------- launch configs
def _cfg(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def spmm_configs() -> list[triton.Config]:
    """Batch-tile sizes for the forward / grad_input kernels (block sizes fix the other dims);
    :func:`prune_spmm` keeps the ones that suit the weight tile."""
    if INTERPRET:
        return [_cfg(4, 1, BM=32)]
    return [_cfg(4, 3, BM=32), _cfg(4, 3, BM=64), _cfg(8, 3, BM=32), _cfg(8, 3, BM=64),
            _cfg(8, 3, BM=128)]


def prune_spmm(configs, named_args, **kwargs):
    """Register-heavy variants get 8 warps and batch tiles <= 64: weight tiles of 128 x 128
    (staged through registers), per-element slot searches (``bsr`` on the tile path) and conv
    gathers. Other variants get the rest."""
    meta = {**named_args, **kwargs}
    heavy = (meta["PM"] * meta["PK"] >= 128 * 128 or meta["W_MODE"] == 2
             or meta.get("CONV", False))
    if heavy:
        keep = [c for c in configs if c.num_warps == 8 and c.kwargs["BM"] <= 64]
    else:
        keep = [c for c in configs if not (c.num_warps == 8 and c.kwargs["BM"] == 32)]
    return keep or configs[:1]


def sddmm_block_configs() -> list[triton.Config]:
    """Reduction chunk over the batch (pixels for conv) for the per-block SDDMM kernel;
    :func:`prune_by_block` picks the warp count from the block size."""
    if INTERPRET:
        return [_cfg(4, 1, BP=32)]
    return [_cfg(4, 3, BP=32), _cfg(4, 3, BP=64), _cfg(8, 3, BP=32), _cfg(8, 3, BP=64)]


def prune_by_block(configs, named_args, **kwargs):
    """8 warps for blocks of 64 x 64 and up, 4 below."""
    meta = {**named_args, **kwargs}
    warps = 8 if meta["BR"] * meta["BC"] >= 64 * 64 else 4
    return [c for c in configs if c.num_warps == warps] or configs[:1]


def conv_dgrad_configs() -> list[triton.Config]:
    """Pixel-tile sizes for the conv grad_input kernel."""
    if INTERPRET:
        return [_cfg(4, 1, BP=128)]
    return [_cfg(8, 2, BP=64), _cfg(8, 2, BP=128)]


def conv_dgrad_channels(cin_g: int, cout_g: int) -> tuple[int, int]:
    """(output-channel step, input-channel tile) of the conv grad_input kernel: the ``dy`` gather
    is ``pixels x TCO`` 64-bit pointers, so TCO stays <= 32."""
    return min(32, max(16, next_pow2(cout_g))), min(64, max(16, next_pow2(cin_g)))


def wgrad_config(t: Tiling) -> dict:
    """The one launch config of the weight-side tile kernel. Not autotuned: every pass of the
    top-k select must recompute bit-identical scores, so all passes share this config."""
    if INTERPRET:
        return dict(BP=32, num_warps=4, num_stages=1)
    return dict(BP=32, num_warps=8 if t.pm * t.pk >= 64 * 64 else 4, num_stages=2)


def topk_capacity(k: int, buffer: Optional[int] = None) -> int:
    """Candidate buffer of the top-k select: ``k`` plus room for the boundary bucket. A bucket
    that does not fit costs one more recomputation pass (a finer radix digit)."""
    extra = max(4096, k) if buffer is None else buffer
    return k + extra
