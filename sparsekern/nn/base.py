"""Machinery shared by :class:`~sparsekern.nn.SparseLinear` and
:class:`~sparsekern.nn.SparseConv2d`: mask and layout handling, the cached topology, slot reuse
for the ``bsr`` layout, requests from DST methods, BiDST's mask scores and ``state_dict``.

A layer's weight is viewed as a 2-D matrix ``[M, K]`` (Linear ``[out, in]``; Conv2d
``[C_out, C_in/groups * kh * kw]``). The mask says which entries are active.

``layout="dense"``: ``weight`` has the nn layer's weight shape; entries outside the mask are
dormant (ignored by every op, their gradient is 0). The layer's ``state_dict`` keeps them (a
checkpoint resumes bit for bit, and a method may revive them), so it is not an export for a
plain model: ``sparsekern.densify`` (or ``to_dense()``) gives the ``nn`` layer holding
``W ⊙ mask``, dormant values zeroed, and :meth:`SparseModule.to_sparse_bsr` a
``torch.sparse_bsr_tensor``.
``layout="bsr"``: ``weight`` is ``[capacity, br, bc]``, one *physical slot* per stored block.
``slot_map[p]`` is the physical slot of the ``p``-th active block in row-major (CSR) order, so a
topology change can put grown blocks into the slots of dropped ones: the parameter keeps its
shape and optimizer state stays valid for every block that stayed.

Memory: a ``dense`` layer holds ``mask``, a bool buffer of the nn layer's weight shape. A ``bsr``
layer holds no tensor of ``M·K`` entries (masks are constant on blocks): its buffer is
``block_mask`` (bool ``[ceil(M/br), ceil(K/bc)]``, the block grid), it is built without a dense
weight (only the stored blocks are drawn) and its ``state_dict`` is ``weight``, ``block_mask``,
``slot_map`` (a checkpoint holding a dense ``mask`` instead still loads). ``mask`` is then a
read-only property that materialises the ``W``-shaped bool mask on every read (for inspection
and export; edits of it are lost: use :meth:`SparseModule.set_mask` or edit ``block_mask``).
Use :meth:`SparseModule.unit_mask` for the mask on the unit grid.

``device="meta"``: a layer holds shapes only (as many stored blocks as the sparsity keeps);
``to_empty(device=...)`` then ``reset_parameters()`` draws its mask (global RNG) and weights.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .._util import PHI_CHOICES, acc_dtype, check_block_size, stable_topk
from ..autograd import CandidateSpec, GrowSpec, GrowthStash, RequestPlan, stash_topk
from ..topology import (Topology, block_entries, block_reduce, block_reduce_any, block_values,
                        build_topology, expand_blocks, gather_blocks, grid_shape, meta_topology,
                        random_block_mask, scatter_blocks, topology_from_block_mask)
from .request import CandidateRequest, GrowRequest

LAYOUTS = ("dense", "bsr")
INITS = ("magnitude", "random")
_TOPO_NAMES = ("row_ptr", "col_idx", "col_ptr", "row_idx", "slot_t")


# --------------------------------------------------------------------------- validation helpers
def check_sparsity(sparsity, who: str) -> float:
    """``sparsity`` as a float in ``[0, 1]``; raises ``ValueError`` naming the argument."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{who}: sparsity must be a float in [0, 1], got {sparsity!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"{who}: sparsity must be in [0, 1], got {sparsity!r}")
    return float(sparsity)


def check_layout(layout, who: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{who}: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def keep_count(n: int, sparsity: float) -> int:
    """Entries (or blocks) kept active out of ``n`` at ``sparsity``: ``n - floor(sparsity·n)``
    (a product within 1e-9 relative of an integer counts as that integer)."""
    v = sparsity * n
    r = round(v)
    zeros = r if abs(v - r) <= 1e-9 * max(1.0, abs(v)) else math.floor(v)
    return int(min(max(n - zeros, 0), n))


def is_block_aligned(mask2d: Tensor, block_size: tuple[int, int]) -> bool:
    """Whether ``mask2d`` is constant on each ``br × bc`` block (ragged edges: their true size)."""
    if tuple(block_size) == (1, 1):
        return True
    full = expand_blocks(block_reduce_any(mask2d, block_size), block_size, tuple(mask2d.shape))
    return bool(torch.equal(full, mask2d))


def random_mask(shape2d: tuple[int, int], block_size: tuple[int, int], sparsity: float,
                generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """Bool ``[M, K]`` mask with exactly ``keep_count(n, sparsity)`` active entries (blocks when
    ``block_size != (1, 1)``), drawn uniformly without replacement (CPU ``generator``, or the
    global RNG when ``None``)."""
    grid = grid_shape(shape2d, block_size)
    bmask = random_block_mask(grid, keep_count(grid[0] * grid[1], sparsity), generator)
    return expand_blocks(bmask, block_size, tuple(shape2d)).to(device)


def magnitude_mask(w2d: Tensor, block_size: tuple[int, int], sparsity: float,
                   grid: bool = False) -> Tensor:
    """Bool mask keeping the ``keep_count`` largest ``|W|`` entries (block mean of ``|W|`` by
    true block size for blocks); ties to the lower flat index. ``grid=True`` returns it on the
    block grid (not expanded to ``[M, K]``)."""
    score = w2d.detach().abs().to(acc_dtype(w2d.dtype))
    if tuple(block_size) != (1, 1):
        score = block_reduce(score, block_size, "mean")
    idx, _ = stable_topk(score.flatten(), keep_count(score.numel(), sparsity))
    bmask = torch.zeros(score.numel(), dtype=torch.bool, device=w2d.device)
    bmask[idx] = True
    if grid:
        return bmask.view(score.shape)
    return expand_blocks(bmask.view(score.shape), block_size, tuple(w2d.shape))


def _in_matrix(blocks: Tensor, nbc: int, block_size, shape2d) -> Tensor:
    """``[len(blocks), br, bc]`` bool: which entries of each (flat-indexed) block lie inside
    the ``[M, K]`` matrix (ragged edge blocks are partly outside)."""
    br, bc = block_size
    m, k = shape2d
    rows = (blocks // nbc)[:, None] * br + torch.arange(br, device=blocks.device)
    cols = (blocks % nbc)[:, None] * bc + torch.arange(bc, device=blocks.device)
    return (rows < m)[:, :, None] & (cols < k)[:, None, :]


def full_tensor(t: Tensor) -> Tensor:
    """``t`` itself, or the whole tensor of a ``DTensor`` (FSDP2's sharded parameters, their
    gradients and optimizer state; an all-gather every rank must join)."""
    return t.full_tensor() if callable(getattr(t, "full_tensor", None)) else t


def local_rows(t: Tensor) -> tuple[Tensor, int]:
    """``(local tensor, first row)``: the part of ``t`` this process holds (a ``DTensor``
    sharded on dim 0, as FSDP2 shards) and the global index of its first row; ``(t, 0)`` for a
    plain tensor."""
    if not callable(getattr(t, "to_local", None)):
        return t, 0
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if any(not p.is_replicate() and p != Shard(0) for p in t.placements):
        raise NotImplementedError(f"sparsekern: a DTensor sharded as {t.placements} is not "
                                  f"supported (only Shard(0), as FSDP2's fully_shard)")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), int(offset[0])


def _no_fused_fast_path(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing. ``nn.TransformerEncoderLayer`` skips its fused
    inference fast path (``torch._transformer_encoder_layer_fwd``, which reads ``linear1.weight``
    and ``linear2.weight`` as dense matrices) when any submodule has a hook: a sparse layer holds
    dormant values (``dense``) or block values (``bsr``) there, so it must not be taken."""
    return None


# --------------------------------------------------------------------------- the base module
class SparseModule(nn.Module):
    """Base of the sparse layers. Subclasses set ``self._dense_shape`` (the nn layer's weight
    shape) and call :meth:`_setup_sparse`."""

    _dense_shape: tuple[int, ...]

    # ----------------------------------------------------------------- construction
    def _setup_sparse(self, weight: Optional[Tensor], mask: Optional[Tensor], sparsity: float,
                      block_size, layout: str) -> None:
        """Install a mask and weights in the requested layout.

        Args:
            weight: a dense-shaped weight (entries off the mask are zeroed), or None for
                ``bsr``: the stored blocks are drawn as the nn layer draws its weight (kaiming
                uniform, bound ``1/sqrt(fan_in)``) and no dense weight is built.
            mask: bool, the weight's shape, its 2-D view or (``bsr``) the block grid; None
                draws one at ``sparsity`` from the global RNG.
        """
        who = type(self).__name__
        self.block_size = check_block_size(block_size, who)
        self.layout = check_layout(layout, who)
        if _no_fused_fast_path not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_no_fused_fast_path)
        kw = (self._factory if weight is None
              else {"device": weight.device, "dtype": weight.dtype})
        dev = torch.empty(0, device=kw["device"]).device
        meta = dev.type == "meta"
        self.mask_version = 0
        self._grow_request: Optional[GrowRequest] = None
        self._grow_stash = GrowthStash()
        self._grow_result: Optional[tuple[Tensor, Tensor]] = None
        self._candidate_request: Optional[CandidateRequest] = None
        self._weight_grad_unused = False
        self._candidate_cache = None
        self._grad_scale_fn = None  # set by a DST method under a GradScaler: the current scale
        self._psi_grad_scale = 1.0
        if "scores" not in self._parameters:
            self.register_parameter("scores", None)
        self._buffers.pop("mask", None)
        self._buffers.pop("block_mask", None)
        grid = grid_shape(self.shape2d, self.block_size)
        keep = keep_count(grid[0] * grid[1], check_sparsity(sparsity, who))
        self._pending_sparsity = sparsity if meta and mask is None else None
        if self.layout == "dense":
            if weight is None:
                weight = self._dense_init()
            mask2d = (random_mask(self.shape2d, self.block_size, sparsity, None, dev)
                      if mask is None else self._check_mask(mask.to(dev)))
            self.register_buffer("mask", mask2d.reshape(self._dense_shape).clone())
            topo = (meta_topology(self.shape2d, self.block_size, keep) if meta
                    else build_topology(mask2d, self.block_size))
            w2d = weight.detach().reshape(self.shape2d) * mask2d
            self.weight = nn.Parameter(w2d.reshape(self._dense_shape).clone())
            self.register_buffer("slot_map", None)
        else:
            if meta:
                topo = meta_topology(self.shape2d, self.block_size, keep)
                bm = topo.block_mask
            else:
                bm = (random_block_mask(grid, keep) if mask is None
                      else self._check_mask(mask)).to(dev)
                topo = topology_from_block_mask(bm, self.shape2d, self.block_size)
            self.register_buffer("block_mask", bm.clone())
            if meta:
                values = torch.empty(topo.nnzb, *self.block_size, **kw)
            elif weight is None:
                values = self._draw_blocks(bm, kw)
            else:
                rows, cols = bm.nonzero(as_tuple=True)
                values = block_values(weight.detach().reshape(self.shape2d), rows, cols,
                                      self.block_size)
            self.weight = nn.Parameter(values)
            self.register_buffer("slot_map", torch.arange(topo.nnzb, device=dev))
        self._set_topology(topo)

    def _draw_blocks(self, bm: Tensor, kw: dict) -> Tensor:
        """``[nnzb, br, bc]`` values of the active blocks of ``bm`` (CSR order) drawn as
        ``nn.Linear``/``nn.Conv2d`` draw their weight: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
        (kaiming uniform with ``a=sqrt(5)``); 0 outside the matrix on ragged edge blocks."""
        fan_in = self.shape2d[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        blocks = bm.flatten().nonzero().flatten()
        out = torch.empty(blocks.numel(), *self.block_size, **kw).uniform_(-bound, bound)
        (m, k), (br, bc), nbc = self.shape2d, self.block_size, bm.shape[1]
        edge = ((blocks // nbc + 1) * br > m) | ((blocks % nbc + 1) * bc > k)
        if bool(edge.any()):  # ragged edge blocks: 0 outside the matrix
            pos = edge.nonzero().flatten()
            out[pos] *= _in_matrix(blocks[pos], nbc, self.block_size, self.shape2d)
        return out

    @property
    def shape2d(self) -> tuple[int, int]:
        """The weight's 2-D view ``(M, K)``."""
        return self._dense_shape[0], math.prod(self._dense_shape[1:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The nn layer's weight shape (``[out, in]`` or ``[C_out, C_in/groups, kh, kw]``)."""
        return tuple(self._dense_shape)

    @property
    def mask(self) -> Tensor:
        """Bool mask of the nn layer's weight shape. ``dense``: the buffer. ``bsr``: built from
        ``block_mask`` on every read (``M·K`` bytes; for inspection and export only, edits of it
        are lost: use :meth:`set_mask`)."""
        b = self.__dict__.get("_buffers", {})
        if "mask" in b:
            return b["mask"]
        if "block_mask" in b:
            return expand_blocks(b["block_mask"], self.block_size,
                                 self.shape2d).reshape(self._dense_shape)
        raise AttributeError(f"{type(self).__name__} has no mask yet")

    def unit_mask(self) -> Tensor:
        """A copy of the mask on the unit grid: the 2-D weight view ``[M, K]`` when
        ``block_size == (1, 1)``, else the block grid ``[nbr, nbc]`` (blocks holding an active
        entry). For ``bsr`` no ``M·K`` tensor is involved."""
        if self.layout == "bsr":
            return self.block_mask.clone()
        m2 = self.mask.reshape(self.shape2d)
        return m2.clone() if self.block_size == (1, 1) else block_reduce_any(m2, self.block_size)

    @torch.no_grad()
    def unit_magnitude(self, values: Optional[Tensor] = None) -> Tensor:
        """Mean ``|V ⊙ mask|`` per unit of :meth:`unit_mask`'s grid for ``V`` the weight (or
        ``values``, shaped like it, e.g. its gradient): block mean by true block size, in the
        accumulation dtype, 0 on inactive units. For ``bsr`` it is computed from the stored
        blocks (no dense tensor)."""
        values = self.weight if values is None else values
        acc = acc_dtype(values.dtype)
        if self.layout == "dense":
            w = (self.values_to_dense(values.detach()) * self.mask).reshape(self.shape2d)
            w = w.abs().to(acc)
            return block_reduce(w, self.block_size, "mean") if self.block_size != (1, 1) else w
        vals = full_tensor(values.detach())
        (m, k), (br, bc) = self.shape2d, self.block_size
        grid = grid_shape(self.shape2d, self.block_size)
        out = torch.zeros(grid[0] * grid[1], dtype=acc, device=vals.device)
        blocks = self._topo_block_mask.flatten().nonzero().flatten()
        slots = self.slot_map.to(vals.device)
        sums = torch.linalg.vector_norm(vals, 1, dim=(1, 2), dtype=acc)[slots]
        rows, cols = blocks // grid[1], blocks % grid[1]
        edge = ((rows + 1) * br > m) | ((cols + 1) * bc > k)  # ragged: count what is inside
        if bool(edge.any()):
            pos = edge.nonzero().flatten()
            inside = _in_matrix(blocks[pos], grid[1], self.block_size, self.shape2d)
            sums[pos] = (vals[slots[pos]].abs().to(acc) * inside).sum(dim=(1, 2))
        size = (torch.clamp(m - rows * br, max=br) * torch.clamp(k - cols * bc, max=bc))
        out[blocks] = sums / size.to(acc)
        return out.view(grid)

    def _mask_src(self) -> Tensor:
        """The buffer that holds the mask: ``mask`` (dense) or ``block_mask`` (bsr)."""
        return self._buffers["mask" if self.layout == "dense" else "block_mask"]

    def _check_mask(self, mask) -> Tensor:
        """Validate a mask (the weight's dense shape, its 2-D view, or the block grid) and
        return it in the layout's form: 2-D ``[M, K]`` for ``dense``, the block grid for
        ``bsr``."""
        who = type(self).__name__
        if not isinstance(mask, Tensor):
            raise TypeError(f"{who}: mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{who}: mask must be a bool tensor, got dtype {mask.dtype}")
        grid = grid_shape(self.shape2d, self.block_size)
        shape = tuple(mask.shape)
        if shape == grid and shape != tuple(self.shape2d):
            if self.layout == "bsr":
                return mask
            return expand_blocks(mask, self.block_size, self.shape2d)
        if shape not in (tuple(self._dense_shape), tuple(self.shape2d)):
            alt = f" (or the block grid {grid})" if self.block_size != (1, 1) else ""
            raise ValueError(f"{who}: mask must have shape {tuple(self._dense_shape)}{alt}, "
                             f"got {shape}")
        mask2d = mask.reshape(self.shape2d)
        if self.layout == "dense" or self.block_size == (1, 1):
            return mask2d
        if not is_block_aligned(mask2d, self.block_size):
            raise ValueError(f"{who}: mask must be block-aligned for layout='bsr' (constant on "
                             f"each {self.block_size} block of the {self.shape2d} weight view)")
        return block_reduce_any(mask2d, self.block_size)

    # ----------------------------------------------------------------- topology
    def _set_topology(self, topo: Topology) -> None:
        for name, t in zip(_TOPO_NAMES, topo.tensors):
            self.register_buffer(f"_topo_{name}", t, persistent=False)
        self.register_buffer("_topo_block_mask", topo.block_mask, persistent=False)
        self._mask_seen = self._mask_src()._version
        self._slots_identity = (self.slot_map is None or self.slot_map.is_meta or (
            self.slot_map.numel() == self.weight.shape[0]
            and bool(torch.equal(self.slot_map, torch.arange(self.slot_map.numel(),
                                                             device=self.slot_map.device)))))

    @property
    def topology(self) -> Topology:
        """The cached topology of the mask (rebuilt by :meth:`set_mask`, never per step).
        Read-only: its index tensors are the cached ones (``block_mask`` is a copy)."""
        return Topology(self.shape2d, self.block_size, self._topo_block_mask.clone(),
                        *[getattr(self, f"_topo_{n}") for n in _TOPO_NAMES])

    def _topo_tensors(self) -> list[Tensor]:
        return [getattr(self, f"_topo_{n}") for n in _TOPO_NAMES]

    def _sync(self) -> None:
        """Eager only: pick up in-place edits of ``self.mask`` (``block_mask`` for ``bsr``;
        e.g. by ``load_state_dict`` or a broadcast) that bypassed :meth:`set_mask`."""
        src = self._mask_src()
        if src._version == self._mask_seen:
            return
        if self.layout == "bsr":
            bm = src
        else:
            bm = block_reduce_any(src.reshape(self.shape2d), self.block_size)
        self.mask_version += 1
        self._candidate_cache = None
        if torch.equal(bm, self._topo_block_mask):
            self._mask_seen = src._version
        else:
            with torch.no_grad():
                self._install(src.reshape(self.shape2d).clone() if self.layout == "dense"
                              else bm.clone(), bump=False)

    # ----------------------------------------------------------------- masks
    @torch.no_grad()
    def set_mask(self, mask: Tensor, units: Optional[Tensor] = None) -> Tensor:
        """Validate and install a new mask; rebuilds the topology and bumps ``mask_version``.

        Args:
            mask: bool, the weight's dense shape (or, for Conv2d, its 2-D view), or the block
                grid ``[ceil(M/br), ceil(K/bc)]`` (the form that needs no ``M·K`` tensor). For
                ``layout="bsr"`` a dense-shaped mask must be block-aligned.
            units: optional int64 sorted flat indices of the new mask's active units on
                :meth:`unit_mask`'s grid, for a caller that holds them (a DST update): the
                topology is built from them instead of a pass over the grid that finds them
                (checked against ``mask``).

        Returns:
            bool tensor shaped like ``self.weight``: entries that became active and were not
            active before. For ``bsr`` those are the reused (or new) slots, whose values are set
            to 0; slots of kept blocks are untouched. For ``dense`` the weights are not changed
            (a DST method zeroes grown entries if its rule says so).
        """
        mask = self._check_mask(mask).to(self._mask_src().device)
        if self._mask_src()._version != self._mask_seen:
            self._sync()
        return self._install(mask, units=units)

    def _install(self, mask: Tensor, bump: bool = True, units: Optional[Tensor] = None) -> Tensor:
        """Install ``mask`` in the layout's form (2-D for ``dense``, block grid for ``bsr``)."""
        if units is not None:
            units = units.to(mask.device)
        if self.layout == "dense":
            old2d = self.mask.reshape(self.shape2d)
            newly = (mask & ~old2d).reshape(self._dense_shape)
            topo = build_topology(mask, self.block_size, units)
            self.mask.copy_(mask.reshape(self._dense_shape))
        else:
            newly, topo = self._reassign_slots(mask, units)
            self.block_mask.copy_(mask)
        if bump:
            self.mask_version += 1
        self._candidate_cache = None
        self._set_topology(topo)
        return newly

    def _reassign_slots(self, new_bm: Tensor,
                        units: Optional[Tensor] = None) -> tuple[Tensor, Topology]:
        """``bsr``: kept blocks keep their slots, grown blocks take the lowest free slots
        (the parameter grows only when more blocks are active than it has slots)."""
        topo = topology_from_block_mask(new_bm, self.shape2d, self.block_size, units)
        nbr, nbc = new_bm.shape
        dev = self.weight.device
        old_flat = self._topo_block_mask.flatten()
        new_flat = new_bm.flatten()
        phys = torch.full((nbr * nbc,), -1, dtype=torch.int64, device=dev)
        phys[old_flat.nonzero().flatten()] = self.slot_map
        cap = self.weight.shape[0]
        used = torch.zeros(cap, dtype=torch.bool, device=dev)
        used[phys[old_flat & new_flat]] = True
        free = (~used).nonzero().flatten()
        grown = (new_flat & ~old_flat).nonzero().flatten()
        if grown.numel() > free.numel():
            extra = grown.numel() - free.numel()
            if callable(getattr(self.weight, "to_local", None)):
                raise NotImplementedError(
                    f"{type(self).__name__}.set_mask: {int(new_flat.sum())} active blocks "
                    f"exceed the {cap} slots of a weight sharded by FSDP2, which cannot grow; "
                    f"keep the number of active blocks at most the slot count")
            warnings.warn(f"{type(self).__name__}.set_mask: {int(new_flat.sum())} active blocks "
                          f"exceed the {cap} slots of weight; it grows to {cap + extra} slots "
                          f"(optimizer state for it must be rebuilt)", stacklevel=3)
            self.weight.data = torch.cat([self.weight.data, self.weight.new_zeros(
                extra, *self.weight.shape[1:])])
            free = torch.cat([free, torch.arange(cap, cap + extra, device=dev)])
        new_slots = free[:grown.numel()]
        phys[grown] = new_slots
        local, r0 = local_rows(self.weight.data)  # reused slots start at 0; unused hold nothing
        rows = torch.zeros(self.weight.shape[0], dtype=torch.bool, device=dev)
        rows[free] = True
        local[rows[r0:r0 + local.shape[0]].to(local.device)] = 0
        newly = torch.zeros(self.weight.shape, dtype=torch.bool, device=dev)
        newly[new_slots] = _in_matrix(grown, nbc, self.block_size, self.shape2d)
        self.slot_map = phys[new_flat.nonzero().flatten() if units is None else units]
        return newly, topo

    @property
    def sparsity(self) -> float:
        """Fraction of inactive entries of the mask."""
        return 1.0 - self.density

    @property
    def density(self) -> float:
        """Fraction of active entries of the mask (``bsr``: from the block grid, ragged edge
        blocks by their true size; on the meta device ``nnzb·br·bc/(M·K)``, at most 1)."""
        n = math.prod(self._dense_shape)
        if self._mask_src().is_meta:
            return min(1.0, self._topo_col_idx.numel() * math.prod(self.block_size) / n)
        if self.layout == "dense":
            return float(self.mask.sum().item()) / n
        return block_entries(self.block_mask, self.shape2d, self.block_size) / n

    # ----------------------------------------------------------------- weights
    def _values(self) -> Tensor:
        """The weight in the form the ops take: dense-shaped, or ``[nnzb, br, bc]`` in topology
        (CSR) order for ``bsr`` (a gather through ``slot_map`` when slots were reused; always
        under ``torch.compile``, so that a mask update never changes what a graph guards on)."""
        if self.slot_map is None or (not torch.compiler.is_compiling()
                                     and self._slots_identity):
            return self.weight
        return self.weight.index_select(0, self.slot_map)

    def _kernel_mask(self, plan: Optional[RequestPlan]) -> Tensor:
        """The mask handed to the ops. A ``bsr`` layer's mask is constant on blocks, so on its
        topology W ⊙ mask is W itself: it passes an all-true view
        (``torch.ones((), dtype=bool).expand(shape)``, no memory), which the C++ kernels
        recognise and then read the blocks in place (the Triton/CUDA launchers copy it). Growth
        requests take it too (their exclusion is the block grid). BiDST's candidate requests
        read the real mask (its ψ gradient needs the active set), so they get it."""
        if self.layout == "bsr" and (plan is None or plan.cand is None):
            return torch.ones((), dtype=torch.bool,
                              device=self.weight.device).expand(self._dense_shape)
        return self.mask

    def values_to_dense(self, values: Tensor) -> Tensor:
        """A tensor shaped like ``self.weight`` (e.g. ``weight.grad``) as a dense tensor of the
        nn layer's weight shape (zero off the stored blocks for ``bsr``). A sharded ``DTensor``
        (FSDP2, between forward and backward) is gathered first (a collective)."""
        values = full_tensor(values)
        if self.layout == "dense":
            return values
        if not self._slots_identity:
            values = values.index_select(0, self.slot_map)
        return scatter_blocks(values, self._topo_row_ptr, self._topo_col_idx,
                              self.shape2d).reshape(self._dense_shape)

    def dense_weight(self) -> Tensor:
        """``W ⊙ mask`` as a dense tensor of the nn layer's weight shape (differentiable; for
        ``bsr`` an ``M·K`` export, which no training path calls)."""
        if self.layout == "bsr":
            return self.values_to_dense(self.weight)
        return self.values_to_dense(self.weight) * self.mask

    @torch.no_grad()
    def to_sparse_bsr(self) -> Tensor:
        """``W ⊙ mask`` on the 2-D weight view ``[M, K]`` as a ``torch.sparse_bsr_tensor`` of
        blocksize ``block_size`` holding the active blocks (a detached copy; ``.to_dense()``
        equals ``dense_weight()`` viewed 2-D). ``M`` and ``K`` must be multiples of the block
        size, as torch's BSR layout requires."""
        br, bc = self.block_size
        m, k = self.shape2d
        if m % br or k % bc:
            raise ValueError(f"{type(self).__name__}.to_sparse_bsr: the weight view {(m, k)} is "
                             f"not a multiple of block_size={self.block_size} (torch's BSR "
                             f"layout has no ragged edge blocks)")
        rows, cols = self._topo_row_ptr, self._topo_col_idx
        if self.layout == "bsr":
            vals = self._values().detach().clone()
        else:
            vals = gather_blocks(self.dense_weight().detach().reshape(m, k), rows, cols,
                                 br, bc)
        return torch.sparse_bsr_tensor(rows.clone(), cols.clone(), vals, size=(m, k),
                                       check_invariants=False)

    def _dense_init(self) -> Tensor:
        """A dense weight drawn as ``nn.Linear``/``nn.Conv2d`` draw theirs (kaiming uniform)."""
        w = self._parameters.get("weight")
        kw = self._factory if w is None else {"device": w.device, "dtype": w.dtype}
        out = torch.empty(self._dense_shape, **kw)
        nn.init.kaiming_uniform_(out, a=math.sqrt(5))
        return out

    def _init_sparse_params(self, sparsity: float, block_size, layout: str) -> None:
        """Constructor tail: kaiming weight masked at random to ``sparsity`` (``bsr``: only the
        stored blocks are drawn, after the mask), then the bias."""
        w = self._dense_init() if layout == "dense" else None
        self._setup_sparse(w, None, sparsity, block_size, layout)
        if self.bias is not None:
            self._init_bias()

    @torch.no_grad()
    def _init_bias(self) -> None:
        if self.bias.is_meta:
            return
        fan_in = self.shape2d[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def _from_dense(cls, module: nn.Module, ctor_args: dict, sparsity: float, block_size,
                    layout: str, init: str, seed: Optional[int]):
        """Shared body of ``from_dense``: build without touching the global RNG, then install
        ``module``'s weights with a magnitude or random mask."""
        who = f"{cls.__name__}.from_dense"
        sparsity = check_sparsity(sparsity, who)
        bs = check_block_size(block_size, who)
        check_layout(layout, who)
        if init not in INITS:
            raise ValueError(f"{who}: init must be one of {INITS}, got {init!r}")
        w = module.weight.detach()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"{who}: seed must be an int or None, got {seed!r}")
        devices = [w.device.index or 0] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            out = cls(**ctor_args, sparsity=sparsity, block_size=bs, layout=layout,
                      device=w.device, dtype=w.dtype)
        if not w.is_meta:  # on meta: shapes only, reset_parameters() draws the mask
            w2d = w.reshape(out.shape2d)
            if init == "magnitude":
                mask = magnitude_mask(w2d, bs, sparsity, grid=layout == "bsr")
            else:
                gen = None if seed is None else torch.Generator().manual_seed(int(seed))
                grid = grid_shape(out.shape2d, bs)
                mask = random_block_mask(grid, keep_count(grid[0] * grid[1], sparsity), gen)
                if layout == "dense":
                    mask = expand_blocks(mask, bs, out.shape2d)
                mask = mask.to(w.device)
            out._setup_sparse(w if layout == "bsr" else w.clone(), mask, sparsity, bs, layout)
        out.weight.requires_grad_(module.weight.requires_grad)
        if module.bias is not None:
            with torch.no_grad():
                out.bias.copy_(module.bias)
            out.bias.requires_grad_(module.bias.requires_grad)
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw the weights (and bias) as the nn layer does, keeping the mask (``bsr``: only
        the stored blocks are drawn). A layer built on the meta device and moved with
        ``to_empty(device=...)`` first draws its mask here (global RNG, the sparsity it was
        built with)."""
        if self._pending_sparsity is not None and not self.weight.is_meta:
            self._draw_mask(self._pending_sparsity)
        if self.layout == "dense":
            w = self._dense_init()
            self.weight.copy_(w * self.mask)
        else:
            kw = {"device": self.weight.device, "dtype": self.weight.dtype}
            self.weight.zero_()
            self.weight[self.slot_map] = self._draw_blocks(self._topo_block_mask, kw)
        if self.bias is not None:
            self._init_bias()

    def _draw_mask(self, sparsity: float) -> None:
        """Draw a random mask at ``sparsity`` (global RNG) into the existing buffers of a
        layer built on the meta device (after ``to_empty``), and rebuild its topology."""
        dev = self.weight.device
        if self.layout == "dense":
            mask2d = random_mask(self.shape2d, self.block_size, sparsity, None, dev)
            self.mask.copy_(mask2d.reshape(self._dense_shape))
            topo = build_topology(mask2d, self.block_size)
        else:
            grid = grid_shape(self.shape2d, self.block_size)
            bm = random_block_mask(grid, keep_count(grid[0] * grid[1], sparsity)).to(dev)
            self.block_mask.copy_(bm)
            self.slot_map.copy_(torch.arange(self.slot_map.numel(), device=dev))
            topo = topology_from_block_mask(bm, self.shape2d, self.block_size)
        self._pending_sparsity = None
        self.mask_version += 1
        self._candidate_cache = None
        self._set_topology(topo)

    # ----------------------------------------------------------------- DST requests
    def request(self, req: Optional[GrowRequest]) -> None:
        """Arm a :class:`GrowRequest` (``None`` disarms one). It stays armed until
        :attr:`grow_candidates` is read (or :meth:`take_grow_candidates` called): every backward
        in between counts (gradient accumulation over micro-batches, a layer called several
        times, a checkpointed forward recomputed), so the candidates rank the gradient the
        optimizer step uses. Indices are on the 2-D weight view, or on the block grid when
        ``block_size != (1, 1)``."""
        who = f"{type(self).__name__}.request"
        if req is None:
            self._grow_request = None
            self.grow_candidates = None
            return
        if not isinstance(req, GrowRequest):
            raise TypeError(f"{who}: expected a GrowRequest or None, got {type(req).__name__}")
        grid = self._grow_grid()
        if isinstance(req.k, bool) or not isinstance(req.k, int) or req.k < 0:
            raise ValueError(f"{who}: k must be a non-negative int, got {req.k!r}")
        exclude = self._grow_tensor(req.exclude, "exclude", grid, who)
        if exclude is not None and exclude.dtype != torch.bool:
            raise TypeError(f"{who}: exclude must be a bool tensor, got dtype {exclude.dtype}")
        self._grow_tensor(req.counter, "counter", grid, who)
        for name in ("bonus_scale", "eps"):
            v = getattr(req, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{who}: {name} must be a finite float, got {v!r}")
        if req.counter is not None and not req.eps > 0:
            raise ValueError(f"{who}: eps must be > 0 with a counter, got {req.eps!r}")
        n_excluded = int((exclude if exclude is not None else self._default_exclude()).sum())
        allowed = grid[0] * grid[1] - n_excluded
        if req.k > allowed:
            raise ValueError(f"{who}: k={req.k} exceeds the {allowed} entries not excluded")
        self._grow_request = req
        self.grow_candidates = None

    @property
    def grow_candidates(self) -> Optional[tuple[Tensor, Tensor]]:
        """``(flat_indices int64 [k], scores [k])`` of the armed :class:`GrowRequest` over every
        backward since it was armed (descending, ties to the lower flat index), or None when no
        backward ran. Reading it ends the request (as :meth:`take_grow_candidates`)."""
        if self._grow_request is not None and len(self._grow_stash):
            return self.take_grow_candidates()
        return self._grow_result

    @grow_candidates.setter
    def grow_candidates(self, value: Optional[tuple[Tensor, Tensor]]) -> None:
        self._grow_result = value
        self._grow_stash = GrowthStash()

    def take_grow_candidates(self, grad_scale: float = 1.0) -> Optional[tuple[Tensor, Tensor]]:
        """Rank the growth candidates of the armed request and disarm it.

        The score is that of ``G = Σ dyᵀx`` over every backward since :meth:`request` (the
        weight gradient the optimizer step uses, all micro-batches and all uses of the layer),
        one exact top-k over the batch-concatenated inputs.

        Args:
            grad_scale: the factor the backward's gradients carry (a ``GradScaler``'s scale):
                scores are those of ``G / grad_scale``.

        Returns:
            ``(flat_indices, scores)``, or None when no request is armed or no backward ran.
        """
        req, stash = self._grow_request, self._grow_stash
        if req is None or not len(stash):
            return self._grow_result if req is None else None
        grid = self._grow_grid()
        dev = self.weight.device
        exclude = (self._default_exclude() if req.exclude is None
                   else req.exclude.reshape(grid).to(dev))
        counter = None if req.counter is None else req.counter.reshape(grid).to(dev)
        br, bc = self.block_size
        result = stash_topk(stash, exclude, int(req.k), counter, float(req.bonus_scale),
                            float(req.eps), br, bc, self._dense_shape, float(grad_scale))
        self._grow_request = None
        self._grow_stash = GrowthStash()
        self._grow_result = result
        return result

    def _grow_grid(self) -> tuple[int, int]:
        if self.block_size == (1, 1):
            return self.shape2d
        return grid_shape(self.shape2d, self.block_size)

    def _grow_tensor(self, t, name: str, grid, who: str) -> Optional[Tensor]:
        if t is None:
            return None
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a tensor or None, got {type(t).__name__}")
        if t.numel() != grid[0] * grid[1] or t.shape[0] != grid[0]:
            raise ValueError(f"{who}: {name} must have shape {tuple(grid)} (the "
                             f"{'weight view' if self.block_size == (1, 1) else 'block grid'}), "
                             f"got {tuple(t.shape)}")
        return t.reshape(grid)

    def _default_exclude(self) -> Tensor:
        if self.block_size == (1, 1) and self.layout == "dense":
            return self.mask.reshape(self.shape2d)
        return self._topo_block_mask

    def skip_weight_grad(self, skip: bool = True) -> None:
        """Until called with ``False``: backwards give ``weight.grad`` as zeros without
        computing the active weights' gradient (the SDDMM), for a step whose optimizer step is
        skipped anyway (GSE's update step). Ignored under ``torch.compile`` and while a
        :class:`GrowRequest`/:class:`CandidateRequest` is armed (they need the gradient)."""
        self._weight_grad_unused = bool(skip)

    def set_candidates(self, req: Optional[CandidateRequest]) -> None:
        """Arm (or clear with ``None``) BiDST's persistent :class:`CandidateRequest`: every
        backward then fills ``self.scores.grad`` from one SDDMM over the candidate set. Needs
        :meth:`enable_scores` first."""
        who = f"{type(self).__name__}.set_candidates"
        if req is None:
            self._candidate_request = None
            self._candidate_cache = None
            return
        if not isinstance(req, CandidateRequest):
            raise TypeError(f"{who}: expected a CandidateRequest or None, got {type(req).__name__}")
        if isinstance(req.lam, bool) or not isinstance(req.lam, (int, float)) or \
                not math.isfinite(req.lam):
            raise ValueError(f"{who}: lam must be a finite float, got {req.lam!r}")
        c = req.candidates
        if not isinstance(c, Tensor) or c.dtype != torch.bool:
            raise TypeError(f"{who}: candidates must be a bool tensor")
        if tuple(c.shape) not in (tuple(self._dense_shape), tuple(self.shape2d)):
            raise ValueError(f"{who}: candidates must have shape {tuple(self.shape2d)}, got "
                             f"{tuple(c.shape)}")
        if req.phi not in PHI_CHOICES:
            raise ValueError(f"{who}: phi must be one of {PHI_CHOICES}, got {req.phi!r}")
        if self.scores is None:
            raise RuntimeError(f"{who}: the layer has no scores; call enable_scores() first")
        self._candidate_request = req
        self._candidate_cache = None

    def enable_scores(self) -> nn.Parameter:
        """Create ``self.scores`` (BiDST's ψ): an ``nn.Parameter`` of the nn layer's weight shape,
        initialised to ``|W|`` (dormant values included for the dense layout). Idempotent."""
        if self.scores is None:
            with torch.no_grad():
                w = self.values_to_dense(self.weight.detach())
                self.scores = nn.Parameter(w.abs().clone())
        return self.scores

    def _take_plan(self) -> Optional[RequestPlan]:
        """The request plan for this forward, or None. Requests stay armed across forwards, so
        a recomputed (checkpointed) forward takes the same path as the original one."""
        grow_req, cand_req = self._grow_request, self._candidate_request
        if grow_req is None and cand_req is None:
            if not self._weight_grad_unused or torch.compiler.is_compiling() or \
                    not torch.is_grad_enabled():
                return None
            return RequestPlan(weight_grad=False)
        if torch.compiler.is_compiling():
            raise RuntimeError(f"{type(self).__name__}: GrowRequest/CandidateRequest run eagerly; "
                               "do not arm them on a step run under torch.compile (sparsekern's "
                               "DST methods run such steps eagerly by themselves)")
        if not torch.is_grad_enabled():
            return None
        dev = self.weight.device
        grow = cand = None
        if grow_req is not None:
            grid = self._grow_grid()
            exclude = (self._default_exclude() if grow_req.exclude is None
                       else grow_req.exclude.reshape(grid).to(dev))
            counter = None if grow_req.counter is None else grow_req.counter.reshape(grid).to(dev)
            grow = GrowSpec(int(grow_req.k), exclude, counter, float(grow_req.bonus_scale),
                            float(grow_req.eps), self._grow_stash)
        scale = 1.0
        if cand_req is not None:
            cand = self._candidate_spec(cand_req)
            fn = self._grad_scale_fn
            scale = 1.0 if fn is None else float(fn())
            self._psi_grad_scale = scale
        return RequestPlan(grow=grow, cand=cand,
                           scores=self.scores if cand is not None else None, grad_scale=scale)

    def _candidate_spec(self, req: CandidateRequest) -> CandidateSpec:
        c = req.candidates
        dev = self._mask_src().device
        key = (c._version, self.mask_version, dev)
        cache = self._candidate_cache
        if cache is not None and cache[0] is req and cache[1] is c and cache[2] == key:
            return cache[3]
        cand2d = c.reshape(self.shape2d).to(dev)
        pattern2d = cand2d | self.mask.reshape(self.shape2d)
        topo = build_topology(pattern2d, self.block_size)
        spec = CandidateSpec(pattern2d.reshape(self._dense_shape), topo.tensors, cand2d,
                             float(req.lam), req.phi)
        self._candidate_cache = (req, c, key, spec)
        return spec

    # ----------------------------------------------------------------- state_dict
    def _check_loaded(self, state_dict, prefix: str, who: str) -> Optional[Tensor]:
        """Validate the incoming ``weight``/``mask``/``block_mask``/``slot_map``/``scores``
        (each combined with the current value when absent) before anything changes. Returns,
        for ``bsr``, the incoming block grid when the state dict carries a dense ``mask``
        instead of ``block_mask`` (an older checkpoint), else None."""
        wkey, mkey, skey = prefix + "weight", prefix + "mask", prefix + "slot_map"
        bkey = prefix + "block_mask"
        w, mask, slots = state_dict.get(wkey), state_dict.get(mkey), state_dict.get(skey)
        bm = state_dict.get(bkey)
        sc = state_dict.get(prefix + "scores")
        for key, t in ((wkey, w), (mkey, mask), (skey, slots), (prefix + "scores", sc),
                       (bkey, bm)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{who}: {key} must be a tensor, got {type(t).__name__}")
        for key, t, shape in ((mkey, mask, tuple(self._dense_shape)),
                              (bkey, bm, grid_shape(self.shape2d, self.block_size))):
            if t is None:
                continue
            if t.dtype != torch.bool:
                raise TypeError(f"{who}: {key} must be a bool tensor, got dtype {t.dtype}")
            if tuple(t.shape) != shape:
                what = "" if key == mkey else f" (the block grid of block_size={self.block_size})"
                raise ValueError(f"{who}: {key} has shape {tuple(t.shape)}, expected "
                                 f"{shape}{what}")
        if sc is not None and tuple(sc.shape) != tuple(self._dense_shape):
            raise ValueError(f"{who}: {prefix}scores has shape {tuple(sc.shape)}, expected "
                             f"{tuple(self._dense_shape)}")
        if self.layout == "dense":
            if w is not None and tuple(w.shape) != tuple(self._dense_shape):
                raise ValueError(f"{who}: {wkey} has shape {tuple(w.shape)}; this layer has "
                                 f"layout='dense' and expects {tuple(self._dense_shape)}")
            if bm is not None:
                raise ValueError(f"{who}: {bkey} is the mask of a layout='bsr' layer; this "
                                 f"layer has layout='dense' and expects {mkey}")
            return None
        br, bc = self.block_size
        if w is not None and (w.dim() != 3 or tuple(w.shape[1:]) != self.block_size):
            raise ValueError(f"{who}: {wkey} has shape {tuple(w.shape)}; this layer has "
                             f"layout='bsr' with block_size={self.block_size} and expects "
                             f"[nnzb, {br}, {bc}]")
        legacy = None
        if bm is None and mask is not None:  # a checkpoint from before block_mask
            mask2d = mask.reshape(self.shape2d).to(self.block_mask.device)
            if not is_block_aligned(mask2d, self.block_size):
                raise ValueError(f"{who}: {mkey} is not block-aligned for layout='bsr' "
                                 f"(constant on each {self.block_size} block of the "
                                 f"{self.shape2d} weight view)")
            bm = legacy = block_reduce_any(mask2d, self.block_size)
        nnzb = int((self.block_mask if bm is None else bm).sum())
        cap = (self.weight if w is None else w).shape[0]
        slots = self.slot_map if slots is None else slots
        if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool \
                or slots.dim() != 1:
            raise ValueError(f"{who}: {skey} must be a 1-D integer tensor, got dtype "
                             f"{slots.dtype} and shape {tuple(slots.shape)}")
        if slots.numel() != nnzb:
            raise ValueError(f"{who}: {skey} has {slots.numel()} entries, but the mask has "
                             f"{nnzb} active blocks")
        if nnzb and (int(slots.min()) < 0 or int(slots.max()) >= cap):
            raise ValueError(f"{who}: {skey} entries must be slots in [0, {cap}) of the "
                             f"weight, got values in [{int(slots.min())}, {int(slots.max())}]")
        if torch.unique(slots).numel() != nnzb:
            raise ValueError(f"{who}: {skey} maps two active blocks to the same weight slot "
                             f"(its entries must be distinct)")
        return legacy

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Validate everything first; a load that fails leaves the layer as it was."""
        who = f"{type(self).__name__}.load_state_dict"
        legacy = self._check_loaded(state_dict, prefix, who)
        if legacy is not None:
            state_dict[prefix + "block_mask"] = legacy
            del state_dict[prefix + "mask"]
        mname = "mask" if self.layout == "dense" else "block_mask"
        saved = {n: getattr(self, n) for n in ("weight", "bias", "scores", mname, "slot_map")}
        data = {n: (t.data, t.detach().clone()) for n, t in saved.items() if t is not None}
        w, s = state_dict.get(prefix + "weight"), state_dict.get(prefix + "slot_map")
        if self.layout == "bsr":
            if w is not None and w.shape[0] != self.weight.shape[0]:  # a different slot count
                self.weight.data = self.weight.new_zeros(w.shape)
            if s is not None and s.shape != self.slot_map.shape:
                self.slot_map = self.slot_map.new_zeros(s.shape)
        if state_dict.get(prefix + "scores") is not None and self.scores is None:
            self.scores = nn.Parameter(self.weight.new_zeros(self._dense_shape))
        n_errors = len(error_msgs)
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            failed = len(error_msgs) != n_errors
        except BaseException:
            self._restore(saved, data)
            raise
        if failed:
            self._restore(saved, data)
        else:
            self._after_load()

    @torch.no_grad()
    def _restore(self, saved: dict, data: dict) -> None:
        """Undo a partial load: the same objects, holding their old values."""
        for name, t in saved.items():
            if name in self._parameters:
                self._parameters[name] = t
            else:
                self._buffers[name] = t
            if t is not None:
                old_data, values = data[name]
                t.data = old_data
                t.copy_(values)
        self._mask_seen = self._mask_src()._version

    @torch.no_grad()
    def _after_load(self) -> None:
        if self.layout == "dense":
            topo = build_topology(self.mask.reshape(self.shape2d), self.block_size)
        else:
            topo = topology_from_block_mask(self.block_mask, self.shape2d, self.block_size)
        self._pending_sparsity = None
        self.mask_version += 1
        self._candidate_cache = None
        self._set_topology(topo)

    def _sparse_repr(self) -> str:
        return (f"sparsity={self.sparsity:.3f}, block_size={self.block_size}, "
                f"layout={self.layout!r}")
