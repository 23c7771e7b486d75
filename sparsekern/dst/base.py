"""What every DST method shares: the schedule, per-layer state, installing a mask with the
weight and optimizer-state resets, metrics, ``state_dict`` and data parallelism.

A method module only says how it scores, drops and grows. Everything works on a layer's
*unit grid*: the 2-D weight view ``[M, K]`` (Linear ``[out, in]``, Conv2d
``[C_out, C_in/groups·kh·kw]``) for unstructured masks, its block grid
``[ceil(M/br), ceil(K/bc)]`` for block masks. Counts are in units (entries or blocks).

Step semantics: ``step()`` counts optimizer steps; call ``t`` (1-based) updates masks when
:meth:`DSTMethod.is_update_step` says so, from the gradients of that call's backward. A method
that needs growth scores arms a request on each layer *before* the forward of such a step: at the
end of the previous ``step()`` (or at construction when the first call is due).
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn.base import SparseModule, local_rows
from ..nn.request import GrowRequest
from .._util import acc_dtype, stable_topk
from ..sparsify import _sparsify, layer_seed
from ..topology import block_reduce, block_reduce_any, expand_blocks
from . import distributed as dp
from .metrics import FlopsProbe, fallback_flops

_UNSET = object()
STATE_VERSION = 2  # 2: layer masks stored on the unit grid (1: weight-shaped, still loads)


# DST methods that need the coming forward/backward eager, and the stance before the first did
_EAGER: dict = {"holders": set(), "prior": None}


def _hold_eager(token: object) -> None:
    """Force ``torch.compiler``'s ``"force_eager"`` stance while any method holds it."""
    if token in _EAGER["holders"]:
        return
    if not _EAGER["holders"]:
        from torch._dynamo import eval_frame
        _EAGER["prior"] = getattr(eval_frame, "_stance", None)
        torch.compiler.set_stance("force_eager")
    _EAGER["holders"].add(token)


def _release_eager(token: object) -> None:
    """Drop ``token``'s hold; the last one restores the stance from before the first."""
    if token not in _EAGER["holders"]:
        return
    _EAGER["holders"].discard(token)
    if not _EAGER["holders"]:
        prior, _EAGER["prior"] = _EAGER["prior"], None
        if prior is None:
            torch.compiler.set_stance("default")
        else:
            torch.compiler.set_stance(prior.stance,
                                      skip_guard_eval_unsafe=prior.skip_guard_eval_unsafe,
                                      force_backend=prior.backend)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Convert a period in epochs (e.g. BiDST's refresh every 8 epochs, MEST's 5) to optimizer
    steps: ``max(1, round(epochs · steps_per_epoch))``."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or \
            steps_per_epoch < 1:
        raise ValueError(f"epochs_to_steps: steps_per_epoch must be an int >= 1, got "
                         f"{steps_per_epoch!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or \
            not 0 < epochs < math.inf:
        raise ValueError(f"epochs_to_steps: epochs must be a finite number > 0, got {epochs!r}")
    return max(1, round(epochs * steps_per_epoch))


def _period(who: str, name: str, value, delta_t, default: int) -> int:
    """A method's own update period ``name`` with ``delta_t`` accepted as its alias."""
    if value is None:
        value = default if delta_t is None else delta_t
    elif delta_t is not None and delta_t != value:
        raise ValueError(f"{who}: delta_t={delta_t!r} and {name}={value!r} disagree; "
                         f"delta_t is an alias of {name}, give one")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
    return value


def is_sparse_layer(module: nn.Module) -> bool:
    """A sparsekern layer (``SparseLinear``/``SparseConv2d`` or anything with their API)."""
    if isinstance(module, SparseModule):
        return True
    return (isinstance(getattr(module, "mask", None), Tensor)
            and callable(getattr(module, "set_mask", None))
            and callable(getattr(module, "request", None)))


def topk_units(scores: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` highest ``scores`` among ``allowed`` units (ties to the lower
    flat index, NaN highest)."""
    out = torch.zeros_like(allowed)
    if k <= 0:
        return out
    idx = allowed.flatten().nonzero().flatten()
    if k > idx.numel():
        raise ValueError(f"top-k: k={k} exceeds the {idx.numel()} allowed units")
    pos, _ = stable_topk(scores.flatten()[idx], k)
    out.view(-1)[idx[pos]] = True
    return out


def random_units(allowed: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Bool mask of ``k`` units drawn uniformly without replacement among ``allowed``."""
    out = torch.zeros_like(allowed)
    if k <= 0:
        return out
    idx = allowed.flatten().nonzero().flatten()
    if k > idx.numel():
        raise ValueError(f"random growth: k={k} exceeds the {idx.numel()} allowed units")
    pick = torch.randperm(idx.numel(), generator=gen)[:k].to(idx.device)
    out.view(-1)[idx[pick]] = True
    return out


@dataclass
class LayerState:
    """Per-layer bookkeeping of a DST method (everything on the layer's unit grid)."""

    name: str
    module: nn.Module
    index: int
    block_size: tuple[int, int]
    shape2d: tuple[int, int]
    n_units: int
    n_target: int  # active units at the start (the budget a drop-and-grow update keeps)
    ever: Tensor  # union of all masks so far (exploration degree)
    density: float = 0.0  # entry density of the current mask
    last: dict = field(default_factory=dict)  # metrics of the last update
    armed: Optional[dict] = None  # request armed for the coming update step
    extra: dict = field(default_factory=dict)  # method state (DST-EE counter, BiDST set E)

    @property
    def blocked(self) -> bool:
        return self.block_size != (1, 1)

    @property
    def updatable(self) -> bool:
        """False for a dense or empty layer (nothing to move) and for a frozen one (weight
        ``requires_grad=False``: its mask is kept as it is)."""
        return 0 < self.n_target < self.n_units and bool(self.module.weight.requires_grad)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The layer's nn weight shape (without building its mask)."""
        shape = getattr(self.module, "weight_shape", None)
        return tuple(shape) if shape is not None else tuple(self.module.mask.shape)

    @property
    def bsr(self) -> bool:
        """Whether the layer stores blocks (``layout="bsr"``): nothing of ``M·K`` entries
        is built for it (masks and scores stay on the unit grid)."""
        return getattr(self.module, "layout", "dense") == "bsr"

    def unit_mask(self) -> Tensor:
        """A copy of the layer's mask on the unit grid."""
        own = getattr(self.module, "unit_mask", None)
        if callable(own):
            return own()
        m2 = self.module.mask.flatten(1)
        return block_reduce_any(m2, self.block_size) if self.blocked else m2.clone()

    def to_mask(self, unit: Tensor) -> Tensor:
        """A unit-grid bool tensor as a mask of the layer's weight shape."""
        m2 = expand_blocks(unit, self.block_size, self.shape2d) if self.blocked else unit
        return m2.reshape(self.weight_shape).contiguous()

    def set_unit_mask(self, unit: Tensor) -> Tensor:
        """Install a unit-grid mask on the layer (``set_mask``; a ``bsr`` layer takes the
        block grid as it is) and return its ``newly`` mask."""
        if self.bsr and self.blocked:
            return self.module.set_mask(unit)
        return self.module.set_mask(self.to_mask(unit))

    def reduce(self, t2d: Tensor, absolute: bool = True) -> Tensor:
        """Per-unit score from an entry score on the 2-D view (block mean, by true size)."""
        t2d = t2d.abs() if absolute else t2d
        return block_reduce(t2d, self.block_size, "mean") if self.blocked else t2d

    def magnitude(self) -> Tensor:
        """``|W ⊙ mask|`` per unit (block mean; a ``bsr`` layer computes it from its stored
        blocks)."""
        own = getattr(self.module, "unit_magnitude", None)
        if callable(own):
            return own()
        w = self.module.dense_weight().detach().flatten(1)
        return self.reduce(w.to(acc_dtype(w.dtype)))


class DSTMethod:
    """Base class of the DST methods (see ``sparsekern/dst/ALGORITHMS.md`` and ``sparsekern/dst/README.md``).

    Args:
        model: a model with ``nn.Linear``/``nn.Conv2d`` layers (sparsified here by
            :func:`sparsekern.sparsify` with ``sparsity``, ``distribution``, ``block_size``,
            ``layout``, ``exclude``, ``seed``), or one that already holds sparse layers (their
            masks are the starting masks; ``sparsity``/``distribution`` are then None).
            A ``DistributedDataParallel`` wrapper is unwrapped.
        optimizer: the optimizer of the model's parameters; parameters that ``sparsify``
            replaces are swapped in its param groups.
        total_steps: ``T``, the number of ``step()`` calls of the run.
        sparsity: target overall sparsity in ``[0, 1)``.
        distribution: ``"erk"`` or ``"uniform"``.
        delta_t: steps between mask updates (``>= 1``).
        t_end: updates stop at ``t >= t_end·T`` (``0 < t_end <= 1``).
        skip_optimizer_step_on_update: on update steps do not step the optimizer (RigL's
            official code).
        seed: seed of every random draw (mixed with the step and layer index).
        dp_growth: data-parallel growth path: ``"auto"``, ``"gather"`` or ``"allreduce"``.
        scaler: the ``torch.amp.GradScaler`` later given to :meth:`step` (optional: known from
            the start, BiDST's mask-score gradient of the very first step is exact too).

    Layers whose weight does not require grad (frozen) keep their mask: no method moves it,
    and the optimizer need not hold their weight. Growth ranks the gradient the optimizer step
    uses: every backward between two ``step()`` calls counts (gradient accumulation over
    micro-batches, a layer used more than once, a checkpointed forward).

    ``torch.compile`` (``fullgraph=True`` works): the forward/backward of a step that records
    something for the method (the first one, measuring FLOPs; growth steps of RigL and DST-EE;
    every step of BiDST, whose mask-score gradient comes from the backward; GSE's and
    data-parallel update steps) runs eagerly: the method sets
    ``torch.compiler.set_stance("force_eager")`` from the ``step()`` that arms it until the
    ``step()`` that consumes it, then restores the previous stance (at the latest after step
    ``total_steps``, when the method is garbage-collected, or on :meth:`release_eager`). Every
    other step runs the compiled graph, which never holds a request; a mask update changes
    buffer values only (the same number of active units), so it causes no recompilation.
    """

    name = "DSTMethod"
    #: whether the mask update runs before the optimizer step of an update step
    update_before_optimizer = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int,
                 sparsity=_UNSET, distribution=_UNSET, delta_t: int = 100, t_end: float = 0.75,
                 block_size=(1, 1), layout: str = "dense", exclude=None, seed: int = 0,
                 skip_optimizer_step_on_update: bool = False, dp_growth: str = "auto",
                 scaler=None):
        n = type(self).__name__
        self.name = n
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"{n}: total_steps must be a positive int, got {total_steps!r}")
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"{n}: delta_t must be a positive int, got {delta_t!r}")
        if not isinstance(t_end, (int, float)) or not 0 < t_end <= 1:
            raise ValueError(f"{n}: t_end must be in (0, 1], got {t_end!r}")
        if dp_growth not in dp.DP_GROWTH:
            raise ValueError(f"{n}: dp_growth must be one of {dp.DP_GROWTH}, got {dp_growth!r}")
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "step"):
            raise TypeError(f"{n}: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model, self.optimizer = model, optimizer
        self.total_steps, self.delta_t, self.t_end = total_steps, delta_t, float(t_end)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{n}: seed must be an int, got {seed!r}")
        self.seed = int(seed)
        self.skip_optimizer_step_on_update = bool(skip_optimizer_step_on_update)
        self.dp_growth = dp_growth

        named = self._find_layers()
        if named:
            if sparsity not in (_UNSET, None) or distribution not in (_UNSET, None):
                warnings.warn(f"{n}: the model already holds sparse layers; their masks are the "
                              "starting masks and sparsity/distribution are ignored", stacklevel=3)
            self.sparsity = self.distribution = None
        else:
            sparsity = 0.9 if sparsity is _UNSET else sparsity
            distribution = "erk" if distribution is _UNSET else distribution
            if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
                raise ValueError(f"{n}: sparsity must be in [0, 1), got {sparsity!r}")
            if distribution not in ("erk", "uniform"):
                raise ValueError(f"{n}: distribution must be 'erk' or 'uniform', got "
                                 f"{distribution!r}")
            self.sparsity, self.distribution = float(sparsity), distribution
            named = self._sparsify(block_size, layout, exclude)
        self._check_optimizer([(nm, m.weight) for nm, m in named if m.weight.requires_grad])

        self.layers: list[LayerState] = []
        for i, (lname, mod) in enumerate(named):
            bs = tuple(int(b) for b in getattr(mod, "block_size", (1, 1)))
            ls = LayerState(lname, mod, i, bs, (0, 0), 0, 0, torch.zeros(0, dtype=torch.bool))
            shape = ls.weight_shape
            ls.shape2d = (shape[0], math.prod(shape[1:]))
            unit = ls.unit_mask()
            ls.n_units, ls.n_target = unit.numel(), int(unit.sum())
            ls.ever = unit.clone()
            ls.density = self._entry_density(ls)
            self.layers.append(ls)

        self._t = 0
        self.n_updates = 0
        self.totals = {"n_dropped": 0, "n_grown": 0, "n_net_swapped": 0}
        self._last_global: Optional[tuple[int, int]] = None
        self._flops = [0.0, 0.0]  # method FLOPs, dense FLOPs (per sample, summed over steps)
        self._capture: Optional[dp.Capture] = None
        self._update_stats = [0, 0]
        self.n_skipped = 0
        self._grad_scale = 1.0
        self._scaler = None
        self._warned_scale = False
        dense_mods = {nm: m for nm, m in self.model.named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d)) and not is_sparse_layer(m)}
        self._dense_layers = dense_mods
        self._probe = FlopsProbe({**{ls.name: ls.module for ls in self.layers}, **dense_mods})
        self._setup()
        if scaler is not None:
            self._use_scaler(scaler)
        if dp.is_distributed():
            self._sync_masks()
        self._eager_token = object()
        weakref.finalize(self, _release_eager, self._eager_token)
        self._arm(1)
        self._eager_when_needed()

    # ------------------------------------------------------------------ construction helpers
    def _find_layers(self) -> list[tuple[str, nn.Module]]:
        return [(nm, m) for nm, m in self.model.named_modules() if is_sparse_layer(m)]

    def _sparsify(self, block_size, layout, exclude) -> list[tuple[str, nn.Module]]:
        if isinstance(self.model, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
            raise ValueError(f"{self.name}: the model is a bare {type(self.model).__name__}, "
                             "which cannot be sparsified in place; wrap it in nn.Sequential")
        old = {nm: m.weight for nm, m in self.model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))}
        for nm, m in self.model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                for pn in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    if getattr(m, pn, None) is not None:
                        old[f"{nm}.{pn}"] = getattr(m, pn)
        if not old:
            raise ValueError(f"{self.name}: the model has no sparsifiable layer "
                             "(nn.Linear / nn.Conv2d / nn.MultiheadAttention)")
        self._check_optimizer([(nm, w) for nm, w in old.items()  # before changing it
                               if w.requires_grad])
        _, swap = _sparsify(self.model, self.sparsity, distribution=self.distribution,
                            block_size=block_size, layout=layout, exclude=exclude,
                            seed=self.seed)
        swap = {b: a for b, a in swap.items() if not (len(a) == 1 and a[0] is b)}
        if swap:
            self._swap_params(swap)
        named = self._find_layers()
        if not named:
            raise ValueError(f"{self.name}: sparsify left no sparse layer in the model")
        return named

    def _swap_params(self, swap: dict) -> None:
        """Replace parameters ``sparsify`` swapped out (``{old: [new, ...]}``) in the
        optimizer's param groups. Optimizer state moves with them when the shapes allow: kept
        for a same-shape replacement, split along dim 0 for a packed attention projection;
        dropped otherwise."""
        opt = self.optimizer
        for group in opt.param_groups:
            group["params"] = [q for p in group["params"] for q in swap.get(p, [p])]
        for before, afters in swap.items():
            st = opt.state.pop(before, None)
            if not st:
                continue
            sizes = [a.shape[0] for a in afters]
            fits = all(a.shape[1:] == before.shape[1:] for a in afters) and \
                sum(sizes) == before.shape[0]
            if not fits or not all(not torch.is_tensor(v) or v.dim() == 0 or
                                   v.shape == before.shape for v in st.values()):
                continue
            for j, a in enumerate(afters):
                opt.state[a] = {k: (v.split(sizes)[j].clone() if torch.is_tensor(v) and v.dim()
                                    else (v.clone() if torch.is_tensor(v) else v))
                                for k, v in st.items()}

    def _check_optimizer(self, weights: list[tuple[str, Tensor]]) -> None:
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [nm for nm, w in weights if id(w) not in held]
        if missing:
            raise ValueError(f"{self.name}: the optimizer does not hold the weight of sparse "
                             f"layer(s) {missing}; build it from model.parameters()")

    def _setup(self) -> None:
        """Method-specific state after the layers are known (override)."""

    # ------------------------------------------------------------------ schedule
    @property
    def step_count(self) -> int:
        """Number of ``step()`` calls so far."""
        return self._t

    def is_update_step(self, t: int) -> bool:
        """Whether call ``t`` (1-based) updates the masks: ``t % delta_t == 0`` and
        ``t < t_end·T``."""
        return t % self.delta_t == 0 and t < self.t_end * self.total_steps

    def step(self, scaler=None) -> bool:
        """Step the optimizer (unless skipped on an update step) and update the masks when due.

        Args:
            scaler: a ``torch.amp.GradScaler`` for fp16 AMP (``scaler.scale(loss).backward()``).
                The gradients are unscaled (``scaler.unscale_(optimizer)``, unless already
                called this iteration, e.g. for clipping; BiDST's mask-score gradients too) and
                growth is ranked on unscaled gradients. On a non-finite gradient the optimizer
                step, the mask update and BiDST's score step are skipped, as ``scaler.step``
                skips (the call still counts as a step; ``n_skipped`` counts them). The optimizer
                steps through ``scaler.step``; call ``scaler.update()`` after ``step()`` as
                usual.

        Returns:
            Whether the masks were updated.
        """
        found_inf = False
        self._grad_scale = 1.0
        if scaler is not None:
            self._use_scaler(scaler)
            if scaler.is_enabled():
                found_inf = self._unscale(scaler)
            else:
                scaler = None
        self._t += 1
        t = self._t
        due = self.is_update_step(t)
        if found_inf:
            self._skip_step()
            self._account_flops(False)
            self._arm(t + 1)
            self._eager_when_needed()
            return False
        self._before_optimizer(t)
        if due and self.update_before_optimizer:
            self._run_update(t)
        if not (due and self.skip_optimizer_step_on_update):
            if scaler is None:
                self.optimizer.step()
            else:
                scaler.step(self.optimizer)
        if due and not self.update_before_optimizer:
            self._run_update(t)
        self._grad_scale = 1.0
        self._account_flops(due)
        self._arm(t + 1)
        self._eager_when_needed()
        return due

    def _use_scaler(self, scaler) -> None:
        """Check ``scaler`` and let the layers' backward know its scale (BiDST's ``dψ`` is
        formed from unscaled gradients)."""
        if not all(callable(getattr(scaler, a, None))
                   for a in ("unscale_", "step", "get_scale", "is_enabled")):
            raise TypeError(f"{self.name}: scaler must be a torch.amp.GradScaler, got "
                            f"{type(scaler).__name__}")
        if scaler is self._scaler:
            return
        self._scaler = scaler
        for ls in self.layers:
            if hasattr(ls.module, "_grad_scale_fn"):
                ls.module._grad_scale_fn = scaler.get_scale

    def _extra_grads(self) -> list[tuple[nn.Module, Tensor]]:
        """Gradients the DST method steps itself (BiDST's mask scores, not in the optimizer)."""
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        out = []
        for ls in self.layers:
            sc = getattr(ls.module, "scores", None)
            if isinstance(sc, Tensor) and sc.grad is not None and id(sc) not in held:
                out.append((ls.module, sc.grad))
        return out

    @torch.no_grad()
    def _unscale(self, scaler) -> bool:
        """Unscale the optimizer's gradients (and :meth:`_extra_grads`) and say whether any
        is non-finite. Remembers the scale so that growth ranks unscaled gradients."""
        try:
            scaler.unscale_(self.optimizer)
        except RuntimeError as e:
            if "already been called" not in str(e):
                raise
        scale = float(scaler.get_scale())
        states = getattr(scaler, "_per_optimizer_states", None)
        record = states.get(id(self.optimizer), {}).get("found_inf_per_device") if states else None
        if record:
            found = any(float(v.item()) > 0 for v in record.values())
        else:
            found = any(not bool(torch.isfinite(p.grad).all())
                        for g in self.optimizer.param_groups for p in g["params"]
                        if p.grad is not None)
        for mod, g in self._extra_grads():
            if getattr(mod, "_psi_grad_scale", scale) != scale and not self._warned_scale:
                self._warned_scale = True
                warnings.warn(f"{self.name}: the mask-score gradient of this step was formed "
                              "before the GradScaler was known; it is unscaled as a whole, "
                              "which is exact for a linear phi only (pass scaler= to the "
                              "constructor)", stacklevel=3)
            g.div_(scale)
            found = found or not bool(torch.isfinite(g).all())
        self._grad_scale = scale
        return found

    def _skip_step(self) -> None:
        """A step with a non-finite gradient: nothing moves; what the backward left for the
        method (growth candidates, mask-score gradients) is dropped."""
        self.n_skipped += 1
        for ls in self.layers:
            sc = getattr(ls.module, "scores", None)
            if isinstance(sc, Tensor):
                sc.grad = None
            if ls.armed is not None and callable(getattr(ls.module, "request", None)):
                ls.module.request(None)
        self._grad_scale = 1.0

    def _before_optimizer(self, t: int) -> None:
        """Work every step before the optimizer step (BiDST's ψ step)."""

    def _arm(self, t: int) -> None:
        """Arm what the forward/backward of call ``t`` must produce (override)."""

    def _update(self, t: int) -> None:
        """Compute and install the new masks of update step ``t`` (override)."""
        raise NotImplementedError

    def _run_update(self, t: int) -> None:
        self._update_stats = [0, 0]
        self._update(t)
        self.n_updates += 1
        inter, union = self._update_stats
        self._last_global = (inter, union)
        if dp.is_distributed():
            self._sync_masks()

    # ------------------------------------------------------------------ torch.compile
    def _needs_eager(self) -> bool:
        """Whether the coming forward/backward must run eagerly: it records something for the
        method (the FLOPs probe's first forward, a growth or candidate request, data-parallel
        or GSE capture hooks), which a compiled graph would not do. Never after the last
        step (``total_steps``): the stance is then restored whatever is still armed."""
        if self._t >= self.total_steps:
            return False
        if self._probe.handles or self._capture is not None:
            return True
        for ls in self.layers:
            mod = ls.module
            if ls.armed is not None or len(getattr(mod, "_forward_hooks", ())) or \
                    getattr(mod, "_grow_request", None) is not None or \
                    getattr(mod, "_candidate_request", None) is not None:
                return True
        return False

    def _eager_when_needed(self) -> None:
        """Run the steps that record something for the method eagerly under ``torch.compile``:
        from the call that arms such a step until the ``step()`` that consumes it,
        ``torch.compiler.set_stance("force_eager")`` holds (compiled models, and any other
        compiled code, run their Python code); the stance before is restored after. Compiled
        graphs never see a request, so mask updates cause no recompilation."""
        if self._needs_eager():
            _hold_eager(self._eager_token)
        else:
            _release_eager(self._eager_token)

    def release_eager(self) -> None:
        """Give back a forced-eager stance this method holds (:meth:`step` does it by itself
        after the step it armed, and at the latest after ``total_steps``; call this when a run
        stops early and the process goes on compiling). Also done when the method is
        garbage-collected."""
        _release_eager(self._eager_token)

    # ------------------------------------------------------------------ installing masks
    def _install(self, ls: LayerState, new_unit: Tensor, *, grown: Optional[Tensor] = None,
                 n_dropped: Optional[int] = None, keep_dormant: bool = False,
                 metrics: bool = True) -> Tensor:
        """Install ``new_unit`` on ``ls``'s layer and reset what became active: weight 0
        (``keep_dormant``: keep the value an entry had when last active, 0 if never active)
        and every optimizer-state tensor shaped like the weight 0 there. Entries active before
        and after keep value and state. Returns the ``newly`` mask (the weight's shape)."""
        old_unit = ls.unit_mask()
        newly = ls.set_unit_mask(new_unit.to(old_unit.device))
        self._reset(ls, newly, keep_dormant)
        ls.density = self._entry_density(ls)
        if metrics:
            grown = new_unit & ~old_unit if grown is None else grown
            dropped = int((old_unit & ~new_unit).sum()) if n_dropped is None else n_dropped
            inter, union = int((old_unit & new_unit).sum()), int((old_unit | new_unit).sum())
            ls.last = {"step": self._t, "n_dropped": dropped, "n_grown": int(grown.sum()),
                       "n_net_swapped": int((grown & ~old_unit).sum()),
                       "iou": inter / union if union else None}
            for key in self.totals:
                self.totals[key] += ls.last[key]
            self._update_stats[0] += inter
            self._update_stats[1] += union
        ls.ever |= new_unit.to(ls.ever.device)
        return newly

    @staticmethod
    def _entry_density(ls: LayerState) -> float:
        """Fraction of active entries of ``ls``'s mask (``bsr``: from the block grid)."""
        d = getattr(ls.module, "density", None)
        if isinstance(d, float):
            return d
        m = ls.module.mask
        return float(m.float().mean()) if m.numel() else 0.0

    def _record_unchanged(self, ls: LayerState) -> None:
        """Metrics of an update that leaves ``ls``'s mask as it is."""
        n = int(ls.unit_mask().sum())
        ls.last = {"step": self._t, "n_dropped": 0, "n_grown": 0, "n_net_swapped": 0,
                   "iou": 1.0 if n else None}
        self._update_stats[0] += n
        self._update_stats[1] += n

    @torch.no_grad()
    def _reset(self, ls: LayerState, newly: Tensor, keep_dormant: bool) -> None:
        """Zero the weight (unless ``keep_dormant``), its gradient and optimizer state where
        ``newly`` (the weight's shape); on a sharded ``DTensor`` (FSDP2) each process zeroes
        the rows it holds."""
        w = ls.module.weight
        if not bool(newly.any()):
            return
        zero = newly
        if keep_dormant and tuple(w.shape) == ls.weight_shape:
            zero = newly & ~ls.to_mask(ls.ever.to(newly.device))

        def clear(t: Tensor, where: Tensor) -> None:
            local, r0 = local_rows(t)
            local[where[r0:r0 + local.shape[0]].to(local.device)] = 0

        clear(w, zero)
        if w.grad is not None:
            clear(w.grad, newly)
        for v in self.optimizer.state.get(w, {}).values():
            if torch.is_tensor(v) and v.shape == w.shape:
                clear(v, newly)

    def _sync_masks(self) -> None:
        """Safety net under data parallelism: every rank takes rank 0's masks."""
        fixed = dp.broadcast_unit_masks([ls.unit_mask() for ls in self.layers])
        n = 0
        for ls, theirs in zip(self.layers, fixed):
            if theirs is not None:
                self._install(ls, theirs.to(ls.ever.device), metrics=False)
                n += 1
        if n:
            dp.warn_fixed(self.name, n)

    # ------------------------------------------------------------------ helpers for methods
    def generator(self, step: int, layer_index: int, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded by ``(seed, step, layer index)`` (:func:`sparsekern.sparsify
        .layer_seed`, the same on every rank); ``salt`` separates draws of the same step."""
        seed = layer_seed(self.seed, step, layer_index)
        if salt:
            seed = layer_seed(seed, salt, 0)
        return torch.Generator().manual_seed(seed)

    def lr_of(self, param: Tensor) -> float:
        """The current learning rate of the param group holding ``param``."""
        for g in self.optimizer.param_groups:
            if any(p is param for p in g["params"]):
                return float(g["lr"])
        raise ValueError(f"{self.name}: parameter not held by the optimizer")

    # ------------------------------------------------------------------ metrics
    def _step_cost(self, ls: LayerState, due: bool) -> float:
        """FLOPs of one training step of ``ls`` in units of its dense forward FLOPs."""
        return 3.0 * ls.density

    def _account_flops(self, due: bool) -> None:
        self._probe.remove()  # the first forward recorded every layer that runs
        f = self._probe.flops
        cost = dense = 0.0
        for ls in self.layers:
            fd = f.get(ls.name) or fallback_flops(ls.module)
            cost += fd * self._step_cost(ls, due)
            dense += 3.0 * fd
        for nm, mod in self._dense_layers.items():
            fd = f.get(nm) or fallback_flops(mod)
            cost += 3.0 * fd
            dense += 3.0 * fd
        self._flops[0] += cost
        self._flops[1] += dense

    def stats(self) -> dict:
        """Metrics so far. Counts are in units (entries; blocks for block masks).

        Returns a dict with ``method``, ``step``, ``total_steps``, ``n_updates``,
        ``n_skipped`` (steps skipped for a non-finite gradient under a ``GradScaler``);
        ``density`` (overall, entries) and ``layer_density`` (per layer); ``iou`` (global mask IoU
        of the last update, None before one) and ``layer_iou``; ``exploration`` (``R``, the
        fraction of units ever active) and ``layer_exploration``; ``n_dropped``, ``n_grown``,
        ``n_net_swapped`` (totals over the run) with ``last_update`` (the same counts summed
        over the layers at the last update, and its ``step``) and ``layer_n_dropped``,
        ``layer_n_grown``, ``layer_n_net_swapped`` (per layer, last update);
        ``flops_relative`` (training FLOPs so far over dense training's, ALGORITHMS.md)."""
        total = sum(math.prod(ls.weight_shape) for ls in self.layers)
        active = sum(ls.density * math.prod(ls.weight_shape) for ls in self.layers)
        ever = sum(int(ls.ever.sum()) for ls in self.layers)
        units = sum(ls.n_units for ls in self.layers)
        per = lambda key: {ls.name: ls.last.get(key) for ls in self.layers}  # noqa: E731
        lg = self._last_global
        last = {"step": None, "n_dropped": 0, "n_grown": 0, "n_net_swapped": 0}
        recent = [ls.last for ls in self.layers if ls.last]
        if recent:
            last["step"] = max(r["step"] for r in recent)
            for key in ("n_dropped", "n_grown", "n_net_swapped"):
                last[key] = sum(r[key] for r in recent if r["step"] == last["step"])
        return {
            "method": self.name,
            "step": self._t,
            "total_steps": self.total_steps,
            "n_updates": self.n_updates,
            "n_skipped": self.n_skipped,
            "density": active / total if total else 0.0,
            "layer_density": {ls.name: ls.density for ls in self.layers},
            "iou": lg[0] / lg[1] if lg and lg[1] else None,
            "layer_iou": per("iou"),
            "exploration": ever / units if units else 0.0,
            "layer_exploration": {ls.name: int(ls.ever.sum()) / ls.n_units
                                  for ls in self.layers},
            "n_dropped": self.totals["n_dropped"],
            "n_grown": self.totals["n_grown"],
            "n_net_swapped": self.totals["n_net_swapped"],
            "last_update": last,
            "layer_n_dropped": per("n_dropped"),
            "layer_n_grown": per("n_grown"),
            "layer_n_net_swapped": per("n_net_swapped"),
            "flops_relative": self._flops[0] / self._flops[1] if self._flops[1] else None,
        }

    # ------------------------------------------------------------------ state
    def _layer_extra_state(self, ls: LayerState) -> dict:
        return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in ls.extra.items()}

    def state_dict(self) -> dict:
        """Everything needed to resume bit for bit (tensors, numbers, strings, lists and dicts
        only: loads with ``torch.load(weights_only=True)``). The model's and the optimizer's
        own ``state_dict`` are saved separately; load them first."""
        layers = []
        for ls in self.layers:
            armed = None
            if ls.armed is not None:
                armed = {k: (v.detach().clone() if torch.is_tensor(v) else v)
                         for k, v in ls.armed.items()}
            layers.append({
                "name": ls.name, "unit_shape": list(ls.ever.shape),
                "mask": ls.unit_mask(), "ever": ls.ever.clone(),
                "n_target": ls.n_target, "last": dict(ls.last), "armed": armed,
                "extra": self._layer_extra_state(ls)})
        return {
            "method": self.name, "version": STATE_VERSION, "step": self._t,
            "n_updates": self.n_updates, "n_skipped": self.n_skipped, "seed": self.seed,
            "total_steps": self.total_steps,
            "totals": dict(self.totals),
            "last_global": list(self._last_global) if self._last_global else None,
            "flops": list(self._flops), "flops_per_layer": dict(self._probe.flops),
            "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output into a method built on the same model."""
        n = self.name
        if not isinstance(state, dict) or "layers" not in state:
            raise ValueError(f"{n}.load_state_dict: not a DST state dict")
        if state.get("method") != n:
            raise ValueError(f"{n}.load_state_dict: state is from {state.get('method')!r}, "
                             f"not {n!r}")
        names = [ld["name"] for ld in state["layers"]]
        mine = [ls.name for ls in self.layers]
        if names != mine:
            raise ValueError(f"{n}.load_state_dict: state_dict is from a different model "
                             f"(sparse layers {names}, this model has {mine})")
        for ls, ld in zip(self.layers, state["layers"]):
            if list(ld["unit_shape"]) != list(ls.ever.shape) or \
                    tuple(ld["mask"].shape) not in (tuple(ls.ever.shape), ls.weight_shape):
                raise ValueError(f"{n}.load_state_dict: state_dict is from a different model "
                                 f"(layer {ls.name!r}: mask {tuple(ld['mask'].shape)} vs "
                                 f"{tuple(ls.ever.shape)})")
        self._t, self.n_updates = int(state["step"]), int(state["n_updates"])
        self.n_skipped = int(state.get("n_skipped", 0))
        self.seed, self.total_steps = int(state["seed"]), int(state["total_steps"])
        self.totals = dict(state["totals"])
        lg = state["last_global"]
        self._last_global = tuple(lg) if lg else None
        self._flops = list(state["flops"])
        self._probe.flops.update(state.get("flops_per_layer", {}))
        for ls, ld in zip(self.layers, state["layers"]):
            mine = ls.unit_mask()
            dev = mine.device
            unit = ld["mask"].to(dev)
            if tuple(unit.shape) != tuple(ls.ever.shape):  # a weight-shaped mask (version 1)
                unit = unit.flatten(1)
                if ls.blocked:
                    unit = block_reduce_any(unit, ls.block_size)
            if not torch.equal(unit, mine):
                ls.set_unit_mask(unit)
            ls.density = self._entry_density(ls)
            ls.ever = ld["ever"].to(dev).clone()
            ls.n_target = int(ld["n_target"])
            ls.last = dict(ld["last"])
            ls.armed = None
            if ld["armed"] is not None:
                ls.armed = {k: v.to(dev) if torch.is_tensor(v) else v
                            for k, v in ld["armed"].items()}
            ls.extra = {k: v.to(dev).clone() if torch.is_tensor(v) else v
                        for k, v in ld["extra"].items()}
        self._after_load()
        self._eager_when_needed()

    def _after_load(self) -> None:
        """Re-arm what the coming step needs (override; default: recompute)."""
        self._arm(self._t + 1)

    def __repr__(self) -> str:
        return (f"{self.name}(layers={len(self.layers)}, step={self._t}/{self.total_steps}, "
                f"n_updates={self.n_updates})")


class DropAndGrow(DSTMethod):
    """Drop-and-grow methods (SET, RigL, DST-EE, MEST): at an update keep the top ``n_keep``
    units by :meth:`drop_scores` among the active ones, then grow ``n_grow`` units among the
    units not kept (a just-dropped unit may return): by the fused top-k of the growth score
    (``grows_by_gradient``) or uniformly at random."""

    grows_by_gradient = False

    def __init__(self, model, optimizer, *, alpha: float = 0.3, **kw):
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"{type(self).__name__}: alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        super().__init__(model, optimizer, **kw)

    # --- what a method says
    def drop_fraction(self, t: int) -> float:
        """RigL's cosine schedule ``α/2·(1 + cos(π·t/(t_end·T)))``."""
        return self.alpha / 2 * (1 + math.cos(math.pi * t / (self.t_end * self.total_steps)))

    def plan(self, ls: LayerState, t: int, n_active: int) -> tuple[int, int]:
        """``(n_keep, n_grow)`` of update ``t``: drop ``int(f(t − ΔT)·n_active)`` and grow as
        many (the official RigL code's k-th update uses the fraction of step ``(k−1)·ΔT``)."""
        n_drop = int(self.drop_fraction(t - self.delta_t) * n_active)
        return n_active - n_drop, n_drop

    def drop_scores(self, ls: LayerState) -> Tensor:
        """Score per unit; the lowest active ones are dropped (default ``|W|``)."""
        return ls.magnitude()

    def growth_request(self, ls: LayerState, t: int, kept: Tensor, k: int) -> GrowRequest:
        """The fused top-k request of a gradient-growth method (default: ``|G|``)."""
        return GrowRequest(k=k, exclude=kept)

    def after_update(self, ls: LayerState, new_unit: Tensor) -> None:
        """Bookkeeping after ``ls`` got ``new_unit`` (DST-EE's counter)."""

    # --- mechanism
    def _keep(self, ls: LayerState, t: int) -> tuple[Tensor, int]:
        unit = ls.unit_mask()
        n_keep, n_grow = self.plan(ls, t, int(unit.sum()))
        return topk_units(self.drop_scores(ls), unit, n_keep), n_grow

    def _arm(self, t: int) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        for ls in self.layers:
            ls.armed = None
        if not (self.grows_by_gradient and self.is_update_step(t)):
            return
        armed = []
        for ls in self.layers:
            if not ls.updatable:
                continue
            kept, k = self._keep(ls, t)
            if k <= 0:
                continue
            req = self.growth_request(ls, t, kept, k)
            ls.armed = {"exclude": req.exclude, "k": req.k, "counter": req.counter,
                        "bonus_scale": float(req.bonus_scale), "eps": float(req.eps)}
            armed.append(ls)
        self._issue(armed)

    def _request_of(self, ls: LayerState) -> GrowRequest:
        a = ls.armed
        return GrowRequest(k=a["k"], exclude=a["exclude"], counter=a["counter"],
                           bonus_scale=a["bonus_scale"], eps=a["eps"])

    def _issue(self, armed: list[LayerState]) -> None:
        """Hand the requests to the layers, or (data parallel) hook their inputs and output
        gradients for a global-batch top-k after the backward."""
        if not armed:
            return
        if dp.is_distributed():
            self._capture = dp.Capture(armed)
            return
        for ls in armed:
            ls.module.grow_candidates = None
            ls.module.request(self._request_of(ls))

    def _after_load(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        armed = [ls for ls in self.layers if ls.armed is not None]
        self._issue(armed)

    def _grown_by_gradient(self, ls: LayerState) -> Tensor:
        req = self._request_of(ls)
        if self._capture is not None:
            x, dy = self._capture.tensors(ls.index, self.name)
            if self._grad_scale != 1.0:
                dy = dy / self._grad_scale
            idx, _ = dp.global_topk(ls.module, x, dy, req, self.dp_growth, self._capture)
        else:
            take = getattr(ls.module, "take_grow_candidates", None)
            cands = (take(grad_scale=self._grad_scale) if callable(take)
                     else getattr(ls.module, "grow_candidates", None))
            ls.module.grow_candidates = None
            if cands is None:
                raise RuntimeError(
                    f"{self.name}: layer {ls.name!r} has no growth candidates at update step "
                    f"{self._t}: its growth request is armed by the previous step() (or at "
                    "construction), so run a forward and backward through the model between "
                    "step() calls")
            idx = cands[0]
        if idx.numel() != req.k:
            raise RuntimeError(f"{self.name}: layer {ls.name!r} returned {idx.numel()} growth "
                               f"candidates, expected {req.k}")
        grown = torch.zeros_like(req.exclude)
        grown.view(-1)[idx.to(grown.device)] = True
        return grown

    def _update(self, t: int) -> None:
        for ls in self.layers:
            if not ls.updatable:
                continue
            n_before = int(ls.unit_mask().sum())
            if self.grows_by_gradient:
                if ls.armed is None:  # nothing to drop or grow this time (k = 0)
                    self._record_unchanged(ls)
                    continue
                kept = ls.armed["exclude"]
                grown = self._grown_by_gradient(ls)
            else:
                kept, k = self._keep(ls, t)
                if k == 0 and int(kept.sum()) == n_before:
                    self._record_unchanged(ls)
                    continue
                grown = random_units(~kept, k, self.generator(t, ls.index))
            new = kept | grown
            self._install(ls, new, grown=grown, n_dropped=n_before - int(kept.sum()))
            self.after_update(ls, new)
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        for ls in self.layers:
            ls.armed = None

    def _step_cost(self, ls: LayerState, due: bool) -> float:
        if due and self.grows_by_gradient and ls.updatable:
            return 2.0 * ls.density + 1.0
        return 3.0 * ls.density
