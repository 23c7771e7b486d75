"""Swap a model's ``nn.Linear``/``nn.Conv2d`` layers (and the projections of its
``nn.MultiheadAttention`` modules) for sparse ones, and back; the per-layer density
distributions of ``ALGORITHMS.md`` (uniform and ERK)."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import warnings

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ._util import check_block_size
from .nn.attention import MultiheadAttention
from .nn.base import INITS, check_layout, check_sparsity, keep_count
from .nn.conv import SparseConv2d
from .nn.linear import SparseLinear

__all__ = ["sparsify", "densify", "erk_densities", "layer_densities", "layer_seed",
           "layer_generator", "keep_count", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("erk", "uniform")
# exact types swapped (NonDynamicallyQuantizableLinear, nn.MultiheadAttention's out_proj, is a
# plain nn.Linear under another name)
_SWAP = {nn.Linear: SparseLinear, NonDynamicallyQuantizableLinear: SparseLinear,
         nn.Conv2d: SparseConv2d}
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- seeds
def layer_seed(seed: int, step: int, layer_index: int) -> int:
    """A 63-bit seed mixed from ``(seed, step, layer_index)`` (splitmix64), the same on every
    process: the source of every random draw of sparsekern (initial masks, SET growth, ...)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9
         + int(layer_index) * 0x94D049BB133111EB + 0x2545F4914F6CDD1D) & _MASK64
    for _ in range(2):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def layer_generator(seed: int, step: int, layer_index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`layer_seed`."""
    return torch.Generator().manual_seed(layer_seed(seed, step, layer_index))


# --------------------------------------------------------------------------- densities
def _budget(sizes: Sequence[int], sparsity: float) -> int:
    """Active entries allowed over all layers: the sum of the per-layer exact counts at
    uniform ``sparsity``."""
    return sum(keep_count(n, sparsity) for n in sizes)


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float,
                  dense_mask: Optional[Sequence[bool]] = None) -> list[float]:
    """Erdős–Rényi-kernel densities (RigL): ``density_l = ε·Σdims(W_l)/Πdims(W_l)``.

    ``ε`` is solved so that ``Σ density_l·N_l`` equals the budget ``Σ_l (N_l − floor(s·N_l))``
    (all layers, ``dense_mask`` ones included and charged at full size). Whenever
    ``ε·max(raw) > 1`` every layer at the max becomes dense and ``ε`` is solved again.

    Args:
        shapes: PyTorch weight shapes, e.g. ``(C_out, C_in, kh, kw)`` or ``(out, in)``.
        sparsity: overall sparsity in ``[0, 1]``.
        dense_mask: per layer, True for layers kept dense (excluded from sparsification).

    Returns:
        Per-layer densities in ``[0, 1]``.
    """
    sparsity = check_sparsity(sparsity, "erk_densities")
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense = set() if dense_mask is None else {i for i, d in enumerate(dense_mask) if d}
    budget = _budget(sizes, sparsity)
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        left = budget - sum(sizes[i] for i in dense)
        if left < 0:
            raise ValueError(f"erk_densities: sparsity={sparsity} leaves {budget} active "
                             f"entries, fewer than the {budget - left} of the dense layers")
        if not rest:
            break
        eps = left / sum(raw[i] * sizes[i] for i in rest)
        top = max(raw[i] for i in rest)
        if eps * top <= 1:
            break
        dense |= {i for i in rest if raw[i] == top}
    return [1.0 if i in dense else min(1.0, eps * raw[i]) for i in range(len(shapes))]


def uniform_densities(shapes: Sequence[Sequence[int]], sparsity: float,
                      dense_mask: Optional[Sequence[bool]] = None) -> list[float]:
    """Every layer at ``1 − sparsity``; with dense (excluded) layers charged to the budget,
    the others share what is left at one common density."""
    sparsity = check_sparsity(sparsity, "uniform_densities")
    dense = [bool(d) for d in dense_mask] if dense_mask is not None else [False] * len(shapes)
    if not any(dense):
        return [1.0 - sparsity] * len(shapes)
    sizes = [math.prod(s) for s in shapes]
    left = _budget(sizes, sparsity) - sum(n for n, d in zip(sizes, dense) if d)
    rest = sum(n for n, d in zip(sizes, dense) if not d)
    if left < 0:
        raise ValueError(f"uniform_densities: sparsity={sparsity} leaves fewer active entries "
                         f"than the dense layers hold")
    d = min(1.0, left / rest) if rest else 1.0
    return [1.0 if dn else d for dn in dense]


def layer_densities(shapes: Sequence[Sequence[int]], sparsity: float, distribution: str = "erk",
                    dense_mask: Optional[Sequence[bool]] = None) -> list[float]:
    """Per-layer densities for ``distribution`` ``"erk"`` or ``"uniform"``."""
    if distribution == "erk":
        return erk_densities(shapes, sparsity, dense_mask)
    if distribution == "uniform":
        return uniform_densities(shapes, sparsity, dense_mask)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


# --------------------------------------------------------------------------- model surgery
def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _aliases(model: nn.Module, pick) -> dict[int, list[str]]:
    """Every name (shared modules have several) of the modules ``pick`` selects, by ``id``."""
    out: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if pick(m):
            out.setdefault(id(m), []).append(n)
    return out


def _inside(name: str, prefixes) -> bool:
    return any(name.startswith(p + ".") for p in prefixes if p) or ("" in prefixes and bool(name))


def sparsify(model: nn.Module, sparsity: float, *, distribution: str = "erk", block_size=(1, 1),
             layout: str = "dense",
             exclude: Union[None, Sequence[str], Callable[[str, nn.Module], bool]] = None,
             seed: Optional[int] = None, dense_first_conv: bool = True,
             init: str = "random") -> nn.Module:
    """Replace every ``nn.Linear``/``nn.Conv2d`` of ``model`` by a
    :class:`SparseLinear`/:class:`SparseConv2d` holding its weights, in place.

    ``nn.MultiheadAttention`` modules become :class:`sparsekern.nn.MultiheadAttention` (same
    computation, loaded from their weights) whose ``q_proj``/``k_proj``/``v_proj``/``out_proj``
    are then sparsified like any ``nn.Linear`` (the packed ``in_proj_weight`` is split by rows).
    Other subclasses of ``nn.Linear``/``nn.Conv2d``/``nn.MultiheadAttention`` are left dense with
    a warning (their ``forward`` may differ); exclude them to silence it. ``nn.TransformerEncoder``
    modules holding sparse layers get ``use_nested_tensor = False`` and sparse layers carry a
    no-op forward pre-hook, so that PyTorch's fused Transformer inference paths, which read the
    weights as dense matrices, are not taken.

    Layer densities follow ``distribution`` (``"erk"`` or ``"uniform"``) so that the overall
    density of all these layers is ``1 − sparsity``; layers kept dense (``exclude``, and the first
    conv when ``dense_first_conv``; an excluded ``nn.MultiheadAttention`` stays as it is) are
    charged to that budget. With ``init="random"`` each mask is drawn uniformly at random with
    exact counts (``N − floor(s_l·N)`` entries, or blocks) from a generator seeded by
    ``layer_seed(seed, 0, layer_index)`` (``layer_index`` counts the layers swapped or kept dense
    in ``named_modules()`` order after the attention conversion); ``seed=None`` draws the seed
    from the global RNG. ``init="magnitude"`` keeps each layer's largest ``|W|`` instead (block
    means for blocks; one-shot pruning of a pretrained model).

    A layer keeps ``requires_grad`` of its weight and bias (a frozen layer stays frozen, and DST
    methods keep its mask). A module used in several places (weight sharing by module) becomes
    one sparse layer that replaces it everywhere; it is counted once. Distinct layers that share
    a weight or bias ``Parameter`` (tied weights) are rejected: a sparse layer owns its weight
    and mask, so share the module itself or exclude the tied layers. On an error the model is
    left as it was.

    Args:
        model: the model (a bare ``nn.Linear``/``nn.Conv2d``/``nn.MultiheadAttention`` is
            returned converted).
        sparsity: overall sparsity in ``[0, 1]``.
        exclude: module names (as in ``named_modules()``, any of a shared module's names; an
            ``nn.MultiheadAttention``'s name keeps it whole, ``<name>.q_proj`` etc. one
            projection) or a predicate ``(name, module) -> bool`` selecting the modules to keep
            dense (asked about each ``nn.MultiheadAttention`` first, then about each layer).
        seed: an int, or None.
        init: ``"random"`` or ``"magnitude"``.

    Returns:
        ``model`` (the converted module for a bare layer).
    """
    return _sparsify(model, sparsity, distribution=distribution, block_size=block_size,
                     layout=layout, exclude=exclude, seed=seed,
                     dense_first_conv=dense_first_conv, init=init)[0]


def _sparsify(model: nn.Module, sparsity: float, *, distribution: str = "erk",
              block_size=(1, 1), layout: str = "dense", exclude=None, seed=None,
              dense_first_conv: bool = True, init: str = "random"):
    """:func:`sparsify`, also returning ``{old Parameter: [new Parameters]}`` for each
    Parameter it replaced (a packed ``in_proj_weight``/``in_proj_bias`` maps to three, split
    along dim 0 in that order)."""
    who = "sparsify"
    sparsity = check_sparsity(sparsity, who)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"{who}: distribution must be one of {DISTRIBUTIONS}, got "
                         f"{distribution!r}")
    block_size = check_block_size(block_size, who)
    check_layout(layout, who)
    if init not in INITS:
        raise ValueError(f"{who}: init must be one of {INITS}, got {init!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"{who}: seed must be an int or None, got {seed!r}")
    if isinstance(exclude, str):
        raise TypeError(f"{who}: exclude must be a list of module names or a predicate, got "
                        f"the string {exclude!r}")
    if exclude is not None and not callable(exclude):
        exclude = set(exclude)
        _check_exclude_names(model, exclude, who)

    def excluded_by(name_list, module) -> bool:
        if exclude is None:
            return False
        if callable(exclude):
            return bool(exclude(name_list[0], module))
        return bool(exclude & set(name_list))

    mha_alias = _aliases(model, lambda m: type(m) is nn.MultiheadAttention)
    mhas = {id(m): m for m in model.modules() if type(m) is nn.MultiheadAttention}
    kept = {i for i, names in mha_alias.items() if excluded_by(names, mhas[i])}
    kept_names = [n for i in kept for n in mha_alias[i]]
    converted: list[tuple[str, nn.Module]] = []  # (name, original) to undo on an error
    swaps: dict = {}
    root = model
    try:
        for i, names in mha_alias.items():
            if i in kept:
                continue
            old = mhas[i]
            new = MultiheadAttention.from_torch(old)
            for alias in names:
                converted.append((alias, old))
                if alias:
                    _set_child(model, alias, new)
                else:
                    root = new
            if old.in_proj_weight is not None:
                swaps[old.in_proj_weight] = [new.q_proj.weight, new.k_proj.weight,
                                             new.v_proj.weight]
            else:
                for pn in ("q", "k", "v"):
                    swaps[getattr(old, f"{pn}_proj_weight")] = [getattr(new, f"{pn}_proj").weight]
            if old.in_proj_bias is not None:
                swaps[old.in_proj_bias] = [new.q_proj.bias, new.k_proj.bias, new.v_proj.bias]
        root = _swap_layers(root, sparsity, distribution, block_size, layout, excluded_by,
                            seed, dense_first_conv, init, kept_names,
                            [mhas[i] for i in kept], swaps, who)
    except BaseException:
        for alias, old in reversed(converted):
            if alias:
                _set_child(model, alias, old)
        raise
    for enc in root.modules():
        if isinstance(enc, nn.TransformerEncoder) and any(
                isinstance(m, (SparseLinear, SparseConv2d, MultiheadAttention))
                for m in enc.modules()):
            enc.use_nested_tensor = False
    return root, swaps


def _check_exclude_names(model: nn.Module, names: set, who: str) -> None:
    """Names of ``exclude`` must name a layer, an ``nn.MultiheadAttention`` or (after its
    conversion) one of its projections."""
    known = set()
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
            known.add(n)
        if type(m) is nn.MultiheadAttention:
            known |= {f"{n}.{p}_proj" if n else f"{p}_proj" for p in ("q", "k", "v")}
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"{who}: exclude names {unknown} are not nn.Linear/nn.Conv2d/"
                         f"nn.MultiheadAttention modules (or attention projections) of the model")


def _swap_layers(model, sparsity, distribution, block_size, layout, excluded_by, seed,
                 dense_first_conv, init, kept_names, kept_mhas, swaps, who):
    """The layer swap of :func:`_sparsify` after the attention conversion; adds the swapped
    Parameters to ``swaps`` (composed with the conversion's entries)."""
    aliases = _aliases(model, lambda m: type(m) in _SWAP)
    layers = [(n, m) for n, m in model.named_modules()
              if type(m) in _SWAP and not _inside(n, kept_names)]
    excluded = [excluded_by(aliases[id(m)], m) for _, m in layers]
    others = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))
              and type(m) not in _SWAP and type(m) not in (nn.MultiheadAttention,
                                                          MultiheadAttention)
              and not _inside(n, kept_names) and not excluded_by([n], m)]
    if others:
        warnings.warn(f"{who}: {others} are subclasses of nn.Linear/nn.Conv2d/"
                      f"nn.MultiheadAttention and stay dense (their forward may differ from the "
                      f"base class's); exclude them to silence this warning", stacklevel=4)
    if dense_first_conv:
        first = next((i for i, (_, m) in enumerate(layers) if type(m) is nn.Conv2d), None)
        if first is not None:
            excluded[first] = True
    _check_tied(model, [m for (_, m), skip in zip(layers, excluded) if not skip], aliases, who)
    shapes = [tuple(m.weight.shape) for _, m in layers]
    charged = []  # weights of kept nn.MultiheadAttention modules, dense
    for mha in kept_mhas:
        ws = [mha.in_proj_weight] if mha.in_proj_weight is not None else \
            [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        charged += [tuple(w.shape) for w in ws] + [tuple(mha.out_proj.weight.shape)]
    densities = layer_densities(shapes + charged, sparsity, distribution,
                                excluded + [True] * len(charged))[:len(layers)]
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    new_params: dict = {}
    for index, ((name, module), skip, density) in enumerate(zip(layers, excluded, densities)):
        if skip:
            continue
        new = _SWAP[type(module)].from_dense(
            module, sparsity=min(max(1.0 - density, 0.0), 1.0), block_size=block_size,
            layout=layout, init=init, seed=layer_seed(seed, 0, index))
        new.train(module.training)
        for pn in ("weight", "bias"):
            before, after = getattr(module, pn), getattr(new, pn)
            if before is not None and after is not None:
                new_params[before] = after
        if not name:
            model = new
        for alias in aliases[id(module)]:
            if alias:
                _set_child(model, alias, new)
    for old, parts in swaps.items():
        swaps[old] = [new_params.pop(p, p) for p in parts]
    swaps.update({old: [new] for old, new in new_params.items()})
    return model


def _check_tied(model: nn.Module, swapped: list[nn.Module], aliases: dict, who: str) -> None:
    """Raise when a layer to be swapped shares its weight or bias with another module."""
    owners: dict[int, list[str]] = {}
    seen = set()
    for n, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen:
            continue
        seen.add(id(m))
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{n}.{pn}" if n else pn)
    for m in swapped:
        for pn in ("weight", "bias"):
            p = getattr(m, pn, None)
            if p is None or len(owners.get(id(p), ())) < 2:
                continue
            mine = f"{aliases[id(m)][0]}.{pn}" if aliases[id(m)][0] else pn
            others = [o for o in owners[id(p)] if o != mine]
            raise ValueError(
                f"{who}: {mine} is the same Parameter as {', '.join(others)} (tied weights); "
                f"a sparse layer owns its weight and mask, so tied layers cannot be sparsified "
                f"separately: share the module itself (one layer object used in both places) "
                f"or exclude the tied layer(s) from sparsify")


def densify(model: nn.Module) -> nn.Module:
    """The inverse of :func:`sparsify`: every :class:`SparseLinear`/:class:`SparseConv2d`
    becomes the ``nn`` layer holding ``W ⊙ mask``, and every
    :class:`sparsekern.nn.MultiheadAttention` an ``nn.MultiheadAttention``, in place (an
    ``nn.TransformerEncoder``'s ``use_nested_tensor`` stays False). Returns ``model`` (the
    converted module for a bare layer)."""
    if isinstance(model, (SparseLinear, SparseConv2d)):
        return model.to_dense().train(model.training)
    if isinstance(model, MultiheadAttention):
        return model.to_torch()
    for name, module in list(model.named_modules()):
        if isinstance(module, (SparseLinear, SparseConv2d)):
            new = module.to_dense().train(module.training)
            for alias in _aliases(model, lambda m: m is module)[id(module)]:
                _set_child(model, alias, new)
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiheadAttention):
            new = module.to_torch()
            for alias in _aliases(model, lambda m: m is module)[id(module)]:
                _set_child(model, alias, new)
    return model
