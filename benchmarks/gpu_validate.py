"""One command that proves sparsekern's GPU path on a real device, within 8 minutes.

    python3 benchmarks/gpu_validate.py                  # all parts; writes runs/gpu_validate/
    python3 benchmarks/gpu_validate.py --out DIR --parts kernels,modules
    python3 benchmarks/gpu_validate.py --list           # the case lists (no GPU needed)
    python3 benchmarks/gpu_validate.py --selftest       # the pipeline on the CPU, the reference
                                                        # standing in for the GPU backends

Parts, each in its own worker processes (a crash or a sticky CUDA error stays in its worker)
and each with a time budget; cases left when a budget runs out are reported as skipped:

* ``kernels`` — every op of the Triton backend (and of the CUDA C++ backend when
  ``sparsekern._C`` was built with CUDA) on ``cuda`` tensors against the reference on the CPU:
  forward, grad_input, SDDMM, exact growth top-k, the fused weight-side pass and the conv
  variants, in fp16/bf16/fp32 (fp64 too for the CUDA mm ops), on the test suite's shapes plus
  multi-tile ones. Data are small integers, so every product and sum is exact in any order and
  the comparison is exact (indices, scores and values bit for bit). Sharded over processes so
  Triton compiles in parallel.
* ``modules`` — ``SparseLinear``/``SparseConv2d`` forward and backward on ``cuda`` against the
  CPU reference, a short RigL run that is exact by construction (integer data, weights kept on
  a 1/16 grid) whose masks, weights and input gradients must equal the CPU reference's at every
  step, and ``torch.compile(fullgraph=True)`` of a module. Runs beside ``kernels``.
* ``bench`` — ``bench_triton.py``'s measurements against cuBLAS dense and
  ``torch.sparse._triton_ops.bsr_dense_mm``, blocks 16/32/64, sparsity 50-98%, fp16 and bf16,
  with the growth step against dense ``dyᵀ @ x`` + ``torch.topk``. Runs alone, after the others.

Writes ``validate.json`` and ``validate.md`` (and one log per worker) to ``--out``; exits 1 on any
mismatch, error, crash or hang. Without a CUDA GPU it says so and exits 0. ``TRITON_INTERPRET``
is unset for the run (the workers start without it) and a worker refuses to run if the Triton
kernels it imported are interpreted. Installs nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DTYPES = ("fp16", "bf16", "fp32")
LINEAR_OPS = ("bsr_mm", "bsr_mm_t", "sddmm", "grow_topk", "fused_weight_grad")
CONV_OPS = ("conv2d", "conv2d_grad_input", "conv2d_sddmm", "conv2d_grow_topk",
            "conv2d_fused_weight_grad")
TRITON_OPS = LINEAR_OPS + CONV_OPS
CUDA_OPS = LINEAR_OPS
CUDA_MM_DTYPES = DTYPES + ("fp64",)  # the CUDA mm kernels also take fp64; Triton routes it away
PARTS = ("kernels", "modules", "bench")
# seconds: a worker starts no new case after its budget; it is killed GRACE_S later
BUDGET_S = {"kernels": 200.0, "modules": 200.0, "bench": 170.0}
GRACE_S = 35.0
BONUS, EPS = 0.75, 1.0

# the test suite's shapes (tests/_triton_cases.py, tests/test_triton_conv.py,
# tests/test_cuda_kernels.py) plus multi-tile ones that only a GPU runs quickly
SMALL = (13, 67, 45)  # B, M, K
LARGE = (300, 520, 390)
TRITON_BLOCKS = ((1, 1), (16, 16), (3, 5), (32, 16), (64, 64))
TOPK_BLOCKS = ((1, 1), (16, 16), (3, 5), (32, 32))
CONV_CASES = {  # N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups
    "3x7_s2_d2_g4": (1, 8, 8, 7, 15, (3, 7), (2, 2), (1, 2), (2, 2), 4),
    "3x3_s1_p1": (2, 6, 20, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "3x3_s21_d12_g2": (1, 4, 24, 8, 9, (3, 3), (2, 1), (0, 1), (1, 2), 2),
    "large_3x3_p1": (4, 32, 64, 14, 14, (3, 3), (1, 1), (1, 1), (1, 1), 1),
}
CONV_BLOCKS = ((1, 1), (16, 16), (2, 3))
CUDA_SPMM = (  # B, M, K, br, bc, density (tests/test_cuda_kernels.py SPMM_CASES)
    (5, 13, 67, 1, 1, 0.5), (4, 67, 13, 1, 1, 0.9), (3, 64, 64, 16, 16, 0.5),
    (70, 70, 45, 32, 8, 0.7), (3, 45, 70, 3, 5, 0.6), (2, 123, 67, 64, 2, 0.5),
    (3, 40, 40, 4, 4, 0.0), (3, 40, 40, 4, 4, 1.0), (0, 17, 9, 2, 2, 0.5),
    (2, 30, 90, 1, 70, 0.5), (40, 150, 140, 70, 20, 0.5), (300, 520, 390, 32, 32, 0.3),
)
CUDA_GROW = (  # B, M, K, br, bc, k, counter (GROW_CASES)
    (5, 37, 53, 1, 1, 40, False), (3, 67, 130, 1, 1, 100, True), (2, 64, 64, 4, 4, 30, False),
    (4, 100, 70, 3, 7, 25, True), (3, 130, 90, 65, 2, 2, False), (2, 20, 200, 1, 100, 3, True),
    (0, 13, 17, 1, 1, 5, False), (70, 70, 66, 2, 1, 60, True), (64, 512, 384, 1, 1, 3000, True),
)


@dataclass
class Case:
    """One op call: ``backend`` (``triton``/``cuda``), op name, dtype name, a short id and the
    parameters :func:`build` turns into arguments. ``tier`` 0 runs first."""

    backend: str
    op: str
    dtype: str
    name: str
    params: dict = field(default_factory=dict)
    tier: int = 1

    @property
    def id(self) -> str:
        return f"{self.backend}:{self.op}:{self.dtype}:{self.name}"


def _linear_cases(backend: str, dtype: str) -> list[Case]:
    out = []

    def add(op, name, tier=1, **p):
        out.append(Case(backend, op, dtype, name, p, tier))

    for bs in TRITON_BLOCKS:
        for sp in (0.0, 0.9, 1.0):
            for layout in ("dense", "bsr"):
                for op in ("bsr_mm", "bsr_mm_t"):
                    add(op, f"{bs[0]}x{bs[1]}_sp{sp}_{layout}", int(sp != 0.9),
                        shape=SMALL, bs=bs, sparsity=sp, layout=layout)
            add("sddmm", f"{bs[0]}x{bs[1]}_sp{sp}", int(sp != 0.9), shape=SMALL, bs=bs,
                sparsity=sp)
    for bs in ((16, 16), (3, 5)):  # a mask that is not constant on its blocks
        for op in ("bsr_mm", "bsr_mm_t", "sddmm"):
            add(op, f"{bs[0]}x{bs[1]}_elementmask", shape=SMALL, bs=bs, sparsity=0.5,
                layout="dense", elem=True)
    for bs in ((1, 1), (16, 16), (32, 32), (64, 64)):
        for layout in ("dense", "bsr"):
            for op in ("bsr_mm", "bsr_mm_t"):
                add(op, f"large_{bs[0]}x{bs[1]}_{layout}", shape=LARGE, bs=bs, sparsity=0.7,
                    layout=layout)
        add("sddmm", f"large_{bs[0]}x{bs[1]}", shape=LARGE, bs=bs, sparsity=0.7)
    for bs in TOPK_BLOCKS:
        for k in ("1", "17", "all"):
            for counter in (False, True):
                add("grow_topk", f"{bs[0]}x{bs[1]}_k{k}_{'counter' if counter else 'plain'}",
                    int(not (k == "17" and counter)), shape=SMALL, bs=bs, k=k, counter=counter)
        for k in ("0", "6"):
            add("fused_weight_grad", f"{bs[0]}x{bs[1]}_k{k}", int(k != "6"), shape=SMALL, bs=bs,
                k=k, counter=True, sparsity=0.6)
    add("grow_topk", "nan_inf", shape=SMALL, bs=(1, 1), k="80", counter=True, nan=True)
    for bs, k in (((1, 1), "3000"), ((16, 16), "50")):
        add("grow_topk", f"large_{bs[0]}x{bs[1]}_k{k}", shape=(64, 512, 384), bs=bs, k=k,
            counter=True)
        add("fused_weight_grad", f"large_{bs[0]}x{bs[1]}_k{k}", shape=(64, 512, 384), bs=bs,
            k=k, counter=False, sparsity=0.9)
    return out


def _conv_cases(dtype: str) -> list[Case]:
    out = []
    for cname in CONV_CASES:
        for bs in CONV_BLOCKS:
            tier = int(not (cname == "3x3_s1_p1" and bs in ((1, 1), (16, 16))))
            for layout in ("dense", "bsr"):
                for op in ("conv2d", "conv2d_grad_input"):
                    out.append(Case("triton", op, dtype, f"{cname}_{bs[0]}x{bs[1]}_{layout}",
                                    dict(conv=cname, bs=bs, layout=layout), tier))
            for op in ("conv2d_sddmm", "conv2d_grow_topk", "conv2d_fused_weight_grad"):
                out.append(Case("triton", op, dtype, f"{cname}_{bs[0]}x{bs[1]}",
                                dict(conv=cname, bs=bs, layout="dense"), tier))
    return out


def _cuda_cases(dtype: str) -> list[Case]:
    out = []
    for i, (b, m, k, br, bc, d) in enumerate(CUDA_SPMM):
        name = f"B{b}_{m}x{k}_b{br}x{bc}_d{d}"
        tier = int(i not in (0, 2, 3))
        for layout in ("dense", "bsr"):
            for op in ("bsr_mm", "bsr_mm_t"):
                out.append(Case("cuda", op, dtype, f"{name}_{layout}",
                                dict(shape=(b, m, k), bs=(br, bc), sparsity=1 - d,
                                     layout=layout, elem=True), tier))
        out.append(Case("cuda", "sddmm", dtype, name, dict(shape=(b, m, k), bs=(br, bc),
                                                            sparsity=1 - d, elem=True), tier))
    if dtype == "fp64":
        return out
    for i, (b, m, k, br, bc, kk, counter) in enumerate(CUDA_GROW):
        name = f"B{b}_{m}x{k}_b{br}x{bc}_k{kk}_{'counter' if counter else 'plain'}"
        tier = int(i not in (0, 3))
        out.append(Case("cuda", "grow_topk", dtype, name,
                        dict(shape=(b, m, k), bs=(br, bc), k=str(kk), counter=counter,
                             inf=b > 1), tier))
        if i < 5:
            out.append(Case("cuda", "fused_weight_grad", dtype, name,
                            dict(shape=(b, m, k), bs=(br, bc), k=str(kk), counter=counter,
                                 sparsity=0.5), tier))
    return out


def cases() -> list[Case]:
    """Every kernel case of part ``kernels``, tier 0 (one or a few per op x dtype) first. Built
    without a GPU or triton."""
    out = []
    for dt in DTYPES:
        out += _linear_cases("triton", dt) + _conv_cases(dt)
    for dt in CUDA_MM_DTYPES:
        out += _cuda_cases(dt)
    return sorted(out, key=lambda c: c.tier)  # stable: tier 0 of every op first


def bench_cases() -> list[tuple]:
    """``(shape, block, sparsity, dtype)`` for part ``bench``, in the order they run (every
    block x dtype at 90% first, then the other sparsities, then the second shape and conv)."""
    import bench_triton as bt
    fc1, l3 = bt.LINEAR_SHAPES[0], bt.LINEAR_SHAPES[2]
    out = []
    for shape, sps in ((fc1, (0.9,)), (fc1, (0.5, 0.98)), (l3, (0.9, 0.5, 0.98))):
        for sp in sps:
            for dt in ("fp16", "bf16"):
                for bs in bt.BLOCKS:
                    out.append((shape, bs, sp, dt))
    for dt in ("fp16", "bf16"):
        for bs in (16, 32):
            out.append((bt.CONV_SHAPES[0], bs, 0.9, dt))
    return out


def shard(items: list, n: int) -> list[list[int]]:
    """Indices of ``items`` (cases) split into ``n`` shards, whole ``(backend, op, dtype)``
    groups per shard (each Triton kernel specialisation compiles in one process), balanced by
    size; within a shard the original order (tier 0 first) is kept."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(items):
        groups.setdefault((c.backend, c.op, c.dtype), []).append(i)
    shards: list[list[int]] = [[] for _ in range(max(1, n))]
    for idx in sorted(groups.values(), key=len, reverse=True):
        min(shards, key=len).extend(idx)
    return [sorted(s) for s in shards if s]


# --------------------------------------------------------------------------- inputs
def _torch_dtype(name: str):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
            "fp64": torch.float64}[name]


def _ints(gen, *shape):
    import torch
    return torch.randint(-3, 4, shape, generator=gen).float()


def _mask(gen, m, k, bs, sparsity, elem=False):
    import torch

    from sparsekern.topology import expand_blocks, grid_shape
    bm = torch.rand(grid_shape((m, k), bs), generator=gen) >= sparsity
    if sparsity >= 1.0:
        bm[:] = False
    mask = expand_blocks(bm, bs, (m, k))
    if elem:
        mask &= torch.rand(m, k, generator=gen) < 0.8
    return mask


def build(case: Case) -> tuple:
    """The CPU arguments of ``case`` in the reference's signature (deterministic: seeded from
    the case id). Floats are small integers in the case's dtype."""
    import torch

    from sparsekern import reference as ref
    from sparsekern.topology import build_topology, grid_shape
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dt = _torch_dtype(case.dtype)
    p = case.params
    br, bc = p["bs"]
    if "conv" in p:
        n, cin, cout, h, w, (kh, kw), st, pd, dl, g = CONV_CASES[p["conv"]]
        m, k = cout, cin // g * kh * kw
        mask2 = _mask(gen, m, k, (br, bc), 0.5)
        topo = build_topology(mask2, (br, bc)).tensors
        mask = mask2.view(cout, cin // g, kh, kw)
        x = _ints(gen, n, cin, h, w)
        conv = (list(st), list(pd), list(dl), g)
        wt = _ints(gen, *mask.shape)
        dy = _ints(gen, *ref.conv2d(x, wt, mask, topo, br, bc, *conv).shape)
        if p["layout"] == "bsr":
            wt = ref.gather_blocks(wt.flatten(1), topo[0], topo[1], br, bc).contiguous()
        x, wt, dy = x.to(dt), wt.to(dt), dy.to(dt)
        grid = (m, k) if (br, bc) == (1, 1) else grid_shape((m, k), (br, bc))
        exclude = torch.rand(grid, generator=gen) < 0.3
        counter = torch.randint(0, 3, grid, generator=gen)
        kk = min(7, int((~exclude).sum()))
        return {
            "conv2d": lambda: (x, wt, mask, topo, br, bc, *conv),
            "conv2d_grad_input": lambda: (dy, wt, mask, topo, br, bc, [h, w], *conv),
            "conv2d_sddmm": lambda: (dy, x, mask, topo, br, bc, *conv),
            "conv2d_grow_topk": lambda: (dy, x, exclude, kk, counter, BONUS, EPS, br, bc,
                                         list(mask.shape), *conv),
            "conv2d_fused_weight_grad": lambda: (dy, x, mask, topo, br, bc, exclude, kk, None,
                                                 0.0, 1.0, *conv),
        }[case.op]()
    b, m, k = p["shape"]
    x, dy = _ints(gen, b, k), _ints(gen, b, m)
    if case.op in ("grow_topk", "fused_weight_grad"):
        if p.get("inf") and b > 1:
            dy[0, 1] = float("inf")
        if p.get("nan"):
            x[3, 7], x[5, 20] = float("nan"), float("inf")
        grid = (m, k) if (br, bc) == (1, 1) else grid_shape((m, k), (br, bc))
        exclude = torch.rand(grid, generator=gen) < 0.3
        counter = torch.randint(0, 4, grid, generator=gen) if p["counter"] else None
        n_valid = int((~exclude).sum())
        kk = n_valid if p["k"] == "all" else min(int(p["k"]), n_valid)
        bonus = BONUS if counter is not None else 0.0
        if case.op == "grow_topk":
            return dy.to(dt), x.to(dt), exclude, kk, counter, bonus, EPS, br, bc
        mask = _mask(gen, m, k, (br, bc), p["sparsity"])
        topo = build_topology(mask, (br, bc)).tensors
        return dy.to(dt), x.to(dt), mask, topo, br, bc, exclude, kk, counter, bonus, EPS
    mask = _mask(gen, m, k, (br, bc), p["sparsity"], p.get("elem", False))
    topo = build_topology(mask, (br, bc)).tensors
    if case.op == "sddmm":
        return dy.to(dt), x.to(dt), mask, topo, br, bc
    w = _ints(gen, m, k)
    if p["layout"] == "bsr":
        w = ref.gather_blocks(w, topo[0], topo[1], br, bc).contiguous()
    first = x if case.op == "bsr_mm" else dy
    return first.to(dt), w.to(dt), mask, topo, br, bc


def to_device(obj, device):
    """``obj`` (tensors, possibly in lists/tuples/named tuples) with every tensor moved to
    ``device``."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        moved = [to_device(o, device) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def compare(got, want, device: str | None = None) -> list[str]:
    """Differences between an op's output and the reference's, as messages (empty = equal):
    same structure, dtype and shape, bit-equal values (NaN equal to NaN), on ``device``."""
    import torch
    got_t = got if isinstance(got, (tuple, list)) else (got,)
    want_t = want if isinstance(want, (tuple, list)) else (want,)
    if len(got_t) != len(want_t):
        return [f"{len(got_t)} outputs, expected {len(want_t)}"]
    problems = []
    for i, (g, w) in enumerate(zip(got_t, want_t)):
        if not isinstance(g, torch.Tensor):
            problems.append(f"output {i}: {type(g).__name__}, expected a tensor")
            continue
        if device is not None and g.device.type != device:
            problems.append(f"output {i} on {g.device}, expected {device}")
        if g.dtype != w.dtype or tuple(g.shape) != tuple(w.shape):
            problems.append(f"output {i}: {g.dtype} {tuple(g.shape)}, expected {w.dtype} "
                            f"{tuple(w.shape)}")
            continue
        gc = g.detach().cpu()
        bad = gc != w
        if gc.is_floating_point():
            bad &= ~(gc.isnan() & w.isnan())
        if bad.any():
            first = bad.flatten().nonzero()[:3].flatten().tolist()
            problems.append(f"output {i}: {int(bad.sum())}/{w.numel()} entries differ, first "
                            f"at flat {first}: got {gc.flatten()[first].tolist()}, expected "
                            f"{w.flatten()[first].tolist()}")
    return problems


def run_case(case: Case, impls: dict, device: str) -> dict:
    """Runs ``case`` with ``impls[case.op]`` on ``device`` and the reference on the CPU;
    ``status`` is ``pass``, ``mismatch`` or ``error``."""
    import torch

    from sparsekern import reference as ref
    t0 = time.time()
    row = dict(part="kernels", id=case.id, backend=case.backend, op=case.op, dtype=case.dtype,
               tier=case.tier)
    try:
        args = build(case)
        want = getattr(ref, case.op)(*args)
        got = impls[case.op](*to_device(args, device))
        if device == "cuda":
            torch.cuda.synchronize()
        problems = compare(got, want, device)
        row.update(status="mismatch" if problems else "pass", detail="; ".join(problems)[:600])
    except Exception as e:  # noqa: BLE001 - reported per case
        row.update(status="error", detail=f"{type(e).__name__}: {e}"[:600],
                   trace=traceback.format_exc()[-1500:])
    row["seconds"] = round(time.time() - t0, 3)
    return row


# --------------------------------------------------------------------------- modules and DST
def _int_params(module, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randint(-2, 3, prm.shape, generator=g).to(prm.dtype))


def _module_run(kind: str, backend: str, device: str, dtype):
    """Output, input gradient and parameter gradients of one module on integer data."""
    import torch

    import sparsekern as sk
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    if kind == "linear_unstructured":
        layer, x0 = sk.SparseLinear(45, 67, sparsity=0.7), _ints(gen, 13, 45)
    elif kind == "linear_bsr_16":
        layer = sk.SparseLinear(45, 67, sparsity=0.5, block_size=(16, 16), layout="bsr")
        x0 = _ints(gen, 3, 2, 45)
    else:
        layer = sk.SparseConv2d(4, 6, 3, stride=2, padding=1, groups=2, sparsity=0.5)
        x0 = _ints(gen, 1, 4, 6, 7)
    layer = layer.to(device, dtype)
    _int_params(layer, 1)
    x = x0.to(device, dtype).requires_grad_(True)
    with sk.backend(backend):
        y = layer(x)
        w = torch.arange(y.numel(), device=device).view(y.shape).remainder(5).to(dtype)
        (y * w).sum().backward()
    grads = tuple(p.grad for _, p in sorted(layer.named_parameters()))
    return (y.detach(), x.grad) + grads


def _dst_run(backend: str, device: str, steps: int = 6):
    """Mask, weight and input gradient after each step of a short RigL run (mask updates every
    2 steps) that is exact by construction: integer inputs and targets, weights kept on a grid
    of 1/16 in [-2, 2] (rounded after every SGD step), one layer, so every sum in the forward,
    the backward, the growth scores and the update is exact in any order, and drop and growth
    ties are broken by the same index rule on every backend."""
    import torch

    import sparsekern as sk
    torch.manual_seed(0)
    layer = sk.SparseLinear(20, 24, sparsity=0.75).to(device)
    _int_params(layer, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=2.0 ** -7)
    method = sk.dst.RigL(layer, opt, total_steps=4 * steps, delta_t=2, alpha=0.5)
    g = torch.Generator().manual_seed(3)
    history = []
    with sk.backend(backend):
        for _ in range(steps):
            x = torch.randint(-2, 3, (5, 20), generator=g).float().to(device).requires_grad_()
            t = torch.randint(-2, 3, (5, 24), generator=g).float().to(device)
            loss = 0.5 * ((layer(x) - t) ** 2).sum()
            loss.backward()
            method.step()
            opt.zero_grad()
            with torch.no_grad():
                for prm in layer.parameters():
                    prm.copy_(torch.round(prm * 16).clamp_(-32, 32) / 16)
            history.append((layer.mask.detach().cpu().clone(),
                            layer.weight.detach().cpu().clone(), x.grad.detach().cpu()))
    return history, method.stats()["n_updates"]


def module_checks(device: str, backends, dtypes=DTYPES, deadline: float = float("inf"),
                  compile_check: bool = True):
    """Rows for part ``modules``: each module kind x dtype x backend on ``device`` against the
    reference backend on the CPU (exact), a RigL run (masks, weights and input gradients
    exact at every step), and ``torch.compile(fullgraph=True)``."""
    import torch

    import sparsekern as sk

    def row(name, backend, dtype, fn):
        if time.time() > deadline:
            return dict(part="modules", id=f"{backend}:{name}:{dtype}", backend=backend,
                        op=name, dtype=dtype, status="skipped", detail="time budget")
        t0 = time.time()
        r = dict(part="modules", id=f"{backend}:{name}:{dtype}", backend=backend, op=name,
                 dtype=dtype)
        try:
            problems = fn()
            r.update(status="mismatch" if problems else "pass", detail="; ".join(problems)[:600])
        except Exception as e:  # noqa: BLE001 - reported per check
            r.update(status="error", detail=f"{type(e).__name__}: {e}"[:600],
                     trace=traceback.format_exc()[-1500:])
        r["seconds"] = round(time.time() - t0, 3)
        return r

    rows = []
    for backend in backends:
        for dt in dtypes:
            tdt = _torch_dtype(dt)
            for kind in ("linear_unstructured", "linear_bsr_16", "conv_g2_s2"):
                def check(kind=kind, tdt=tdt, backend=backend):
                    want = _module_run(kind, "reference", "cpu", tdt)
                    got = _module_run(kind, backend, device, tdt)
                    return compare(got, want, device)
                rows.append(row(f"module {kind}", backend, dt, check))

        def rigl(backend=backend):
            want, want_n = _dst_run("reference", "cpu")
            got, got_n = _dst_run(backend, device)
            problems = [] if got_n == want_n == 3 else [
                f"{got_n} mask updates, reference {want_n} (expected 3)"]
            if torch.equal(want[0][0], want[-1][0]):
                problems.append("no mask moved in the reference run")
            for step, (gs, ws) in enumerate(zip(got, want)):
                for what, gt, wt in zip(("mask", "weight", "input gradient"), gs, ws):
                    if not torch.equal(gt, wt):
                        problems.append(f"{what} differs after step {step + 1}")
            return problems
        rows.append(row("RigL 6 steps vs CPU reference", backend, "fp32", rigl))

        def compiled(backend=backend):
            layer = sk.SparseLinear(45, 67, sparsity=0.5).to(device)
            _int_params(layer, 4)
            x = _ints(torch.Generator().manual_seed(6), 13, 45).to(device)
            with sk.backend(backend):
                got = torch.compile(layer, fullgraph=True)(x)
            with sk.backend("reference"):
                want = layer.cpu()(x.cpu())
            return compare(got, want, device)
        if compile_check:
            rows.append(row("torch.compile(fullgraph=True) SparseLinear", backend, "fp32",
                            compiled))
    return rows


# --------------------------------------------------------------------------- workers
def _interpreted_kernels() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from sparsekern.kernels import bsr_mm
    k = bsr_mm._spmm_kernel
    return isinstance(getattr(k, "fn", k), InterpretedFunction)


def _write(f, row):
    f.write(json.dumps(row) + "\n")
    f.flush()


def _planted(fn):
    """``fn`` with 1 added to the first entry of its first output (a known wrong answer)."""
    def wrong(*args):
        out = fn(*args)
        first = out[0] if isinstance(out, tuple) else out
        first.view(-1)[:1] += 1
        return out
    return wrong


def _worker(part: str, index: int, count: int, deadline: float, jsonl: str,
            selftest: bool = False, plant: str | None = None) -> int:
    """One worker process: runs its share of ``part`` and appends a JSON line per case to
    ``jsonl``. ``selftest``: on the CPU, with the reference standing in for both GPU backends
    (checks this script, measures nothing); ``plant``: that op returns a wrong answer."""
    import torch

    from sparsekern import reference as ref
    if os.environ.get("TRITON_INTERPRET") == "1" and not selftest:
        print("gpu_validate worker: TRITON_INTERPRET=1 is set; refusing (kernels must compile)")
        return 2
    device = "cpu" if selftest else "cuda"
    if not selftest:
        assert torch.cuda.is_available(), "worker started without a CUDA GPU"
    backends = {"triton": "ok", "cuda": "ok"} if selftest else available_backends()
    if not selftest and backends.get("triton") == "ok" and _interpreted_kernels():
        print("gpu_validate worker: the Triton kernels are interpreted; refusing")
        return 2
    impls = {}
    for b in ("triton", "cuda"):
        if selftest:
            impls[b] = {op: getattr(ref, op) for op in TRITON_OPS}
        elif backends.get(b) == "ok":
            mod = __import__({"triton": "sparsekern.kernels",
                              "cuda": "sparsekern.cuda_backend"}[b], fromlist=["IMPLS"])
            impls[b] = dict(mod.IMPLS)
        if plant and b in impls and plant in impls[b]:
            impls[b][plant] = _planted(impls[b][plant])
    with open(jsonl, "a") as f:
        if part == "kernels":  # references on the CPU, one share of the cores per shard
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, count)))
            todo = planned_cases(impls, selftest)
            shards = shard(todo, count)
            for i in (shards[index] if index < len(shards) else []):
                c = todo[i]
                if time.time() > deadline:
                    _write(f, dict(part="kernels", id=c.id, backend=c.backend, op=c.op,
                                   dtype=c.dtype, tier=c.tier, status="skipped",
                                   detail="time budget"))
                    continue
                r = run_case(c, impls[c.backend], device)
                _write(f, r)
                print(f"{r['status']:8} {r['seconds']:7.2f}s {c.id} {r.get('detail') or ''}",
                      flush=True)
        elif part == "modules":
            if selftest:
                rows = module_checks("cpu", ["reference"], ("fp32",), deadline, False)
            else:
                rows = module_checks("cuda", [b for b in impls], deadline=deadline)
            for r in rows:
                _write(f, r)
                print(f"{r['status']:8} {r['id']} {r.get('detail') or ''}", flush=True)
        elif part == "bench":
            import bench_triton as bt
            gen = torch.Generator().manual_seed(0)
            for shape, bs, sp, dt in bench_cases():
                tag = dict(part="bench", id=f"{shape.model} {shape.layer}:{bs}:{sp}:{dt}",
                           dtype=dt)
                if time.time() > deadline:
                    _write(f, dict(tag, status="skipped", detail="time budget"))
                    continue
                run = bt.run_linear if isinstance(shape, bt.LinearShape) else bt.run_conv
                t0 = time.time()
                try:
                    rows = run(shape, bs, sp, _torch_dtype(dt), gen)
                    bt.finish(rows)
                    for r in rows:
                        r["dtype"] = dt
                    _write(f, dict(tag, status="pass", rows=rows,
                                   seconds=round(time.time() - t0, 2)))
                    print(f"bench {tag['id']} {time.time() - t0:.1f}s", flush=True)
                except Exception as e:  # noqa: BLE001 - reported per case
                    _write(f, dict(tag, status="error", detail=f"{type(e).__name__}: {e}"[:600],
                                   trace=traceback.format_exc()[-1500:]))
    return 0


def planned_cases(impls, selftest: bool = False) -> list[Case]:
    """The kernel cases a run executes: those of the backends in ``impls``; in a self test only
    the first case of each ``(backend, op, dtype)``."""
    todo = [c for c in cases() if c.backend in impls]
    if selftest:
        seen, first = set(), []
        for c in todo:
            if (c.backend, c.op, c.dtype) not in seen:
                seen.add((c.backend, c.op, c.dtype))
                first.append(c)
        todo = first
    return todo


def available_backends() -> dict[str, str]:
    """``triton`` and ``cuda`` -> ``"ok"`` or why they cannot run here."""
    import sparsekern as sk
    got = sk.available_backends()
    return {b: got.get(b, "unknown") for b in ("triton", "cuda")}


# --------------------------------------------------------------------------- parent
def _launch(part, index, count, deadline, out_dir, extra=()):
    jsonl = os.path.join(out_dir, "workers", f"{part}{index}.jsonl")
    log = open(os.path.join(out_dir, "workers", f"{part}{index}.log"), "w")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", part, "--shard",
           f"{index}/{count}", "--deadline", repr(deadline), "--jsonl", jsonl, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return dict(part=part, index=index, proc=proc, jsonl=jsonl, log=log.name, fh=log)


def _wait(workers, hard_deadline):
    for w in workers:
        try:
            w["proc"].wait(timeout=max(1.0, hard_deadline - time.time()))
            w["rc"] = w["proc"].returncode
        except subprocess.TimeoutExpired:
            w["proc"].kill()
            w["proc"].wait()
            w["rc"] = "killed at the time limit"
        w["fh"].close()


def _collect(workers) -> list[dict]:
    rows = []
    for w in workers:
        if os.path.exists(w["jsonl"]):
            with open(w["jsonl"]) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        if w["rc"] != 0:
            with open(w["log"]) as f:
                tail = f.read()[-1500:]
            rows.append(dict(part=w["part"], id=f"worker {w['part']}{w['index']}",
                             status="error", detail=f"worker exit {w['rc']}: {tail}"))
    return rows


def markdown(machine: dict, rows: list[dict], skipped: list[str]) -> str:
    """The report: machine, kernel/module results per backend x op x dtype, skips, and the
    benchmark table."""
    out = [f"# sparsekern GPU validation — {machine.get('gpu', '?')}", "",
           " | ".join(f"{k} {v}" for k, v in machine.items()), ""]
    table: dict[tuple, dict] = {}
    for r in rows:
        if r.get("part") in ("kernels", "modules") and "op" in r:
            key = (r["part"], r["backend"], r["op"], r["dtype"])
            table.setdefault(key, {}).setdefault(r["status"], 0)
            table[key][r["status"]] += 1
    out += ["| part | backend | op | dtype | pass | mismatch | error | skipped |",
            "|---|---|---|---|---|---|---|---|"]
    for (part, b, op, dt), n in sorted(table.items()):
        out.append(f"| {part} | {b} | {op} | {dt} | {n.get('pass', 0)} | "
                   f"{n.get('mismatch', 0)} | {n.get('error', 0)} | {n.get('skipped', 0)} |")
    bad = [r for r in rows if r.get("status") in ("mismatch", "error")]
    if bad:
        out += ["", "## Failures", ""] + [f"- `{r['id']}` {r['status']}: {r.get('detail', '')}"
                                          for r in bad]
    if skipped:
        out += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    bench = [b for r in rows if r.get("part") == "bench" for b in r.get("rows", [])]
    if bench:
        out += ["", "## Benchmark (median ms, `triton.testing.do_bench`; x dense > 1 is faster)",
                "", "| layer | op | dtype | block | sparsity | provider | ms | x dense | "
                "peak extra MB |", "|---|---|---|---|---|---|---|---|---|"]
        for b in bench:
            ms = f"{b['ms']:.4f}" if b.get("ms") else (b.get("note") or "")
            out.append(f"| {b['model']} {b['layer']} | {b['op']} | {b['dtype']} | {b['block']} | "
                       f"{b['sparsity']} | {b['provider']} | {ms} | "
                       f"{b.get('x_dense') if b.get('x_dense') is not None else ''} | "
                       f"{b.get('peak_extra_mb') if b.get('peak_extra_mb') is not None else ''} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_validate"))
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of "
                    f"{','.join(PARTS)}")
    ap.add_argument("--minutes", type=float, default=8.0, help="scales every part's budget")
    ap.add_argument("--jobs", type=int, default=0, help="kernel worker processes (0: auto)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--selftest", action="store_true",
                    help="run the pipeline on the CPU with the reference standing in for the "
                    "GPU backends (a check of this script; measures nothing)")
    ap.add_argument("--plant", help=argparse.SUPPRESS)  # an op that answers wrong (tests)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        i, n = map(int, args.shard.split("/"))
        return _worker(args.worker, i, n, args.deadline, args.jsonl, args.selftest,
                       args.plant)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; expected a subset of {PARTS}")
    if args.list:
        for c in cases():
            print(c.id, f"tier={c.tier}")
        for shape, bs, sp, dt in bench_cases():
            print(f"bench:{shape.model}:{shape.layer}:{bs}:{sp}:{dt}")
        return 0
    if os.environ.pop("TRITON_INTERPRET", None) == "1" and not args.selftest:
        print("gpu_validate: TRITON_INTERPRET=1 was set; unset for this run (the kernels are "
              "compiled for the device)")
    import torch
    if not args.selftest and not torch.cuda.is_available():
        print(f"gpu_validate: no CUDA GPU here (torch {torch.__version__}, "
              f"torch.version.cuda={torch.version.cuda}, torch.cuda.is_available() is False); "
              "nothing validated or measured. Run it on a machine with an NVIDIA GPU.")
        return 0
    t_start = time.time()
    scale = args.minutes / 8.0
    os.makedirs(os.path.join(args.out, "workers"), exist_ok=True)
    for name in os.listdir(os.path.join(args.out, "workers")):
        os.remove(os.path.join(args.out, "workers", name))
    import sparsekern
    machine = dict(torch=torch.__version__, python=platform.python_version(),
                   sparsekern=sparsekern.__version__)
    extra = []
    if args.selftest:
        backends = {"triton": "ok", "cuda": "ok"}
        machine.update(gpu="none (self test: the reference on the CPU stands in for both "
                       "backends; nothing measured)")
        extra = ["--selftest"] + (["--plant", args.plant] if args.plant else [])
    else:
        backends = available_backends()
        machine.update(gpu=torch.cuda.get_device_name(), capability=".".join(
            map(str, torch.cuda.get_device_capability())), cuda=torch.version.cuda)
    machine.update(triton_backend=backends["triton"], cuda_backend=backends["cuda"])
    try:
        import triton
        machine["triton"] = triton.__version__
    except ImportError:
        machine["triton"] = "not installed"
    print("gpu_validate:", json.dumps(machine), flush=True)
    skipped = [f"backend {b}: {why}" for b, why in backends.items() if why != "ok"]
    for s in skipped:
        print("SKIP", s)
    if "bench" in parts and (args.selftest or backends["triton"] != "ok"):
        skipped.append("bench: " + ("not part of the self test" if args.selftest
                                    else "needs the Triton backend"))
        parts.remove("bench")

    rows: list[dict] = []
    phase1 = []
    deadline1 = time.time() + BUDGET_S["kernels"] * scale
    if "kernels" in parts:
        jobs = args.jobs or (1 if args.selftest else max(1, min(8, (os.cpu_count() or 2) - 1)))
        phase1 += [_launch("kernels", i, jobs, deadline1, args.out, extra) for i in range(jobs)]
    if "modules" in parts:
        phase1.append(_launch("modules", 0, 1, time.time() + BUDGET_S["modules"] * scale,
                              args.out, extra))
    _wait(phase1, deadline1 + GRACE_S * scale)
    rows += _collect(phase1)
    if "bench" in parts:
        bench = [_launch("bench", 0, 1, time.time() + BUDGET_S["bench"] * scale, args.out,
                         extra)]
        _wait(bench, time.time() + (BUDGET_S["bench"] + GRACE_S) * scale)
        rows += _collect(bench)

    # cases a worker never reported (it crashed or was killed): failures
    seen = {r["id"] for r in rows}
    if "kernels" in parts:
        ok = {b: None for b, why in backends.items() if why == "ok"}
        for c in planned_cases(ok, args.selftest):
            if c.id not in seen:
                rows.append(dict(part="kernels", id=c.id, backend=c.backend, op=c.op,
                                 dtype=c.dtype, status="error",
                                 detail="not reported: its worker crashed or was killed"))
    budget_skips = [r["id"] for r in rows if r.get("status") == "skipped"]
    if budget_skips:
        skipped.append(f"{len(budget_skips)} cases over their part's time budget: "
                       + ", ".join(budget_skips[:40]) + (" ..." if len(budget_skips) > 40
                                                         else ""))
    bad = [r for r in rows if r.get("status") in ("mismatch", "error")]
    counts = {s: sum(r.get("status") == s for r in rows)
              for s in ("pass", "mismatch", "error", "skipped")}
    machine["seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out, "validate.json"), "w") as f:
        json.dump(dict(machine=machine, counts=counts, skipped=skipped, rows=rows), f, indent=1)
    md = markdown(machine, rows, skipped)
    with open(os.path.join(args.out, "validate.md"), "w") as f:
        f.write(md)
    for r in bad[:50]:
        print(f"FAIL {r['id']} {r['status']}: {r.get('detail', '')}")
    for s in skipped:
        print("SKIPPED", s[:2000])
    print(f"gpu_validate: {counts} in {machine['seconds']} s; report in {args.out}/validate.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
