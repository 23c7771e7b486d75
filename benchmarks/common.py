"""Shared benchmark helpers: machine description, interleaved CPU timing, peak memory of one
call in a fresh process, and JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch


def cpu_model() -> str:
    """``Model name`` from lscpu (or /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (avx512_bf16 or AMX). Elsewhere PyTorch's dense
    bf16 GEMM runs a slow fallback (seconds per 4096² product)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpp_kernel_isa() -> dict:
    """The ISA of the C++ kernels' table in this process, derived by the rule of
    ``csrc/cpu/kern_generic.cpp`` (the backend does not report it): ``SPARSEKERN_CPU_ISA=generic``
    or ``avx2`` forces that table when the CPU has it; otherwise AVX-512 (f, bw, vl, dq + FMA),
    then AVX2 + FMA, then generic. Only meaningful on x86-64, where all three are compiled."""
    flags = cpu_flags()
    has512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags
    has2 = {"avx2", "fma"} <= flags
    env = os.environ.get("SPARSEKERN_CPU_ISA")
    if platform.machine() not in ("x86_64", "AMD64"):
        isa = "generic"
    elif env == "generic":
        isa = "generic"
    elif env == "avx2" and has2:
        isa = "avx2"
    else:
        isa = "avx512" if has512 else "avx2" if has2 else "generic"
    return {"isa": isa, "SPARSEKERN_CPU_ISA": env, "cpu_has_avx512": has512,
            "cpu_has_avx2": has2, "cpu_has_avx512_bf16": "avx512_bf16" in flags,
            "how": "derived from /proc/cpuinfo flags and SPARSEKERN_CPU_ISA by the C++ "
                   "backend's selection rule"}


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info(threads: int) -> dict:
    """Machine, library versions and the settings a CPU benchmark ran with."""
    import sparsekern

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sparsekern": getattr(sparsekern, "__version__", "unknown"),
        "backends": sparsekern.available_backends(),
        "omp_proc_bind": os.environ.get("OMP_PROC_BIND"),
        "cpp_kernels": cpp_kernel_isa(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        info["triton"] = None
    return info


def interleaved_medians(fns: dict[str, Callable[[], object]], threads: int, rounds: int,
                        min_run_time: float, budget_s: float | None = None) -> dict[str, float]:
    """Median time in seconds of each callable, measured with ``torch.utils.benchmark.Timer``
    (blocked autorange) in ``rounds`` interleaved rounds; the result is the median of the
    per-round medians, so drifting load on a shared machine hits every provider alike. With
    ``budget_s``, no new round starts once that many seconds have passed (two rounds at least)."""
    import time

    from torch.utils.benchmark import Timer

    per = {name: [] for name in fns}
    t0 = time.perf_counter()
    for name, fn in fns.items():  # warm-up (first-call allocations, lazy init)
        fn()
    for r in range(rounds):
        if budget_s is not None and r >= 2 and time.perf_counter() - t0 > budget_s:
            break
        for name, fn in fns.items():
            m = Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
                min_run_time=min_run_time)
            per[name].append(m.median)
    return {name: statistics.median(v) for name, v in per.items()}


def cpu_time_1thread(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Per-call CPU time in seconds of each callable on one thread (``time.process_time``;
    minimum over ``reps`` interleaved calls). On a shared machine this tracks the work a kernel
    does, where wall-clock medians with 2 threads also measure the other tenants: a thread
    descheduled at a barrier costs a whole time slice."""
    import time

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {name: float("inf") for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.process_time()
                fn()
                best[name] = min(best[name], time.process_time() - t0)
    finally:
        torch.set_num_threads(prev)
    return best


_PEAK_SCRIPT = r"""
import gc, json, os, sys
import torch
torch.set_num_threads({threads})
import sparsekern  # noqa: F401
sys.path.insert(0, {bench_dir!r})
from {module} import peak_memory_case
setup, run, warm = peak_memory_case({case!r})
warm()
args = setup()
gc.collect()
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = rss('VmRSS:')
reset = True
try:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
except OSError:
    reset = False
out = run(*args)
peak = rss('VmHWM:')
outs = out if isinstance(out, (tuple, list)) else (out,)
out_bytes = sum(t.numel() * t.element_size() for t in outs)
print(json.dumps({{"extra_bytes": peak - before - out_bytes, "out_bytes": out_bytes,
                  "hwm_reset": reset}}))
"""


def peak_extra_bytes(module: str, case: str, threads: int) -> dict:
    """Peak resident memory one call adds beyond its inputs and outputs, measured in a fresh
    process: RSS before the call, the kernel's peak-RSS counter reset (/proc/self/clear_refs),
    VmHWM after. Counts every allocator (torch, MKL, malloc) that touches memory; glibc is told
    to mmap every block of 64 KiB or more, so reused free heap cannot hide an allocation."""
    code = _PEAK_SCRIPT.format(threads=threads, bench_dir=str(Path(__file__).parent),
                               module=module, case=case)
    # Every block >= 64 KiB is mmapped and returned on free, so freed memory cannot hide
    # an allocation from the resident-set counter.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, env=env)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
