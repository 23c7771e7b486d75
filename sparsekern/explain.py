"""``sk.explain(op, *args)``: which backend, kernel path, ISA and fallback an op call takes,
and why — every choice from one place.

Each choice is made by one function that the dispatch path calls as well; this module only
asks them and words the answer:

- the backend: :func:`sparsekern.ops.resolve_backend` (``set_backend``/``SPARSEKERN_BACKEND``,
  else ``auto`` by device);
- a provider sending a call to the reference: ``reference_reason`` of
  :mod:`sparsekern.cpp_backend` (dtypes, grouped convolutions) and of
  :mod:`sparsekern.kernels` (dtypes, tile size, growth score grid);
- the C++ dense fallback above a density threshold: ``torch.ops.sparsekern._cpu_linear_path``
  (``use_dense`` in csrc/cpu/linear_cpu.cpp);
- the C++ instruction set: ``torch.ops.sparsekern._cpu_isa`` (``kernels()``, csrc/cpu);
- rows with NaN/inf recomputed by the reference: ``sparsekern.ops._nonfinite_rows``.

:data:`TABLE` states the rules per backend; :func:`backend_table_markdown` renders it for the
README's backend section (a test keeps the two equal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import ops, spec
from .topology import as_topo


@dataclass(frozen=True)
class BackendRules:
    """One backend: where it runs, when ``auto`` picks it, its kernel paths and what it sends
    to the reference."""

    name: str
    runs_on: str
    auto: str
    kernels: str
    reference_for: str


TABLE: tuple[BackendRules, ...] = (
    BackendRules(
        "triton", "CUDA; CPU under `TRITON_INTERPRET=1`",
        "first for CUDA tensors, and for CPU tensors under `TRITON_INTERPRET=1`",
        "`sparsekern/kernels/`: block path for 16/32/64/128 blocks, tile path otherwise; the "
        "growth ops score dense gradient tiles and radix-select the exact top-k",
        "dtypes other than fp32/fp16/bf16; block sizes whose tile would pass 128 elements; "
        "growth score grids of 2^31 entries or more"),
    BackendRules(
        "cpp", "CPU",
        "for CPU tensors (after Triton under `TRITON_INTERPRET=1`)",
        "`csrc/cpu/`, ISA picked at run time: AVX-512 > AVX2 > generic "
        "(`SPARSEKERN_CPU_ISA` forces one); `bsr_mm`, `bsr_mm_t`, `sddmm` run MKL on the dense "
        "W ⊙ mask above a measured density (`SPARSEKERN_DENSE_THRESHOLD` overrides); the conv "
        "ops run oneDNN on the selected W ⊙ mask below a per-op crossover in FLOPs and density "
        "(`SPARSEKERN_DENSE_CROSSOVER=never|always|auto`)",
        "dtypes other than fp32/bf16; grouped convolutions"),
    BackendRules(
        "cuda", "CUDA",
        "for CUDA tensors when Triton is missing",
        "`csrc/cuda/`: `bsr_mm`, `bsr_mm_t`, `sddmm`, `grow_topk`, `fused_weight_grad`",
        "the conv ops; mixed dtypes; a non-bool mask; fp64 growth scores"),
    BackendRules(
        "reference", "any device",
        "when no other backend loads and runs on the device",
        "`sparsekern/reference.py`: plain PyTorch, the meaning of every op",
        "—"),
)
"""The rules per backend, in ``auto``'s order of preference."""

_RULES = {r.name: r for r in TABLE}


def backend_table_markdown() -> str:
    """:data:`TABLE` as the Markdown table of the README's backend section."""
    rows = ["| backend | runs on | `auto` picks it | kernels | runs on the reference |",
            "|---|---|---|---|---|"]
    rows += [f"| `{r.name}` | {r.runs_on} | {r.auto} | {r.kernels} | {r.reference_for} |"
             for r in TABLE]
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class Explanation:
    """What an op call runs and why (``str()`` gives a readable report)."""

    op: str
    backend: str
    backend_reason: str
    runs: str
    path: str
    isa: Optional[str] = None
    fallback: Optional[str] = None
    nonfinite: Optional[str] = None

    def __str__(self) -> str:
        lines = [f"{self.op}: backend {self.backend} ({self.backend_reason})",
                 f"  runs: {self.runs}", f"  path: {self.path}"]
        if self.isa is not None:
            lines.append(f"  isa: {self.isa}")
        if self.fallback is not None:
            lines.append(f"  reference because: {self.fallback}")
        if self.nonfinite is not None:
            lines.append(f"  non-finite rows: {self.nonfinite}")
        return "\n".join(lines)


def _bind(s: spec.OpSpec, args: tuple, kwargs: dict) -> tuple:
    names = s.arg_names
    if len(args) > len(names):
        raise TypeError(f"explain: {s.name} takes {len(names)} arguments, got {len(args)}")
    unknown = set(kwargs) - set(names[len(args):])
    if unknown:
        raise TypeError(f"explain: {s.name} got unexpected or repeated arguments "
                        f"{sorted(unknown)}")
    missing = [n for n in names[len(args):] if n not in kwargs]
    if missing:
        raise TypeError(f"explain: {s.name} is missing arguments {missing}")
    return tuple(args) + tuple(kwargs[n] for n in names[len(args):])


def _op_name(op) -> str:
    name = op if isinstance(op, str) else getattr(op, "_name", getattr(op, "__name__", None))
    if name not in spec.BY_NAME:
        raise ValueError(f"explain: op must be one of {spec.NAMES} (a name or the op), "
                         f"got {op!r}")
    return name


def _backend_reason(backend: str, device: torch.device) -> str:
    chosen = ops.get_backend()
    if chosen != "auto":
        return f"set_backend({chosen!r}) or SPARSEKERN_BACKEND={chosen}"
    order = ops._auto_order(device.type)
    skipped = []
    for cand in order:
        if cand == backend:
            break
        prov = ops._provider(cand)
        skipped.append(f"{cand}: " + (ops.available_backends()[cand] if prov is None
                                      else f"does not run on {device.type}"))
    why = f"auto for {device.type} tensors tries {', '.join(order)}"
    return why + (f"; skipped {'; '.join(skipped)}" if skipped else "")


_CPP_PATHS = {
    "bsr_mm": ("element-mask kernel: gathered CSR values against transposed activations",
               "block kernel: packed W ⊙ mask blocks against transposed activation tiles"),
    "bsr_mm_t": ("element-mask kernel: gathered CSC values against transposed gradients",
                 "block kernel over the CSC view: packed blocks against transposed gradients"),
    "sddmm": ("dot products per active entry over batch tiles",
              "outer-product kernel per active block"),
    "grow_topk": "dense gradient in 128x256 macro tiles, scored and filtered into the exact "
                 "top-k (never stored whole)",
    "fused_weight_grad": "dense gradient in 128x256 macro tiles: active blocks stored, scores "
                         "filtered into the exact top-k",
    "conv2d": "im2col tiles against packed W ⊙ mask",
    "conv2d_grad_input": "packed W ⊙ mask against dy tiles, col2im into dx",
    "conv2d_sddmm": "im2col tiles against dy, per active entry or block",
    "conv2d_grow_topk": "dense weight gradient in row panels, filtered into the exact top-k",
    "conv2d_fused_weight_grad": "dense weight gradient in row panels: active blocks stored, "
                                "scores filtered into the exact top-k",
}


def _conv_plan(s: spec.OpSpec, args: tuple) -> str:
    """``"sparse"`` or ``"dense"``: the C++ conv op's own crossover decision for this call."""
    if s.name == "conv2d_grad_input":
        dy, mask = s.arg(args, "dy"), s.arg(args, "mask")
        x_shape = [dy.shape[0], mask.shape[1] * s.arg(args, "groups"), *s.arg(args, "input_hw")]
    else:
        x_shape = list(s.arg(args, "x").shape)
    if s.name == "conv2d_grow_topk":
        w_shape, nnzb = list(s.arg(args, "weight_shape")), 0
    else:
        w_shape = list(s.arg(args, "mask").shape)
        nnzb = as_topo(s.arg(args, "topo")).col_idx.numel()
    return torch.ops.sparsekern._conv2d_plan(
        s.name, x_shape, w_shape, nnzb, s.arg(args, "br"), s.arg(args, "bc"),
        s.arg(args, "stride"), s.arg(args, "padding"), s.arg(args, "dilation"),
        s.arg(args, "groups"))


def _cpp_path(s: spec.OpSpec, args: tuple) -> str:
    if s.family == "conv" and _conv_plan(s, args) == "dense":
        return ("dense: oneDNN on the selected W ⊙ mask (below the C++ conv crossover for this "
                "geometry and density; SPARSEKERN_DENSE_CROSSOVER=never|always|auto overrides)")
    linear = s.name if s.name in ("bsr_mm", "bsr_mm_t", "sddmm") else None
    if s.name == "fused_weight_grad" and s.arg(args, "k") == 0:
        linear = "sddmm"
    if linear is None:
        return "sparse: " + _CPP_PATHS.get(s.name, f"C++ kernel of {s.name}")
    br, bc = s.arg(args, "br"), s.arg(args, "bc")
    m, k = s.arg(args, "mask").shape
    nnzb = as_topo(s.arg(args, "topo")).col_idx.numel()
    if torch.ops.sparsekern._cpu_linear_path(linear, nnzb, br, bc, m, k) == "dense":
        density = nnzb * br * bc / (m * k)
        return (f"dense: MKL on the dense W ⊙ mask (active-block density {density:.3g} is above "
                f"the C++ threshold for {br}x{bc} blocks; SPARSEKERN_DENSE_THRESHOLD overrides)")
    elem, block = _CPP_PATHS[linear]
    return "sparse: " + (elem if (br, bc) == (1, 1) else block)


def explain(op, *args, **kwargs) -> Explanation:
    """What ``op(*args, **kwargs)`` would run now, and why; nothing is computed.

    Args:
        op: an op name (``"bsr_mm"``) or the op (``sparsekern.ops.bsr_mm``).
        args, kwargs: the op's arguments, as for the op.
    Returns:
        An :class:`Explanation`; ``print()`` it for a readable report.
    """
    name = _op_name(op)
    s = spec.BY_NAME[name]
    args = _bind(s, args, kwargs)
    act = s.arg(args, s.act)
    backend = ops.resolve_backend(act.device)
    why = _backend_reason(backend, act.device)
    if backend == "reference":
        return Explanation(name, backend, why, f"sparsekern.reference.{name}",
                           _RULES["reference"].kernels)
    prov = ops._provider(backend)
    if name not in prov.IMPLS:
        return Explanation(name, backend, why, f"sparsekern.reference.{name}", "reference",
                           fallback=f"the {backend} backend does not implement {name}")
    fallback = path = isa = None
    runs = f"{prov.__name__}.IMPLS[{name!r}]"
    if backend == "cpp":
        fallback = prov.reference_reason(name, args)
        if fallback is None:
            runs, path = f"C++ kernel sparsekern::_{name}", _cpp_path(s, args)
            isa = torch.ops.sparsekern._cpu_isa()
    elif backend == "triton":
        fallback = prov.reference_reason(name, args)
        if fallback is None:
            runs, path = f"Triton launcher for {name}", prov.kernel_path(name, args)
            isa = "GPU" if act.device.type == "cuda" else "Triton interpreter (TRITON_INTERPRET=1)"
    else:
        fallback = prov.reference_reason(name, args)
        runs, path, isa = f"CUDA kernel sparsekern::_{name}", "csrc/cuda", "GPU"
        if fallback is not None and name == "fused_weight_grad":
            return Explanation(name, backend, why, "cuda_backend: sddmm, then grow_topk",
                               "two calls (sk.explain each of them)", isa,
                               fallback=f"not fused: {fallback}")
    if fallback is not None:
        runs, path = f"sparsekern.reference.{name}", "reference"
    nonfinite = None
    if s.nonfinite_rows and fallback is None:
        rows = ops._nonfinite_rows(act)
        if rows is not None:
            nonfinite = (f"{rows.numel()} row(s) of {s.act} hold NaN/inf: recomputed by the "
                         "reference (the dense op's meaning, NaN·0 = NaN)")
    return Explanation(name, backend, why, runs, path, isa, fallback, nonfinite)


explain.backend_table_markdown = backend_table_markdown  # sk.explain.backend_table_markdown()

__all__ = ["BackendRules", "Explanation", "TABLE", "backend_table_markdown", "explain"]
