"""Compile every sparsekern Triton kernel ahead of time for sm_80 (A100) and sm_90 (H100) — no
GPU needed — and report registers, spills, shared memory and occupancy per kernel/config/arch.

    python3 benchmarks/gpu_static_report.py            # full table (+ --json PATH)
    python3 benchmarks/gpu_static_report.py --check    # CI: exit 1 on any compile failure,
                                                       # when no config of a variant fits the GPU,
                                                       # or when an fp16/bf16 GEMM-like kernel
                                                       # has no tensor-core instructions

Every autotune config of every kernel is compiled for its main variant, and every code path
(layout, block path / tile path, conv, groups, top-k pass, dtype) at one config, so code that
only the interpreter accepts (``tl.dot`` with K < 16, histogram bins that are not a multiple of
32, ...) fails here. Resource usage comes from ``cuobjdump --dump-resource-usage`` (shipped in
the triton wheel); dynamic shared memory from Triton's metadata. Triton's kernel cache makes
reruns fast. The interpreter must be off: the script re-executes itself without
``TRITON_INTERPRET``.

Tensor cores: every row records the tensor-core instructions of its PTX (``mma.sync`` on sm_80,
``mma.sync`` or ``wgmma.mma_async`` on sm_90) and whether its Triton IR has a ``tt.dot``; the
first config of each kernel x dtype x arch is also disassembled (``nvdisasm`` from the triton
wheel; results cached by cubin hash) and its ``HMMA``/``HGMMA`` instructions counted (static
counts, not executed ones). A GEMM-like kernel (:data:`GEMM_KERNELS`, or any
with a ``tt.dot``) in fp16/bf16 without them fails ``--check``; fp32 rows are reported (TF32
``mma`` with the launchers' ``tf32``/``tf32x3`` precisions), not required.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1":
    # @triton.jit must build real kernels; importing the module (tests) changes nothing
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402,F401  (before sparsekern: its C++ extension needs torch's libraries)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# per arch: (shared memory per SM, max per block, registers per SM, name)
ARCHS = {80: (167936, 166912, 65536, "A100"), 90: (233472, 232448, 65536, "H100")}
DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
# every kernel here reduces with tl.dot: in fp16/bf16 its PTX/SASS must use tensor cores
GEMM_KERNELS = ("_spmm_kernel", "_spmm_t_kernel", "_sddmm_block_kernel", "_wgrad_kernel",
                "_conv_dgrad_kernel")
TENSOR_CORE_DTYPES = ("fp16", "bf16")
_PTX_TC = re.compile(r"\b(mma\.sync\.aligned|wgmma\.mma_async\.sync\.aligned)\.(\w+)\S*?\."
                     r"(f16|bf16|tf32|e4m3|e5m2|s8|u8)\b")
_SASS_TC = re.compile(r"\b(HMMA|HGMMA)\.")


def ptx_tensor_ops(ptx: str) -> dict[str, int]:
    """Tensor-core instructions in PTX text by kind (``mma.m16n8k16.f16``,
    ``wgmma.m64n32k16.bf16``, ...) -> number of occurrences."""
    out: dict[str, int] = {}
    for op, shape, ty in _PTX_TC.findall(ptx):
        key = f"{'wgmma' if op.startswith('wgmma') else 'mma'}.{shape}.{ty}"
        out[key] = out.get(key, 0) + 1
    return out


def sass_tensor_ops(sass: str) -> dict[str, int]:
    """``HMMA`` / ``HGMMA`` instruction counts in ``cuobjdump --dump-sass`` text."""
    out: dict[str, int] = {}
    for op in _SASS_TC.findall(sass):
        out[op] = out.get(op, 0) + 1
    return out


def tensor_core_problems(rows: list[dict]) -> list[str]:
    """Rows of GEMM-like fp16/bf16 kernels whose code has no tensor-core instructions (PTX, or
    SASS where it was disassembled), and GEMM kernels without a ``tt.dot``."""
    bad = []
    for r in rows:
        if not r.get("ok"):
            continue
        name = f"{r['kernel']} {r['variant']} {r['config']} {r['arch']}"
        if r["kernel"] in GEMM_KERNELS and not r["has_dot"]:
            bad.append(f"{name}: no tt.dot in its Triton IR")
        gemm = r["kernel"] in GEMM_KERNELS or r["has_dot"]
        if not gemm or r["dtype"] not in TENSOR_CORE_DTYPES:
            continue
        if not r["ptx_tc"]:
            bad.append(f"{name}: no mma/wgmma in its PTX")
        if r.get("sass_tc") is not None and not r["sass_tc"]:
            bad.append(f"{name}: no HMMA/HGMMA in its SASS")
    return bad


@dataclass
class Spec:
    kernel: str
    variant: str
    config: str
    constexprs: dict
    types: dict  # non-default argument types
    num_warps: int
    num_stages: int
    options: dict = field(default_factory=lambda: {"enable_fp_fusion": True})  # as launched
    main: bool = False  # part of a config sweep: at least one config per variant must fit
    conv: bool = False  # operand geometry: linear (2-D, contiguous) or conv (NCHW)


def _kernels():
    from sparsekern.kernels import bsr_mm, conv, sddmm
    return {"_spmm_kernel": bsr_mm._spmm_kernel, "_spmm_t_kernel": bsr_mm._spmm_t_kernel,
            "_sddmm_block_kernel": sddmm._sddmm_block_kernel,
            "_wgrad_kernel": sddmm._wgrad_kernel, "_conv_dgrad_kernel": conv._conv_dgrad_kernel}


def _jit(kernel):
    return kernel.fn if hasattr(kernel, "configs") else kernel


def _configs(kernel):
    return list(kernel.configs) if hasattr(kernel, "configs") else []


def _ptr(dt: str) -> str:
    return {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dt]


def specs() -> list[Spec]:
    from sparsekern.kernels import configs as C
    ks = _kernels()
    out: list[Spec] = []

    def tiling_c(br, bc, block=True):
        t = C.tiling(br, bc, allow_block_path=block, target=64)
        return t, t.constexprs()

    # ---- forward (linear + conv) and grad_input
    def spmm(kname, dt, br, bc, *, w_mode=0, conv=False, grouped=False, sweep=False):
        t, ce = tiling_c(br, bc)
        prec = "tf32x3"
        base = dict(ce, USE_CSR=t.block_path, W_MODE=w_mode, DOT=DTYPES[dt], PREC=prec)
        if kname == "_spmm_kernel":
            base.update(CONV=conv, GROUPED=grouped)
            types = {"x_ptr": _ptr(dt), "w_ptr": _ptr(dt), "y_ptr": _ptr(dt)}
        else:
            types = {"dy_ptr": _ptr(dt), "w_ptr": _ptr(dt), "dx_ptr": _ptr(dt)}
        cfgs = C.prune_spmm(_configs(ks[kname]), {}, **base)
        variant = (f"{dt} {br}x{bc} {'block' if t.block_path else 'tile'} w{w_mode}"
                   + (" conv" if conv else "") + (" groups" if grouped else ""))
        for cfg in (cfgs if sweep else cfgs[:1]):
            out.append(Spec(kname, variant, f"BM={cfg.kwargs['BM']} w{cfg.num_warps} "
                            f"s{cfg.num_stages}", dict(base, **cfg.kwargs), types,
                            cfg.num_warps, cfg.num_stages, main=sweep, conv=conv))

    for kname in ("_spmm_kernel", "_spmm_t_kernel"):
        for bs in ((16, 16), (32, 32), (64, 64), (128, 128), (1, 1)):
            spmm(kname, "fp16", *bs, sweep=True)
        spmm(kname, "fp32", 32, 32)
        spmm(kname, "bf16", 32, 32, w_mode=1)
        spmm(kname, "fp16", 1, 1, w_mode=2)
        spmm(kname, "fp16", 4, 4)
        spmm(kname, "fp32", 3, 5, w_mode=2)
    spmm("_spmm_kernel", "fp16", 32, 32, conv=True, grouped=True)
    spmm("_spmm_kernel", "fp32", 1, 1, conv=True)

    # ---- SDDMM on the block path
    for bs in ((16, 16), (32, 32), (64, 64), (128, 128)):
        for dt in ("fp16",) + (("fp32",) if bs == (32, 32) else ()):
            cfgs = C.prune_by_block(_configs(ks["_sddmm_block_kernel"]), {}, BR=bs[0], BC=bs[1])
            for cfg in (cfgs if dt == "fp16" else cfgs[:1]):
                out.append(Spec("_sddmm_block_kernel", f"{dt} {bs[0]}x{bs[1]}",
                                f"BP={cfg.kwargs['BP']} w{cfg.num_warps} s{cfg.num_stages}",
                                dict(BR=bs[0], BC=bs[1], CONV=False, GROUPED=False,
                                     DOT=DTYPES[dt], PREC="tf32x3", **cfg.kwargs),
                                {"dy_ptr": _ptr(dt), "x_ptr": _ptr(dt), "vals_ptr": _ptr(dt)},
                                cfg.num_warps, cfg.num_stages, main=dt == "fp16"))
    cfg = C.prune_by_block(_configs(ks["_sddmm_block_kernel"]), {}, BR=32, BC=32)[0]
    out.append(Spec("_sddmm_block_kernel", "bf16 32x32 conv groups",
                    f"BP={cfg.kwargs['BP']} w{cfg.num_warps} s{cfg.num_stages}",
                    dict(BR=32, BC=32, CONV=True, GROUPED=True, DOT=tl.bfloat16, PREC="tf32x3",
                         **cfg.kwargs),
                    {"dy_ptr": "*bf16", "x_ptr": "*bf16", "vals_ptr": "*bf16"},
                    cfg.num_warps, cfg.num_stages, conv=True))

    # ---- weight-side tile kernel: SDDMM tile path + top-k passes (one config per tiling)
    def wgrad(dt, br, bc, pass_id, *, store=False, counter=False, conv=False, grouped=False):
        t = C.tiling(br, bc, allow_block_path=False, target=64)
        cfg = C.wgrad_config(t)
        ce = dict(t.constexprs(), SM=t.sm, SK=t.sk, BP=cfg["BP"], PASS=pass_id,
                  STORE_VALUES=store, HAS_COUNTER=counter, CONV=conv, GROUPED=grouped,
                  DOT=DTYPES[dt], PREC="tf32x3")
        variant = (f"{dt} {br}x{bc} pass{pass_id}" + (" +values" if store else "")
                   + (" +counter" if counter else "") + (" conv" if conv else "")
                   + (" groups" if grouped else ""))
        types = {"dy_ptr": _ptr(dt), "x_ptr": _ptr(dt), "vals_ptr": _ptr(dt),
                 "bonus_scale": "fp32", "eps": "fp32", "lo_bound": "i64", "hi_bound": "i64",
                 "digit_mask": "i64"}
        out.append(Spec("_wgrad_kernel", variant, f"BP={cfg['BP']} w{cfg['num_warps']} "
                        f"s{cfg['num_stages']}", ce, types, cfg["num_warps"],
                        cfg["num_stages"], {"enable_fp_fusion": False}, main=True, conv=conv))

    for p in (0, 1, 2, 3):
        wgrad("fp16", 1, 1, p, store=p <= 1)
    wgrad("fp32", 1, 1, 1, counter=True)
    wgrad("bf16", 1, 1, 3, counter=True)
    wgrad("fp16", 16, 16, 1, store=True, counter=True)
    wgrad("fp16", 16, 16, 3)
    wgrad("fp32", 3, 5, 1, counter=True)
    wgrad("fp16", 128, 128, 1, store=True)
    wgrad("fp16", 32, 32, 1, store=True, conv=True, grouped=True)

    # ---- conv grad_input
    cfgs = _configs(ks["_conv_dgrad_kernel"])
    for (tco, tci, dt, w_mode, br, bc, sweep) in ((32, 64, "fp16", 0, 1, 1, True),
                                                  (16, 16, "fp16", 0, 16, 16, True),
                                                  (32, 64, "fp32", 2, 32, 32, False),
                                                  (32, 16, "bf16", 2, 1, 1, False)):
        for cfg in (cfgs if sweep else cfgs[:1]):
            out.append(Spec("_conv_dgrad_kernel", f"{dt} TCO={tco} TCI={tci} w{w_mode} "
                            f"{br}x{bc}", f"BP={cfg.kwargs['BP']} w{cfg.num_warps} "
                            f"s{cfg.num_stages}",
                            dict(BR=br, BC=bc, TCO=tco, TCI=tci, W_MODE=w_mode, DOT=DTYPES[dt],
                                 PREC="tf32x3", **cfg.kwargs),
                            {"dy_ptr": _ptr(dt), "w_ptr": _ptr(dt), "dx_ptr": _ptr(dt)},
                            cfg.num_warps, cfg.num_stages, main=sweep, conv=True))
    return out


# pointer arguments with a fixed element type, by name
FIXED_PTRS = {"m_ptr": "*u8", "row_ptr": "*i32", "col_idx": "*i32", "col_ptr": "*i32",
              "row_idx": "*i32", "slot_t": "*i32", "flags_ptr": "*i8", "tflags_ptr": "*i8",
              "excl_ptr": "*u8", "cnt_ptr": "*i32", "hist_ptr": "*i32", "tlo_ptr": "*i64",
              "thi_ptr": "*i64", "ncand_ptr": "*i32", "cand_ptr": "*i64"}


# Representative runtime values of the int arguments, as a launch on contiguous tensors of
# typical shapes passes them (a layer of 4096 x 4096, batch 4096; conv: 256 channels at 28x28).
_NCHW = ("n", "c", "h", "w")
LINEAR_VALUES = dict(NP=4096, M=4096, K=4096, NBR=4096, NBC=4096, stride_xb=4096, stride_xk=1,
                     stride_dyb=4096, stride_dym=1, stride_yb=4096, stride_ym=1, stride_dxb=4096,
                     stride_dxk=1, stride_wm=4096, stride_wk=1, stride_maskm=4096,
                     stride_maskk=1, stride_exclm=4096, stride_exclk=1, stride_cntm=4096,
                     stride_cntk=1,
                     **{f"stride_{t}{d}": 0 for t in ("x", "dy", "y", "dx") for d in _NCHW})
CONV_VALUES = dict(LINEAR_VALUES, NP=8 * 28 * 28, M=256, K=256 * 9, NBR=256, NBC=256 * 9,
                   stride_xb=0, stride_xk=0, stride_dyb=0, stride_dym=0, stride_yb=0,
                   stride_ym=0, stride_dxb=0, stride_dxk=0, stride_wm=256 * 9,
                   stride_maskm=256 * 9, stride_exclm=256 * 9, stride_cntm=256 * 9,
                   **{f"stride_{t}{d}": v for t in ("x", "dy", "y", "dx")
                      for d, v in zip(_NCHW, (256 * 784, 784, 28, 1))})


def signature(fn, spec: Spec) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` as Triton's launcher would build them: pointers
    16-byte aligned, ints equal to 1 folded to constants and multiples of 16 marked divisible,
    except the ``do_not_specialize`` ones."""
    values = CONV_VALUES if spec.conv else LINEAR_VALUES
    sig, consts, attrs = {}, dict(spec.constexprs), {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        ty = spec.types.get(p.name, FIXED_PTRS.get(p.name, "i32"))
        if ty.startswith("*"):
            sig[p.name] = ty
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        v = values.get(p.name)
        if p.do_not_specialize or v is None or not ty.startswith("i"):
            sig[p.name] = ty
        elif v == 1:
            sig[p.name] = "constexpr"
            consts[p.name] = 1
        else:
            sig[p.name] = ty
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def _sass_counts(path: str, cubin: bytes):
    """HMMA/HGMMA counts of a cubin's SASS (``nvdisasm`` from the triton wheel, else
    ``cuobjdump --dump-sass``), cached by the cubin's hash next to Triton's kernel cache
    (disassembly costs ~0.3 s a kernel); None when no disassembler runs."""
    import hashlib
    cache = os.path.join(os.environ.get("TRITON_CACHE_DIR") or
                         os.path.join(os.path.expanduser("~"), ".triton", "cache"),
                         "sparsekern_sass")
    key = os.path.join(cache, hashlib.sha256(cubin).hexdigest() + ".json")
    try:
        with open(key) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    nvdisasm = os.path.join(os.path.dirname(_cuobjdump()), "nvdisasm")
    cmd = [nvdisasm, "-ndf", path] if os.path.exists(nvdisasm) else \
        [_cuobjdump(), "--dump-sass", path]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    counts = sass_tensor_ops(res.stdout)
    try:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{key}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(counts, f)
        os.replace(tmp, key)
    except OSError:
        pass
    return counts


def occupancy(arch: int, regs: int, smem: int, warps: int) -> tuple[int, float]:
    """(resident blocks per SM, fraction of the SM's 64 warps) from registers, shared memory,
    threads and the 32-block limit."""
    smem_sm, smem_blk, regs_sm, _ = ARCHS[arch]
    if smem > smem_blk:
        return 0, 0.0
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = regs_sm // (per_warp * warps)
    by_smem = smem_sm // (smem + 1024) if smem else 32
    by_threads = 2048 // (32 * warps)
    blocks = max(0, min(by_regs, by_smem, by_threads, 32))
    return blocks, blocks * warps / 64


def compile_one(args) -> dict:
    idx, arch, sass = args
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    spec = specs()[idx]
    fn = _jit(_kernels()[spec.kernel])
    row = dict(kernel=spec.kernel, variant=spec.variant, config=spec.config, arch=f"sm_{arch}",
               gpu=ARCHS[arch][3], main=spec.main, dtype=spec.variant.split()[0])
    t0 = time.time()
    try:
        sig, consts, attrs = signature(fn, spec)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        opts = dict(num_warps=spec.num_warps, num_stages=spec.num_stages, **spec.options)
        cc = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as e:  # noqa: BLE001 - reported per kernel
        msg = str(e).strip().splitlines()
        row.update(ok=False, error=" | ".join(msg[-3:])[:400], seconds=time.time() - t0)
        return row
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cc.asm["cubin"])
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", path],
                              capture_output=True, text=True).stdout
        sass_tc = _sass_counts(path, cc.asm["cubin"]) if sass else None
    m = _RES.search(dump)
    regs, stack, static_smem, local = (int(v) for v in m.groups()) if m else (-1, -1, -1, -1)
    smem = int(cc.metadata.shared) + max(static_smem, 0)
    blocks, occ = occupancy(arch, regs, smem, spec.num_warps)
    row.update(ok=True, regs=regs, stack=stack, local=local, smem=smem, blocks_per_sm=blocks,
               occupancy=round(occ, 3), fits=smem <= ARCHS[arch][1],
               has_dot=bool(re.search(r"\btt\.dot\b", cc.asm["ttir"])),
               ptx_tc=ptx_tensor_ops(cc.asm["ptx"]), sass_tc=sass_tc,
               seconds=round(time.time() - t0, 2))
    return row


def markdown(rows: list[dict]) -> str:
    """One line per kernel / variant / config: registers, spill bytes, shared memory (KB) and
    occupancy on A100 (sm_80) | H100 (sm_90)."""
    by = {}
    for r in rows:
        by.setdefault((r["kernel"], r["variant"], r["config"]), {})[r["arch"]] = r

    def cell(r, key):
        if r is None or not r["ok"]:
            return "FAILED" if r is not None else "-"
        if key == "spill":
            return str(r["local"] + r["stack"])
        if key == "smem":
            return f"{r['smem'] / 1024:.0f}"
        if key == "occupancy":
            return f"{r['occupancy']:.2f}"
        return str(r[key])

    lines = [f"Triton {triton.__version__}; A100 = sm_80, H100 = sm_90; regs per thread, spill "
             "bytes (local + stack), shared memory KB per block, occupancy = resident warps / 64.",
             "", "| kernel | variant | config | regs A100/H100 | spill | smem KB | occupancy |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, variant, config), arch in by.items():
        a, h = arch.get("sm_80"), arch.get("sm_90")
        cols = [f"{cell(a, key)} / {cell(h, key)}"
                for key in ("regs", "spill", "smem", "occupancy")]
        lines.append(f"| `{kernel}` | {variant} | {config} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def tensor_core_table(rows: list[dict]) -> str:
    """Per kernel x dtype: how many compiled variants/configs have tensor-core instructions in
    their PTX, which ones, and the HMMA/HGMMA count in the SASS of the first config, for A100
    (sm_80) and H100 (sm_90)."""
    by: dict[tuple, dict] = {}
    for r in rows:
        if r["ok"]:
            by.setdefault((r["kernel"], r["dtype"]), {}).setdefault(r["arch"], []).append(r)

    def cell(rs):
        if not rs:
            return "-"
        n_tc = sum(1 for r in rs if r["ptx_tc"])
        kinds = sorted({k for r in rs for k in r["ptx_tc"]})
        sass = [r["sass_tc"] for r in rs if r.get("sass_tc") is not None]
        s = (", ".join(f"{k} {v}" for k, v in sorted(sass[0].items())) or "none") if sass \
            else "not disassembled"
        return f"{n_tc}/{len(rs)}: {' '.join(kinds) or 'no mma'}; SASS {s}"

    lines = ["Tensor cores: compiles whose PTX has mma/wgmma (of all compiled), their kinds, and "
             "HMMA/HGMMA instructions in the first config's SASS (static counts).", "",
             "| kernel | dtype | A100 (sm_80) | H100 (sm_90) |", "|---|---|---|---|"]
    for (kernel, dtype), arch in by.items():
        lines.append(f"| `{kernel}` | {dtype} | {cell(arch.get('sm_80'))} | "
                     f"{cell(arch.get('sm_90'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 on failures (CI)")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--markdown", help="write a README table (sm_80 | sm_90 side by side)")
    ap.add_argument("--sass", choices=("first", "all", "none"), default="first",
                    help="disassemble the first config of each kernel x dtype x arch "
                    "(default), every config, or none, to count HMMA/HGMMA instructions")
    args = ap.parse_args(argv)
    t0 = time.time()
    all_specs = specs()
    firsts: set[tuple] = set()
    todo = []
    for i, spec in enumerate(all_specs):
        for a in args.arch:
            key = (spec.kernel, spec.variant.split()[0], a)
            todo.append((i, a, args.sass == "all" or (args.sass == "first"
                                                       and key not in firsts)))
            firsts.add(key)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, todo))
    bad = [r for r in rows if not r["ok"]]
    print(f"{'kernel':22} {'variant':34} {'config':18} {'arch':6} {'regs':>4} {'spill':>5} "
          f"{'smem KB':>7} {'blk/SM':>6} {'occ':>5}")
    for r in rows:
        if r["ok"]:
            spill = r["local"] + r["stack"]
            print(f"{r['kernel']:22} {r['variant']:34} {r['config']:18} {r['arch']:6} "
                  f"{r['regs']:>4} {spill:>5} {r['smem'] / 1024:>7.1f} {r['blocks_per_sm']:>6} "
                  f"{r['occupancy']:>5.2f}" + ("" if r["fits"] else "  (does not fit)"))
        else:
            print(f"{r['kernel']:22} {r['variant']:34} {r['config']:18} {r['arch']:6} "
                  f"FAILED: {r['error']}")
    # a variant swept over configs must keep at least one config that fits each arch
    unfit = []
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["ok"] and r["main"]:
            groups.setdefault((r["kernel"], r["variant"], r["arch"]), []).append(r["fits"])
    for key, fits in groups.items():
        if not any(fits):
            unfit.append(key)
    n_unfit_cfg = sum(1 for r in rows if r["ok"] and not r["fits"])
    print("\n" + tensor_core_table(rows))
    no_tc = tensor_core_problems(rows)
    for line in no_tc:
        print("NO TENSOR CORES:", line)
    print(f"\n{len(rows)} compiles ({len(rows) - len(bad)} ok, {len(bad)} failed) in "
          f"{time.time() - t0:.0f} s; {n_unfit_cfg} configs exceed shared memory (the autotuner "
          f"skips them); variants with no config that fits: {unfit or 'none'}; fp16/bf16 "
          f"GEMM-like compiles without tensor-core instructions: {len(no_tc)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n" + tensor_core_table(rows))
    if args.check and (bad or unfit or no_tc):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
