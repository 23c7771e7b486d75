"""Every Triton kernel, at every config it can launch with, compiles ahead of time for sm_80 and
sm_90 — no GPU needed — so code that only the interpreter accepts fails here.

Runs ``benchmarks/gpu_static_report.py --check`` in a subprocess: ``@triton.jit`` builds
interpreter objects when ``TRITON_INTERPRET=1`` is set at import, and the test session sets it.
"""
import importlib.util
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
    assert report.exists()
