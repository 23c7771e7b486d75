"""CPU benchmark of the C++ backend: dense PyTorch vs torch.sparse (BSR/CSR) vs sparsekern's
C++ kernels, side by side in one process, on linear shapes from real models plus the
4096x4096 case; and the exact growth top-k against dense ``dy.T @ x`` + ``torch.topk``.

    python benchmarks/bench_cpu.py [--quick] [--threads 2] [--out benchmarks/results/bench_cpu.json]

Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange`` runs, taken in
interleaved rounds (median of the round medians), fp32 unless a case says otherwise. Each case
also reports the 1-thread CPU time per call (minimum of interleaved calls), which on a shared
machine tracks the kernels' work where 2-thread wall-clock medians also measure the other
tenants. sparsekern runs on both weight layouts: ``dense`` (the [M, K] weight and its mask, as
``layout="dense"`` modules pass them) and ``bsr`` (the active blocks' values ``[nnzb, br, bc]``,
as ``layout="bsr"`` modules store them, like torch's BSR/CSR tensors, with the all-true mask
view such a linear layer passes on the CPU — its mask is constant on blocks). The kernels repack
W ⊙ mask on every call (no weight cache), so a forward here costs what it costs in training.
"backward" = grad_input + weight gradient on the active blocks (dense: ``dy @ W``, ``dy.T @ x``;
conv: ``aten.convolution_backward``), "step" = forward + backward (conv dense: ``F.conv2d``
forward + autograd backward). Peak memory of the growth step is the
resident-set growth of one call in a fresh process, beyond inputs and outputs.

Bounded run time (under 10 minutes on a 2-core machine): a case starts no new round once
``--case-budget-s`` has passed (two rounds at least). On a CPU without native bf16 arithmetic
(no ``avx512_bf16``/``amx_bf16``), PyTorch's dense bf16 GEMM runs a slow fallback (seconds per
4096² product); the bf16 case is then compared with dense fp32 and says so (``dense_dtype``,
``skipped``); ``--dense-bf16`` times the dense bf16 baseline anyway.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import (cpu_time_1thread, interleaved_medians, machine_info,  # noqa: E402
                    peak_extra_bytes, write_json)

import sparsekern  # noqa: E402,F401
from sparsekern.reference import gather_blocks  # noqa: E402
from sparsekern.topology import build_topology, expand_blocks  # noqa: E402

ops = torch.ops.sparsekern


@dataclass(frozen=True)
class LinearCase:
    """A linear layer ``[m, k]`` (out, in) at a batch of ``batch`` rows."""

    name: str
    m: int
    k: int
    batch: int
    block: tuple[int, int]
    sparsity: float
    dtype: str = "float32"


CASES = (
    LinearCase("4096x4096 b256 32x32 90%", 4096, 4096, 256, (32, 32), 0.90),
    LinearCase("4096x4096 b256 32x32 98%", 4096, 4096, 256, (32, 32), 0.98),
    LinearCase("4096x4096 b256 32x32 50%", 4096, 4096, 256, (32, 32), 0.50),
    LinearCase("4096x4096 b256 1x1 90%", 4096, 4096, 256, (1, 1), 0.90),
    LinearCase("4096x4096 b256 32x32 90% bf16", 4096, 4096, 256, (32, 32), 0.90, "bfloat16"),
    LinearCase("GPT-2 MLP up 768->3072 b512 16x16 90%", 3072, 768, 512, (16, 16), 0.90),
    LinearCase("BERT FFN down 3072->768 b512 1x1 90%", 768, 3072, 512, (1, 1), 0.90),
    LinearCase("VGG-19 fc7 4096->4096 b64 32x32 95%", 4096, 4096, 64, (32, 32), 0.95),
    LinearCase("ResNet-50 fc 2048->1000 b128 8x8 80%", 1000, 2048, 128, (8, 8), 0.80),
)
QUICK = (CASES[0], CASES[3])


@dataclass(frozen=True)
class ConvCase:
    """A 3x3 (or kxk) convolution, stride 1, 'same' padding, on an NCHW batch."""

    name: str
    n: int
    c_in: int
    c_out: int
    hw: int
    kernel: int
    block: tuple[int, int]
    sparsity: float


CONV_CASES = (
    ConvCase("conv 3x3 256->256 16x16 N=32, 16x16 blocks 90%", 32, 256, 256, 16, 3, (16, 16), 0.90),
    ConvCase("ResNet-32 conv 3x3 64->64 8x8 N=128, 8x8 blocks 90%", 128, 64, 64, 8, 3, (8, 8), 0.90),
)
GROW_CASE = LinearCase("grow_topk 4096x4096 b256 1x1 90%, k=30% of active", 4096, 4096, 256,
                       (1, 1), 0.90)


def make_inputs(case: LinearCase, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    br, bc = case.block
    nbr, nbc = -(-case.m // br), -(-case.k // bc)
    bmask = torch.rand(nbr, nbc, generator=gen) >= case.sparsity
    mask = expand_blocks(bmask, (br, bc), (case.m, case.k)).contiguous()
    topo = build_topology(mask, (br, bc)).tensors
    w = torch.randn(case.m, case.k, generator=gen).mul_(case.k ** -0.5).to(dtype)
    x = torch.randn(case.batch, case.k, generator=gen).to(dtype)
    dy = torch.randn(case.batch, case.m, generator=gen).to(dtype)
    return w, mask, topo, x, dy


def bench_linear(case: LinearCase, threads: int, rounds: int, min_run_time: float,
                 budget_s: float | None = None, dense_bf16: bool = False) -> dict:
    w, mask, topo, x, dy = make_inputs(case)
    br, bc = case.block
    wm = w * mask
    skipped = []
    dense_dtype = case.dtype
    if case.dtype == "bfloat16" and not (dense_bf16 or common.native_bf16()):
        skipped.append("dense bf16: this CPU has no native bf16 (PyTorch's bf16 GEMM falls back "
                       "to a slow path, seconds per call); compared with dense fp32 instead "
                       "(--dense-bf16 times it)")
        dense_dtype = "float32"
    xd, dyd, wm = (t.float() if dense_dtype == "float32" else t for t in (x, dy, wm))
    fwd = {"dense": lambda: xd @ wm.T}
    sparse_kind = None
    if case.dtype == "float32":
        if case.block == (1, 1):
            w_csr = wm.to_sparse_csr()
            fwd["torch.sparse"] = lambda: w_csr @ x.T
            sparse_kind = "CSR"
        elif case.m % br == 0 and case.k % bc == 0:
            w_bsr = wm.to_sparse_bsr(case.block)
            fwd["torch.sparse"] = lambda: w_bsr @ x.T
            sparse_kind = "BSR"
    # layout="bsr": the active blocks, and the all-true mask view such a layer passes on the CPU
    vals = gather_blocks(w, topo[0], topo[1], br, bc)
    ones = torch.ones((), dtype=torch.bool).expand(case.m, case.k)
    fwd["sparsekern"] = lambda: ops._bsr_mm(x, w, mask, topo, br, bc)
    fwd["sparsekern_bsr"] = lambda: ops._bsr_mm(x, vals, ones, topo, br, bc)

    def dense_step():
        return xd @ wm.T, dyd @ wm, dyd.T @ xd

    def sk_bwd(weight, m):
        return lambda: (ops._bsr_mm_t(dy, weight, m, topo, br, bc),
                        ops._sddmm(dy, x, m, topo, br, bc))

    def sk_step(weight, m):
        return lambda: (ops._bsr_mm(x, weight, m, topo, br, bc),
                        ops._bsr_mm_t(dy, weight, m, topo, br, bc),
                        ops._sddmm(dy, x, m, topo, br, bc))

    bwd = {"dense": lambda: (dyd @ wm, dyd.T @ xd), "sparsekern": sk_bwd(w, mask),
           "sparsekern_bsr": sk_bwd(vals, ones)}
    steps = {"dense": dense_step, "sparsekern": sk_step(w, mask),
             "sparsekern_bsr": sk_step(vals, ones)}
    density = float(mask.float().mean())
    out = summarize(case, density, fwd, bwd, steps, threads, rounds, min_run_time, budget_s)
    out["torch_sparse_format"] = sparse_kind
    out["dense_dtype"] = dense_dtype
    out["skipped"] = skipped
    dense_flops = 2.0 * case.batch * case.m * case.k
    best = min(out["forward_ms"]["sparsekern"], out["forward_ms"]["sparsekern_bsr"]) / 1e3
    out["forward_effective_gflops"] = dense_flops / best / 1e9
    out["forward_actual_gflops"] = dense_flops * density / best / 1e9
    return out


def bench_conv(case: ConvCase, threads: int, rounds: int, min_run_time: float,
               budget_s: float | None = None, dense_bf16: bool = False) -> dict:
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    br, bc = case.block
    kd = case.c_in * case.kernel ** 2
    bmask = torch.rand(-(-case.c_out // br), -(-kd // bc), generator=gen) >= case.sparsity
    m2 = expand_blocks(bmask, (br, bc), (case.c_out, kd)).contiguous()
    mask = m2.view(case.c_out, case.c_in, case.kernel, case.kernel)
    topo = build_topology(m2, (br, bc)).tensors
    w = torch.randn(mask.shape, generator=gen).mul_(kd ** -0.5)
    wm = w * mask
    x = torch.randn(case.n, case.c_in, case.hw, case.hw, generator=gen)
    pad = case.kernel // 2
    dy = torch.randn(case.n, case.c_out, case.hw, case.hw, generator=gen)
    xr, wr = x.clone().requires_grad_(True), wm.clone().requires_grad_(True)
    one, p2, hw = [1, 1], [pad, pad], [case.hw, case.hw]

    def dense_step():
        xr.grad = wr.grad = None
        F.conv2d(xr, wr, padding=pad).backward(dy)

    vals = gather_blocks(w.view(case.c_out, kd), topo[0], topo[1], br, bc)

    def sk_fwd(weight):
        return lambda: ops._conv2d(x, weight, mask, topo, br, bc, one, p2, one, 1)

    def sk_bwd(weight):
        return lambda: (ops._conv2d_grad_input(dy, weight, mask, topo, br, bc, hw, one, p2, one, 1),
                        ops._conv2d_sddmm(dy, x, mask, topo, br, bc, one, p2, one, 1))

    def sk_step(weight):
        return lambda: (sk_fwd(weight)(), sk_bwd(weight)())

    def dense_bwd():  # grad_input and grad_weight, as autograd runs them
        return torch.ops.aten.convolution_backward(dy, x, wm, None, one, p2, one, False, [0, 0], 1,
                                                   [True, True, False])

    fwd = {"dense": lambda: F.conv2d(x, wm, padding=pad), "sparsekern": sk_fwd(w),
           "sparsekern_bsr": sk_fwd(vals)}
    bwd = {"dense": dense_bwd, "sparsekern": sk_bwd(w), "sparsekern_bsr": sk_bwd(vals)}
    steps = {"dense": dense_step, "sparsekern": sk_step(w), "sparsekern_bsr": sk_step(vals)}
    out = summarize(case, float(m2.float().mean()), fwd, bwd, steps, threads, rounds,
                    min_run_time, budget_s)
    out["dense_dtype"], out["skipped"] = "float32", []
    return out


def summarize(case, density: float, fwd: dict, bwd: dict, steps: dict, threads: int, rounds: int,
              min_run_time: float, budget_s: float | None = None) -> dict:
    """Interleaved wall-clock medians of the forward, backward (grad_input + weight gradient)
    and step providers (each phase within a third of ``budget_s``), 1-thread CPU times of the
    forward and step, and the ratios (dense / sparsekern) for both weight layouts."""
    b = None if budget_s is None else budget_s / 3
    t_fwd = interleaved_medians(fwd, threads, rounds, min_run_time, b)
    t_bwd = interleaved_medians(bwd, threads, rounds, min_run_time, b)
    t_step = interleaved_medians(steps, threads, rounds, min_run_time, b)
    cpu = cpu_time_1thread({**{f"{k}_fwd": v for k, v in fwd.items() if k != "torch.sparse"},
                            **{f"{k}_step": v for k, v in steps.items()}}, reps=cpu_reps(rounds))
    out = {"case": asdict(case), "density": density,
           "forward_ms": {k: v * 1e3 for k, v in t_fwd.items()},
           "backward_ms": {k: v * 1e3 for k, v in t_bwd.items()},
           "step_ms": {k: v * 1e3 for k, v in t_step.items()},
           "cpu_1thread_ms": {k: v * 1e3 for k, v in cpu.items()}}
    for sfx, name in (("", "sparsekern"), ("_bsr", "sparsekern_bsr")):
        out["forward_speedup_vs_dense" + sfx] = t_fwd["dense"] / t_fwd[name]
        out["backward_speedup_vs_dense" + sfx] = t_bwd["dense"] / t_bwd[name]
        out["step_speedup_vs_dense" + sfx] = t_step["dense"] / t_step[name]
        out["cpu_1thread_forward_speedup" + sfx] = cpu["dense_fwd"] / cpu[name + "_fwd"]
        out["cpu_1thread_step_speedup" + sfx] = cpu["dense_step"] / cpu[name + "_step"]
        if "torch.sparse" in t_fwd:
            out["forward_speedup_vs_torch_sparse" + sfx] = t_fwd["torch.sparse"] / t_fwd[name]
    return out


# --------------------------------------------------------------------------- growth top-k
def peak_memory_case(name: str):
    """(setup, run, warm) for one provider of the growth step, used by peak_extra_bytes."""
    case = GROW_CASE

    def setup():
        w, mask, topo, x, dy = make_inputs(case)
        k = int(0.3 * int(mask.sum()))
        return dy, x, mask, k

    if name == "dense":
        def run(dy, x, excl, k):
            s = (dy.T @ x).abs_().masked_fill_(excl, -1.0)
            return torch.topk(s.flatten(), k)

        def warm():
            a = torch.randn(8, 64)
            torch.topk((a.T @ a).flatten(), 5)
    else:
        def run(dy, x, excl, k):
            return ops._grow_topk(dy, x, excl, k, None, 0.0, 1.0, 1, 1)

        def warm():
            a = torch.randn(8, 64)
            ops._grow_topk(a, a, torch.zeros(64, 64, dtype=torch.bool), 5, None, 0.0, 1.0, 1, 1)
    return setup, run, warm


def bench_grow(threads: int, rounds: int, min_run_time: float, memory: bool) -> dict:
    case = GROW_CASE
    w, mask, topo, x, dy = make_inputs(case)
    k = int(0.3 * int(mask.sum()))
    fns = {
        "dense": lambda: torch.topk((dy.T @ x).abs_().masked_fill_(mask, -1.0).flatten(), k),
        "sparsekern": lambda: ops._grow_topk(dy, x, mask, k, None, 0.0, 1.0, 1, 1),
    }
    t = interleaved_medians(fns, threads, rounds, min_run_time)
    cpu = cpu_time_1thread(fns, reps=2)
    out = {"case": asdict(case), "k": k, "time_ms": {n: v * 1e3 for n, v in t.items()},
           "cpu_1thread_ms": {n: v * 1e3 for n, v in cpu.items()},
           "cpu_1thread_speedup": cpu["dense"] / cpu["sparsekern"],
           "speedup_vs_dense": t["dense"] / t["sparsekern"],
           "dense_gradient_bytes": case.m * case.k * 4}
    if memory:
        mem = {n: peak_extra_bytes("bench_cpu", n, threads) for n in ("dense", "sparsekern")}
        out["peak_extra_bytes"] = mem
        if "extra_bytes" in mem["sparsekern"]:
            out["sparsekern_extra_fraction_of_dense_gradient"] = (
                mem["sparsekern"]["extra_bytes"] / out["dense_gradient_bytes"])
    return out


def cpu_reps(rounds: int) -> int:
    """Interleaved calls per provider for the 1-thread CPU time (a minimum: few suffice)."""
    return 2 if rounds <= 1 else 3


def fmt(v):
    return "-" if v is None else f"{v:7.2f}"


def pair(r: dict, key: str) -> str:
    """``dense-layout / bsr-layout`` ratio."""
    a, b = r.get(key), r.get(key + "_bsr")
    return "-" if a is None else f"{a:5.2f}/{b:5.2f}"


def row(name: str, r: dict) -> str:
    f, st = r["forward_ms"], r["step_ms"]
    return (f"{name:52s} {fmt(f['dense']):>7s} {fmt(f.get('torch.sparse')):>7s} "
            f"{fmt(f['sparsekern'])} {fmt(f['sparsekern_bsr'])} "
            f"{pair(r, 'forward_speedup_vs_dense'):>11s} "
            f"{pair(r, 'forward_speedup_vs_torch_sparse'):>11s} | "
            f"{pair(r, 'backward_speedup_vs_dense'):>11s} | {fmt(st['dense'])} "
            f"{fmt(st['sparsekern'])} {fmt(st['sparsekern_bsr'])} "
            f"{pair(r, 'step_speedup_vs_dense'):>11s} | "
            f"{pair(r, 'cpu_1thread_forward_speedup'):>11s} "
            f"{pair(r, 'cpu_1thread_step_speedup'):>11s}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two cases, one round: a smoke run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_cpu.json"))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--case-budget-s", type=float, default=30.0,
                   help="no new timing round of a case after this many seconds (2 at least)")
    p.add_argument("--dense-bf16", action="store_true",
                   help="time dense bf16 even on a CPU without native bf16 (slow)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 5)
    mrt = 0.2 if args.quick else 0.4
    cases = QUICK if args.quick else CASES
    t0 = time.time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    print("wall-clock medians, ms, %d threads; sk = dense layout, bsr = bsr layout; "
          "ratios = dense / sparsekern; cpu = the same ratio in 1-thread CPU time" % args.threads)
    print(f"{'case':52s} {'dense':>7s} {'t.sp':>7s} {'sk':>7s} {'bsr':>7s} {'x dense':>11s} "
          f"{'x t.sp':>11s} | {'bwd x dense':>11s} | {'dense':>7s} {'sk':>7s} {'bsr':>7s} "
          f"{'x dense':>11s} | "
          f"{'cpu fwd':>11s} {'cpu step':>11s}")
    results, conv_results = [], []
    todo = [(c, bench_linear, results) for c in cases]
    todo += [(c, bench_conv, conv_results) for c in (CONV_CASES[:1] if args.quick else CONV_CASES)]
    for case, bench, dest in todo:
        tc = time.time()
        r = bench(case, args.threads, rounds, mrt, args.case_budget_s, args.dense_bf16)
        r["wall_s"] = time.time() - tc
        dest.append(r)
        print(row(case.name, r), f"({r['wall_s']:.0f} s)", flush=True)
        for note in r["skipped"]:
            print(f"    skipped {note}", flush=True)
    grow = bench_grow(args.threads, rounds, mrt, memory=not args.no_memory)
    g = grow["time_ms"]
    print(f"\n{GROW_CASE.name}: dense dy.T@x + topk {g['dense']:.1f} ms, sparsekern "
          f"{g['sparsekern']:.1f} ms ({grow['speedup_vs_dense']:.2f}x; 1-thread CPU time "
          f"{grow['cpu_1thread_speedup']:.2f}x)")
    if "peak_extra_bytes" in grow:
        for n, m in grow["peak_extra_bytes"].items():
            if "extra_bytes" in m:
                print(f"  peak extra memory {n}: {m['extra_bytes'] / 2**20:.1f} MiB "
                      f"({m['extra_bytes'] / grow['dense_gradient_bytes']:.1%} of the dense "
                      f"gradient's {grow['dense_gradient_bytes'] / 2**20:.0f} MiB)")
            else:
                print(f"  peak memory {n}: {m}")
    payload = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
               "machine": machine_info(args.threads), "rounds": rounds,
               "min_run_time_s": mrt, "case_budget_s": args.case_budget_s, "linear": results,
               "conv": conv_results, "grow_topk": grow,
               "wall_s": time.time() - t0}
    payload["machine"]["load_average_at_start"] = load_start
    payload["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = write_json(args.out, payload)
    print(f"\nwrote {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
