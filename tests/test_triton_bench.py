"""The GPU benchmark script's code paths on tiny shapes under the interpreter (timings are
meaningless here; the point is that the script runs and reports every provider)."""
import sys
from pathlib import Path

import torch

from _triton_cases import DEVICE, kernels  # noqa: F401  (skips without the triton backend)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_triton as bt  # noqa: E402


def test_bench_script_runs_every_provider_on_tiny_shapes(capsys):
    gen = torch.Generator().manual_seed(0)
    rows = bt.run_linear(bt.LinearShape("tiny", "fc", 13, 45, 40), 16, 0.5, torch.float32, gen,
                         dev=DEVICE)
    rows += bt.run_conv(bt.ConvShape("tiny", "conv", 1, 4, 16, 6, 3, 1, 1), 16, 0.5,
                        torch.float32, gen, dev=DEVICE)
    bt.finish(rows)
    bt.print_table(rows)
    ours = [r for r in rows if r["provider"].startswith("sparsekern")]
    assert ours and all(r["ms"] is not None for r in ours), [r["note"] for r in ours]
    assert {r["op"] for r in rows} >= {"forward", "grad_input", "weight_grad", "growth top-1%",
                                       "conv forward", "conv grad_input", "conv weight_grad"}
    assert "sparsekern grow_topk" in capsys.readouterr().out
    assert bt.main(["--list"]) == 0
