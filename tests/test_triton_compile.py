"""Every Triton kernel, at every config it can launch with, compiles ahead of time for sm_80 and
sm_90 — no GPU needed — so code that only the interpreter accepts fails here; and every
fp16/bf16 GEMM-like kernel's compiled code uses tensor cores (mma/wgmma in the PTX, HMMA/HGMMA
in the SASS).

Runs ``benchmarks/gpu_static_report.py --check`` in a subprocess: ``@triton.jit`` builds
interpreter objects when ``TRITON_INTERPRET=1`` is set at import, and the test session sets it.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_static_report.py"


def _nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return ptxas.exists()


@pytest.mark.skipif(not _nvidia_backend(), reason="triton's NVIDIA backend (ptxas) is missing")
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    report = tmp_path / "static.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", "--json", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert "0 failed" in proc.stdout, tail
    assert "without tensor-core instructions: 0" in proc.stdout, tail
    rows = json.loads(report.read_text())["rows"]
    disassembled = set()
    for r in rows:
        if r["dtype"] in ("fp16", "bf16"):
            assert r["has_dot"] and r["ptx_tc"], r
            want = "wgmma" if r["arch"] == "sm_90" and any(k.startswith("wgmma")
                                                         for k in r["ptx_tc"]) else "mma"
            assert any(k.startswith(want) for k in r["ptx_tc"]), r
        if r["sass_tc"] is not None:
            disassembled.add((r["kernel"], r["dtype"], r["arch"]))
            if r["dtype"] in ("fp16", "bf16"):
                assert r["sass_tc"].get("HMMA", 0) + r["sass_tc"].get("HGMMA", 0) > 0, r
    assert disassembled == {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    assert any(r["sass_tc"] and "HGMMA" in r["sass_tc"] for r in rows), "no wgmma kernel on sm_90"


def test_tensor_core_rule_flags_planted_rows():
    """The --check rule on hand-made rows: a GEMM-like fp16/bf16 compile without mma in its PTX
    or HMMA/HGMMA in its SASS fails, and so does a GEMM kernel without a tt.dot; fp32 and
    dot-free kernels are not required to use tensor cores."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_static_report as g
    assert os.environ.get("TRITON_INTERPRET") == "1"  # importing it did not re-execute pytest
    ptx = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};\n"
           "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%f3}, %rd1, %rd2, p, 1, 1;\n"
           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};")
    assert g.ptx_tensor_ops(ptx) == {"mma.m16n8k16.bf16": 1, "wgmma.m64n32k16.f16": 1,
                                     "mma.m16n8k8.tf32": 1}
    assert g.ptx_tensor_ops("fma.rn.f32 %f1, %f2, %f3, %f4;") == {}
    assert g.sass_tensor_ops("HMMA.16816.F32 R4, R8, R12, R4 ;\nHGMMA.64x32x16.F32 R24\n"
                             "FFMA R1, R2, R3, R4 ;") == {"HMMA": 1, "HGMMA": 1}
    good = dict(ok=True, kernel="_spmm_kernel", variant="fp16 32x32", config="c", arch="sm_90",
                dtype="fp16", has_dot=True, ptx_tc={"mma.m16n8k16.f16": 1},
                sass_tc={"HMMA": 2})
    assert g.tensor_core_problems([good]) == []
    planted = [dict(good, ptx_tc={}), dict(good, dtype="bf16", sass_tc={}),
               dict(good, has_dot=False)]
    found = [g.tensor_core_problems([r]) for r in planted]
    assert [len(f) for f in found] == [1, 1, 1]
    assert "no mma/wgmma in its PTX" in found[0][0] and "no HMMA/HGMMA" in found[1][0]
    assert "no tt.dot" in found[2][0]
    fine = [dict(good, dtype="fp32", ptx_tc={}, sass_tc={}),
            dict(good, kernel="_other", has_dot=False, ptx_tc={}, sass_tc={}),
            dict(good, sass_tc=None), dict(ok=False, kernel="_spmm_kernel")]
    assert g.tensor_core_problems(fine) == []
