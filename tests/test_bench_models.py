"""Smoke tests of ``benchmarks/bench_models.py``: its quick mode runs on tiny shapes and writes
JSON with every column; the variant parser rejects bad specs; the peak-memory probe sees an
allocation of known size; bf16 rows (and ``bench_cpu.py``'s bf16 case) fall back to a dense
fp32 baseline on a CPU without native bf16."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cpu  # noqa: E402
import bench_models as bm  # noqa: E402
import common  # noqa: E402


def test_quick_run_writes_every_column(tmp_path, capsys):
    out = tmp_path / "bench_models.json"
    variants = "uniform:0.9:16:bsr,rigl:uniform:0.9:1:dense,dense:bf16"
    assert bm.main(["--quick", "--models", "mlp", "--variants", variants, "--threads", "1",
                    "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["columns"] == list(bm.ROW_COLUMNS)
    m = payload["machine"]
    for key in ("cpu", "threads", "torch", "cpp_kernels"):
        assert m[key] is not None, key
    assert m["threads"] == 1
    assert m["cpp_kernels"]["isa"] in ("avx512", "avx2", "generic")
    rows = {r["variant"]: r for r in payload["rows"]}
    has_peak = bm.peak_bytes_of(lambda: None) is not None  # /proc/self/clear_refs exists
    # the baselines the rows need are added: fp32 dense, the plain step of the RigL row
    assert set(rows) == {"dense", "uniform 90% 16x16 bsr", "rigl: uniform 90% unstructured dense",
                         "uniform 90% unstructured dense", "dense bf16"}
    for r in payload["rows"]:
        assert set(r) == set(bm.ROW_COLUMNS), r["variant"]
        assert r["step_ms"] > 0 and len(r["step_ms_rounds"]) == 1
        assert r["state_mib"] > 0 and (r["peak_step_mib"] is not None) == has_peak
    assert rows["dense"]["speedup_vs_dense"] == 1.0
    assert rows["dense bf16"]["dtype"] == "bfloat16"
    rigl = rows["rigl: uniform 90% unstructured dense"]
    plain = rows["uniform 90% unstructured dense"]
    assert rigl["ratio_to_sparse_step"] == pytest.approx(rigl["step_ms"] / plain["step_ms"])
    assert plain["ratio_to_sparse_step"] is None
    assert 0.05 < rows["uniform 90% 16x16 bsr"]["density"] < 0.2
    assert "uniform 90% 16x16 bsr" in capsys.readouterr().out
    md = bm.markdown_table(payload)
    assert md.count("\n| mlp |") == len(payload["rows"]) and "C++ kernels" in md


@pytest.mark.parametrize("spec, expect", [
    ("dense", bm.Variant("dense")),
    ("dense:bf16", bm.Variant("dense", dtype="bfloat16")),
    ("erk:0.95:32:bsr:bf16", bm.Variant("step", "erk", 0.95, 32, "bsr", "bfloat16")),
    ("rigl:uniform:0.9:1:dense", bm.Variant("rigl", "uniform", 0.9, 1, "dense")),
])
def test_parse_variant(spec, expect):
    assert bm.parse_variant(spec) == expect
    assert bm.parse_variant(bm.spec_of(expect)) == expect


@pytest.mark.parametrize("spec, match", [
    ("uniform:0.9:16", "expected"), ("gauss:0.9:16:bsr", "distribution"),
    ("uniform:0.9:16:csr", "layout"), ("uniform:1.0:16:bsr", r"\[0, 1\)"),
    ("uniform:x:16:bsr", "float"),
])
def test_parse_variant_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        bm.parse_variant(spec)


def test_cli_rejects_unknown_model():
    with pytest.raises(SystemExit):
        bm.parse_args(["--models", "resnet50"])


def test_peak_bytes_sees_an_allocation():
    if bm.peak_bytes_of(lambda: None) is None:
        pytest.skip("no /proc/self/clear_refs: the peak-memory probe is off on this system")
    n = 64 * 2 ** 20
    peak = bm.peak_bytes_of(lambda: torch.ones(n // 4).sum())
    assert peak >= 0.9 * n


@pytest.mark.parametrize("native", [False, True])
def test_bf16_baseline_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(common, "native_bf16", lambda: native)
    v = bm.parse_variant("uniform:0.9:16:bsr:bf16")
    base = bm.baseline_of(v, dense_bf16=False)
    assert base == bm.Variant("dense", dtype="bfloat16" if native else "float32")
    assert bm.baseline_of(v, dense_bf16=True).dtype == "bfloat16"
    assert bm.with_baselines([v]) == [bm.Variant("dense")] + ([base] if native else []) + [v]


@pytest.mark.parametrize("native", [False, True])
def test_bench_cpu_bf16_dense_baseline(monkeypatch, native):
    """Without native bf16 the dense bf16 GEMM (seconds per call at 4096²) is skipped, said so,
    and the case is compared with dense fp32."""
    monkeypatch.setattr(common, "native_bf16", lambda: native)
    case = bench_cpu.LinearCase("tiny bf16", 48, 64, 8, (16, 16), 0.5, "bfloat16")
    r = bench_cpu.bench_linear(case, 1, 1, 0.001, budget_s=5.0)
    assert r["dense_dtype"] == ("bfloat16" if native else "float32")
    assert bool(r["skipped"]) is not native
    assert r["forward_ms"]["dense"] > 0 and r["step_speedup_vs_dense_bsr"] > 0
