"""The CUDA C++ kernels (``csrc/cuda``).

Runs on any machine with the compilers, GPU or not:
  * every ``.cu`` compiles with nvcc for sm_80 and sm_90 exactly as ``.ci/nvcc_check`` does, with
    no warnings and no register spills (resource usage from ``cuobjdump`` when available);
  * the torch glue ``sparsekern_cuda.cpp`` passes a C++ syntax check against this torch's headers;
  * ``csrc/cuda/tests/test_kernel_math.cpp`` — a host build of the kernels' ``__host__ __device__``
    helpers (``kernel_math.cuh``) — passes its self test, and its emulation of the kernels' index
    walks and of the growth radix select agrees exactly with ``sparsekern.reference``;
  * the kernels' own source runs on the CPU under ``csrc/cuda/tests/emu`` (one cooperative fiber
    per CUDA thread, real barrier and warp-intrinsic semantics, shuffled scheduling) through the
    real launchers, and matches the reference exactly on integer data for every dtype.
With a GPU and a CUDA build of ``sparsekern._C`` the kernels are compared with the reference on
the device (skipped otherwise, with the reason).
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsekern as sk
from sparsekern import reference as ref
from sparsekern.topology import build_topology, expand_blocks, grid_shape

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
CXX = next((shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++")
            if c and shutil.which(c)), None)
NVCC_FLAGS = ["-c", "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}",
              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# `k<...><<<grid, block, smem, stream>>>(` -> `::sk_emu::launch(::sk_emu::Cfg(...), &k<...>, `
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;<>]*>)?)<<<(.*?)>>>\(", re.S)


def _cuda_include() -> str | None:
    """A CUDA toolkit include directory holding cuda_runtime_api.h and cuda_fp16.h."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    if NVCC:
        roots.append(str(Path(os.path.realpath(NVCC)).parent.parent))
    for r in roots:
        if r and (Path(r) / "include" / "cuda_runtime_api.h").is_file():
            return str(Path(r) / "include")
    return None


CUDA_INC = _cuda_include()


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(cand) if cand.is_file() else None


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------- builds (once)
@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Runs, in parallel, every build this module checks; maps a job name to (returncode, log);
    "_dir" is the output folder."""
    out = tmp_path_factory.mktemp("cuda_builds")
    jobs = {}
    if NVCC:
        for f in CU_FILES:
            jobs[f"nvcc:{f.name}"] = [NVCC, *NVCC_FLAGS, str(f), "-o", str(out / f"{f.name}.o")]
    if CXX:
        jobs["host_test"] = [CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-ffp-contract=off",
                             f"-I{ROOT / 'csrc'}", str(CUDA_DIR / "tests" / "test_kernel_math.cpp"),
                             "-o", str(out / "test_kernel_math")]
    if CXX and CUDA_INC:
        from torch.utils.cpp_extension import include_paths
        torch_inc = [a for p in include_paths() for a in ("-isystem", p)]
        glue_flags = ["-std=c++17", "-O0", "-fPIC", "-c", "-Wall", "-Wextra",
                      "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *torch_inc, "-isystem", CUDA_INC,
                      f"-I{CUDA_DIR}"]
        jobs["glue"] = [CXX, *glue_flags, str(CUDA_DIR / "sparsekern_cuda.cpp"),
                        "-o", str(out / "glue.o")]
        jobs["glue_stubs"] = [CXX, *glue_flags, str(CUDA_DIR / "tests" / "glue_stubs.cpp"),
                              "-o", str(out / "glue_stubs.o")]
        if sys.platform.startswith("linux"):  # the emulator uses ucontext
            gen = []
            for f in CU_FILES:
                src, n = LAUNCH.subn(lambda m: f"::sk_emu::launch(::sk_emu::Cfg({m.group(2)}), "
                                               f"&{m.group(1)}, ", f.read_text())
                assert n > 0 and "<<<" not in src, f"{f.name}: launch rewrite failed"
                gen.append(out / f"{f.stem}_emu.cpp")
                gen[-1].write_text(f'#line 1 "{f}"\n' + src)
            jobs["emu"] = [CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                           f"-I{CUDA_DIR / 'tests' / 'emu'}", f"-I{CUDA_DIR}", "-isystem", CUDA_INC,
                           *map(str, gen), str(CUDA_DIR / "tests" / "emu_driver.cpp"),
                           "-o", str(out / "emu_driver")]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futs = {name: pool.submit(_run, cmd) for name, cmd in jobs.items()}
        results = {}
        for name, fut in futs.items():
            res = fut.result()
            results[name] = (res.returncode, res.stdout + res.stderr)
    results["_dir"] = out
    return results


def _assert_clean(builds, name):
    rc, log = builds[name]
    assert rc == 0, f"{name} failed:\n{log}"
    assert "warning" not in log.lower(), f"{name} has warnings:\n{log}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources not compiled")
def test_nvcc_compiles_every_cu(builds):
    assert CU_FILES, "no csrc/cuda/*.cu files"
    for f in CU_FILES:
        _assert_clean(builds, f"nvcc:{f.name}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources not compiled")
def test_kernels_do_not_spill(builds):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton wheel) to read resource usage")
    rows = []
    for f in CU_FILES:
        obj = builds["_dir"] / f"{f.name}.o"
        if not obj.exists():
            pytest.fail(f"{f.name} did not compile")
        res = _run([tool, "--dump-resource-usage", str(obj)])
        assert res.returncode == 0, res.stderr
        arch = name = None
        for line in res.stdout.splitlines():
            m = re.match(r"\s*arch = (sm_\d+)", line)
            if m:
                arch = m.group(1)
            m = re.match(r"\s*Function (\S+):", line)
            if m:
                name = m.group(1)
            m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
            if m:
                rows.append((f.name, arch, *map(int, m.groups()), name or "?"))
    assert rows, "cuobjdump reported no kernels"
    if shutil.which("c++filt"):
        names = _run(["c++filt"], input="\n".join(r[-1] for r in rows)).stdout.splitlines()
        if len(names) == len(rows):
            rows = [(*r[:-1], n) for r, n in zip(rows, names)]
    print("\nfile arch REG STACK SHARED LOCAL kernel")
    for r in rows:
        print(*r)
    spills = [r for r in rows if r[3] or r[5]]  # spills show as a stack frame / local memory
    assert not spills, f"kernels with register spills (STACK/LOCAL > 0): {spills}"
    assert all(r[4] <= 48 * 1024 for r in rows), "a kernel needs more than 48 KB static shared"


@pytest.mark.skipif(CXX is None or CUDA_INC is None,
                    reason="needs a C++ compiler and the CUDA runtime headers")
def test_glue_compiles_against_torch_headers(builds):
    _assert_clean(builds, "glue")


_PROBE = r"""
import sys, torch
root, probe = sys.argv[1], sys.argv[2]
import sparsekern  # noqa: F401  (defines the kernel ops' schemas from sparsekern/spec.py)
ops = ["_bsr_mm", "_bsr_mm_t", "_sddmm", "_grow_topk", "_fused_weight_grad"]
if torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::_bsr_mm", "CUDA"):
    print("SKIP: sparsekern._C already registers CUDA kernels"); sys.exit(0)
torch.ops.load_library(probe)  # a schema mismatch aborts here
for o in ops:
    print(o, torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::" + o, "CUDA"))
cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
x, dy = torch.zeros(3, 5), torch.zeros(3, 4)
m = torch.zeros(4, 5, dtype=torch.bool)
topo = [torch.zeros(5, dtype=torch.int32)] * 5
calls = {"_bsr_mm": (x, torch.zeros(4, 5), m, topo, 1, 1),
         "_bsr_mm_t": (dy, torch.zeros(4, 5), m, topo, 1, 1),
         "_sddmm": (dy, x, m, topo, 1, 1),
         "_grow_topk": (dy, x, m, 2, torch.zeros(4, 5), 0.5, 1e-3, 1, 1),
         "_fused_weight_grad": (dy, x, m, topo, 1, 1, m, 2, None, 0.5, 1e-3)}
for o, args in calls.items():  # CPU tensors sent to the CUDA kernel: its first check answers
    try:
        getattr(torch.ops.sparsekern, o).default.redispatch(cuda, *args)
        print(o, "ACCEPTED CPU TENSORS")
    except RuntimeError as e:
        print(o, "->", str(e).splitlines()[0])
"""


@pytest.mark.skipif(CXX is None or CUDA_INC is None or not sys.platform.startswith("linux"),
                    reason="needs a C++ compiler, the CUDA runtime headers and Linux")
def test_glue_registers_against_op_schemas(builds, tmp_path):
    """The glue, linked with test stubs for libcudart/libc10_cuda/the launchers, loads into this
    (CPU) torch: every TORCH_LIBRARY_IMPL(sparsekern, CUDA) signature matches its schema in
    sparsekern/spec.py (a mismatch aborts the load), and a call reaches the argument checks."""
    _assert_clean(builds, "glue")
    rc, log = builds["glue_stubs"]
    if rc != 0:
        pytest.skip(f"the stubs no longer match this torch's c10/cuda headers:\n{log[-2000:]}")
    lib_dir = Path(torch.__file__).parent / "lib"
    probe = tmp_path / "glue_probe.so"
    link = _run([CXX, "-shared", str(builds["_dir"] / "glue.o"),
                 str(builds["_dir"] / "glue_stubs.o"), "-o", str(probe), f"-L{lib_dir}",
                 "-lc10", "-ltorch_cpu", "-Wl,--no-undefined", f"-Wl,-rpath,{lib_dir}"])
    if link.returncode != 0:
        pytest.skip(f"the stubs do not cover this torch's CUDA symbols:\n{link.stderr[-2000:]}")
    res = _run([sys.executable, "-c", _PROBE, str(ROOT), str(probe)], cwd=str(ROOT))
    assert res.returncode == 0, res.stdout + res.stderr
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    for o in ("_bsr_mm", "_bsr_mm_t", "_sddmm", "_grow_topk", "_fused_weight_grad"):
        assert lines[o].startswith("->"), f"{o}: {lines[o]}"
    first = res.stdout.splitlines()[:5]
    assert first == [f"{o} True" for o in ("_bsr_mm", "_bsr_mm_t", "_sddmm", "_grow_topk",
                                           "_fused_weight_grad")]
    assert "sparsekern::_bsr_mm: x must be a CUDA tensor" in lines["_bsr_mm"]
    assert "sparsekern::_bsr_mm_t: dy must be a CUDA tensor" in lines["_bsr_mm_t"]
    assert "sparsekern::_grow_topk: x must be a CUDA tensor" in lines["_grow_topk"]


# --------------------------------------------------------------------------- problems
def _int_data(shape, seed, lo=-2, hi=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).float()


SPMM_CASES = [
    # B, M, K, br, bc, density
    (5, 13, 67, 1, 1, 0.5),
    (4, 67, 13, 1, 1, 0.9),
    (3, 64, 64, 16, 16, 0.5),
    (70, 70, 45, 32, 8, 0.7),
    (3, 45, 70, 3, 5, 0.6),
    (2, 123, 67, 64, 2, 0.5),
    (3, 40, 40, 4, 4, 0.0),
    (3, 40, 40, 4, 4, 1.0),
    (0, 17, 9, 2, 2, 0.5),
    (2, 30, 90, 1, 70, 0.5),
    (40, 150, 140, 70, 20, 0.5),
]
SPMM_IDS = ["B{}_{}x{}_b{}x{}_d{}".format(*c) for c in SPMM_CASES]


def _spmm_problem(case, layout):
    """Integer-valued x, dy, w and a partial mask on random active blocks, with its topology."""
    B, M, K, br, bc, density = case
    seed = B * 1000 + M * 10 + K + br + bc
    g = torch.Generator().manual_seed(seed)
    nbr, nbc = grid_shape((M, K), (br, bc))
    mask = expand_blocks(torch.rand(nbr, nbc, generator=g) < density, (br, bc), (M, K))
    mask &= torch.rand(M, K, generator=g) < 0.8
    topo = build_topology(mask, (br, bc))
    x, dy = _int_data((B, K), seed + 1, -3, 4), _int_data((B, M), seed + 2, -3, 4)
    w = _int_data((topo.nnzb, br, bc) if layout == "bsr" else (M, K), seed + 3, -3, 4)
    return x, dy, w, mask, topo


def _write_spmm(d: Path, case, layout, ops=None):
    B, M, K, br, bc, _ = case
    x, dy, w, mask, topo = _spmm_problem(case, layout)
    for name, t in [("x", x), ("dy", dy), ("w", w)]:
        t.numpy().astype(np.float32).tofile(d / f"{name}.bin")
    mask.numpy().astype(np.uint8).tofile(d / "mask.bin")
    for name in ("row_ptr", "col_idx", "col_ptr", "row_idx", "slot_t"):
        getattr(topo, name).numpy().astype(np.int32).tofile(d / f"{name}.bin")
    extra = "" if ops is None else f" {ops}"
    (d / "params.txt").write_text(f"{B} {M} {K} {br} {bc} {int(layout == 'bsr')}{extra}\n")
    return x, dy, w, mask, topo


def _load(d: Path, name, shape, dtype=np.float32):
    return torch.from_numpy(np.fromfile(d / f"{name}.bin", dtype=dtype)).view(shape)


def _check_spmm(d: Path, case, problem, dtype=torch.float32, ops=7):
    """The outputs in d against the reference on the inputs rounded to dtype (exact: integer
    data accumulates exactly, so the only rounding is the final cast)."""
    B, M, K, br, bc, _ = case
    x, dy, w, mask, topo = problem
    x, dy, w, t = x.to(dtype), dy.to(dtype), w.to(dtype), topo.tensors
    if ops & 1:
        assert torch.equal(_load(d, "y", (B, M)), ref.bsr_mm(x, w, mask, t, br, bc).float())
    if ops & 2:
        assert torch.equal(_load(d, "dx", (B, K)), ref.bsr_mm_t(dy, w, mask, t, br, bc).float())
    if ops & 4:
        assert torch.equal(_load(d, "sddmm", (topo.nnzb, br, bc)),
                           ref.sddmm(dy, x, mask, t, br, bc).float())


GROW_CASES = [
    # B, M, K, br, bc, k, cap, counter
    (5, 37, 53, 1, 1, 40, 4, False),
    (3, 67, 130, 1, 1, 100, 1, True),
    (2, 64, 64, 4, 4, 30, 2, False),
    (4, 100, 70, 3, 7, 25, 5, True),
    (3, 130, 90, 65, 2, 2, 1, False),
    (2, 20, 200, 1, 100, 3, 1, True),
    (0, 13, 17, 1, 1, 5, 2, False),
    (70, 70, 66, 2, 1, 60, 65536, True),
]
GROW_IDS = ["B{}_{}x{}_b{}x{}_k{}_cap{}_{}".format(*c[:7], "counter" if c[7] else "plain")
            for c in GROW_CASES]
BONUS, EPS = 0.7, 1e-3


def _grow_problem(case):
    """Integer-valued dy, x (massive ties; one inf in dy gives inf and NaN scores), a random
    exclusion, an optional visit counter; k clipped to the allowed entries."""
    B, M, K, br, bc, k, _, with_counter = case
    seed = sum(case[:7])
    dy, x = _int_data((B, M), seed), _int_data((B, K), seed + 1)
    if B > 1:
        dy[0, 1] = float("inf")
    nsr, nsc = grid_shape((M, K), (br, bc)) if (br, bc) != (1, 1) else (M, K)
    g = torch.Generator().manual_seed(seed + 2)
    exclude = torch.rand(nsr, nsc, generator=g) < 0.3
    counter = torch.randint(0, 5, (nsr, nsc), generator=g) if with_counter else None
    return dy, x, exclude, counter, min(k, int((~exclude).sum()))


def _write_grow(d: Path, case):
    B, M, K, br, bc, _, cap, _ = case
    dy, x, exclude, counter, k = problem = _grow_problem(case)
    dy.numpy().tofile(d / "dy.bin")
    x.numpy().tofile(d / "x.bin")
    exclude.numpy().astype(np.uint8).tofile(d / "exclude.bin")
    if counter is not None:
        counter.float().numpy().tofile(d / "counter.bin")
    (d / "params.txt").write_text(
        f"{B} {M} {K} {br} {bc} {k} {cap} {int(counter is not None)} {BONUS} {EPS}\n")
    return problem


def _check_grow(d: Path, case, problem, dtype=torch.float32):
    """Exact indices and scores against the reference; returns the number of passes."""
    br, bc = case[3], case[4]
    dy, x, exclude, counter, k = problem
    status, passes = map(int, (d / "status.txt").read_text().split())
    assert status == 0
    want_idx, want_s = ref.grow_topk(dy.to(dtype).float(), x.to(dtype).float(), exclude, k,
                                     counter, BONUS, EPS, br, bc)
    assert torch.equal(_load(d, "flat", (-1,), np.int64), want_idx)
    torch.testing.assert_close(_load(d, "scores", (-1,)), want_s, rtol=0, atol=0, equal_nan=True)
    return passes


# --------------------------------------------------------------------------- host helpers
@pytest.fixture(scope="module")
def host_test(builds):
    if CXX is None:
        pytest.skip("no C++ compiler for the host test")
    _assert_clean(builds, "host_test")
    return str(builds["_dir"] / "test_kernel_math")


def test_host_selftest(host_test):
    res = _run([host_test, "selftest"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "selftest: 0 failure(s)" in res.stdout


def _special_scores(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 4, (n,), generator=g).float()  # many ties
    s[torch.randperm(n, generator=g)[: n // 8]] = float("nan")
    s[torch.randperm(n, generator=g)[: n // 8]] = -0.0
    s[torch.randperm(n, generator=g)[: n // 16]] = float("inf")
    s[torch.randperm(n, generator=g)[: n // 16]] = -float("inf")
    s[torch.randperm(n, generator=g)[: n // 16]] = 1e-42  # subnormal
    s[0], s[-1] = float("nan"), 0.0
    return s


@pytest.mark.parametrize("n,seed", [(1, 0), (7, 1), (1000, 2), (5000, 3)])
def test_composite_keys_order_like_reference(host_test, tmp_path, n, seed):
    """Descending composites = the reference's stable descending order, NaN first, ties to the
    lower index (a total order over every float, -0 equal to +0)."""
    s = _special_scores(n, seed) if n > 1 else torch.tensor([float("nan")])
    s.numpy().astype(np.float32).tofile(tmp_path / "s.bin")
    res = _run([host_test, "keys", str(tmp_path / "s.bin"), str(tmp_path / "c.bin")])
    assert res.returncode == 0, res.stderr
    comp = np.fromfile(tmp_path / "c.bin", dtype=np.uint64)
    assert comp.shape == (n,) and len(np.unique(comp)) == n
    order = np.argsort(comp)[::-1].copy()
    want, _ = ref.stable_topk(s, n)
    assert torch.equal(torch.from_numpy(order), want)


@pytest.mark.parametrize("case", GROW_CASES, ids=GROW_IDS)
def test_grow_topk_host_emulation_matches_reference(host_test, tmp_path, case):
    """The growth pipeline (tile scores in kernel order, histogram passes with tile pruning,
    emission, finish) emulated with the kernels' helpers; one-entry buffers force refinements."""
    problem = _write_grow(tmp_path, case)
    res = _run([host_test, "grow", str(tmp_path)])
    assert res.returncode == 0, res.stdout + res.stderr
    passes = _check_grow(tmp_path, case, problem)
    if case[6] == 1 and problem[4] > 1:
        assert passes > 2, "a one-entry buffer must force refinement passes"


@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("case", SPMM_CASES, ids=SPMM_IDS)
def test_spmm_host_emulation_matches_reference(host_test, tmp_path, case, layout):
    """bsr_mm, bsr_mm_t and sddmm along the kernels' index walks (virtual reduction axis over a
    line's active blocks, CSC slot indirection, SDDMM work list) on sparsekern.topology
    topologies; every output written exactly once (checked by the host program)."""
    problem = _write_spmm(tmp_path, case, layout)
    res = _run([host_test, "spmm", str(tmp_path)])
    assert res.returncode == 0, res.stdout + res.stderr
    _check_spmm(tmp_path, case, problem)


# --------------------------------------------------------------------------- kernel source on CPU
@pytest.fixture(scope="module")
def emu(builds):
    if "emu" not in builds:
        pytest.skip("the CPU emulation needs Linux, a C++ compiler and the CUDA headers")
    _assert_clean(builds, "emu")
    return str(builds["_dir"] / "emu_driver")


EMU_DTYPES = ["float32", "float16", "bfloat16", "float64"]


@pytest.mark.parametrize("case", SPMM_CASES, ids=SPMM_IDS)
def test_kernel_source_spmm_on_cpu(emu, tmp_path, case):
    """The real launchers and kernels of bsr_mm.cu / sddmm.cu, executed by the CPU emulation,
    against the reference; each case in one dtype and layout (cycled), under its own seed."""
    i = SPMM_CASES.index(case)
    dtype, layout = EMU_DTYPES[i % 4], ("dense", "bsr")[(i // 2) % 2]
    problem = _write_spmm(tmp_path, case, layout)
    res = _run([emu, "spmm", str(tmp_path), dtype, str(i + 1)])
    assert res.returncode == 0, res.stdout + res.stderr
    _check_spmm(tmp_path, case, problem, getattr(torch, dtype))


def test_kernel_source_sddmm_scan_over_many_rows(emu, tmp_path):
    """More than 1024 block rows: the one-program chunk scan carries across iterations."""
    case = (2, 1100, 12, 1, 1, 0.3)
    problem = _write_spmm(tmp_path, case, "bsr", ops=4)
    res = _run([emu, "spmm", str(tmp_path), "float32", "5"])
    assert res.returncode == 0, res.stdout + res.stderr
    _check_spmm(tmp_path, case, problem, ops=4)


@pytest.mark.parametrize("case", GROW_CASES, ids=GROW_IDS)
def test_kernel_source_grow_topk_on_cpu(emu, tmp_path, case):
    """grow_topk.cu's passes driven like the glue, executed by the CPU emulation: exact top-k
    with ties, NaN/inf, block means, counters and forced refinements."""
    i = GROW_CASES.index(case)
    dtype = EMU_DTYPES[i % 3]
    problem = _write_grow(tmp_path, case)
    res = _run([emu, "grow", str(tmp_path), dtype, str(i + 1)])
    assert res.returncode == 0, res.stdout + res.stderr
    passes = _check_grow(tmp_path, case, problem, getattr(torch, dtype))
    if case[6] == 1 and problem[4] > 1:
        assert passes > 2


def test_kernel_source_results_do_not_depend_on_scheduling(emu, tmp_path):
    """Two scheduling seeds (thread order between barriers, block order) give identical bits."""
    case = SPMM_CASES[3]
    _write_spmm(tmp_path, case, "bsr")
    outs = []
    for seed in ("11", "12"):
        res = _run([emu, "spmm", str(tmp_path), "float32", seed])
        assert res.returncode == 0, res.stderr
        outs.append([(tmp_path / f"{n}.bin").read_bytes() for n in ("y", "dx", "sddmm")])
    assert outs[0] == outs[1]


# --------------------------------------------------------------------------- backend module
def test_cuda_backend_import_states_reason():
    status = sk.available_backends()["cuda"]
    if status == "ok":
        from sparsekern import cuda_backend
        assert cuda_backend.DEVICES == ("cuda",)
        assert {"bsr_mm", "bsr_mm_t", "sddmm", "grow_topk"} <= set(cuda_backend.IMPLS)
    else:
        assert "ImportError" in status and "CUDA backend unavailable" in status
        with pytest.raises(ImportError, match="CUDA backend unavailable"):
            import sparsekern.cuda_backend  # noqa: F401
        with pytest.raises(RuntimeError, match="unavailable"):
            sk.set_backend("cuda")


# --------------------------------------------------------------------------- on a GPU
try:
    import sparsekern.cuda_backend  # noqa: F401
    _CUDA_STATUS = "ok"
except ImportError as _e:
    _CUDA_STATUS = f"ImportError: {_e}"
needs_cuda_kernels = pytest.mark.skipif(_CUDA_STATUS != "ok",
                                        reason=f"CUDA kernels cannot run here: {_CUDA_STATUS}")


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("layout", ["dense", "bsr"])
@pytest.mark.parametrize("case", SPMM_CASES, ids=SPMM_IDS)
def test_gpu_spmm_ops_match_reference(case, layout, dtype):
    B, M, K, br, bc, _ = case
    x, dy, w, mask, topo = _spmm_problem(case, layout)
    x, dy, w = x.to(dtype), dy.to(dtype), w.to(dtype)
    t = topo.tensors
    xc, dyc, wc, mc = x.cuda(), dy.cuda(), w.cuda(), mask.cuda()
    tc = [v.cuda() for v in t]
    ops = torch.ops.sparsekern
    assert torch.equal(ops._bsr_mm(xc, wc, mc, tc, br, bc).cpu(), ref.bsr_mm(x, w, mask, t, br, bc))
    assert torch.equal(ops._bsr_mm_t(dyc, wc, mc, tc, br, bc).cpu(),
                       ref.bsr_mm_t(dy, w, mask, t, br, bc))
    assert torch.equal(ops._sddmm(dyc, xc, mc, tc, br, bc).cpu(), ref.sddmm(dy, x, mask, t, br, bc))


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GROW_CASES, ids=GROW_IDS)
def test_gpu_grow_topk_matches_reference(case, dtype):
    br, bc = case[3], case[4]
    dy, x, exclude, counter, k = _grow_problem(case)
    want_idx, want_s = ref.grow_topk(dy.to(dtype).float(), x.to(dtype).float(), exclude, k,
                                     counter, BONUS, EPS, br, bc)
    dyc, xc, exc = dy.to(dtype).cuda(), x.to(dtype).cuda(), exclude.cuda()
    got_idx, got_s = torch.ops.sparsekern._grow_topk(
        dyc, xc, exc, k, None if counter is None else counter.cuda(), BONUS, EPS, br, bc)
    assert torch.equal(got_idx.cpu(), want_idx)
    torch.testing.assert_close(got_s.cpu(), want_s, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="exceeds"):
        torch.ops.sparsekern._grow_topk(dyc, xc, exc, int((~exclude).sum()) + 1, None, 0.0, 1.0,
                                        br, bc)


@needs_cuda_kernels
def test_gpu_public_ops_use_cuda_backend():
    case = (6, 70, 45, 8, 8, 0.5)
    x, _, w, mask, topo = _spmm_problem(case, "dense")
    xc, wc, mc, tc = x.cuda(), w.cuda(), mask.cuda(), [v.cuda() for v in topo.tensors]
    from sparsekern import ops
    with sk.backend("cuda"):
        assert ops.resolve_backend(xc.device) == "cuda"
        got = ops.bsr_mm(xc, wc, mc, tc, 8, 8)
    assert torch.equal(got.cpu(), ref.bsr_mm(x, w, mask, topo.tensors, 8, 8))
