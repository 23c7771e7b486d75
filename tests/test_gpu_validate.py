"""``benchmarks/gpu_validate.py`` without a GPU: its case lists, its comparison, its refusal of
interpreted kernels, its no-GPU exit, and its whole pipeline (workers, report, exit status) in
self-test mode with a planted wrong answer, so a GPU run cannot pass vacuously."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_validate.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_validate as gv  # noqa: E402


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_case_lists_cover_every_op_and_dtype():
    cases = gv.cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    have = {(c.backend, c.op, c.dtype) for c in cases}
    first = {(c.backend, c.op, c.dtype) for c in cases if c.tier == 0}
    want = {("triton", op, dt) for op in gv.TRITON_OPS for dt in ("fp16", "bf16", "fp32")}
    want |= {("cuda", op, dt) for op in gv.CUDA_OPS for dt in ("fp16", "bf16", "fp32")}
    want |= {("cuda", op, "fp64") for op in ("bsr_mm", "bsr_mm_t", "sddmm")}
    assert want <= have and want <= first, sorted(want - first)
    assert set(gv.TRITON_OPS) == {"bsr_mm", "bsr_mm_t", "sddmm", "grow_topk",
                                  "fused_weight_grad", "conv2d", "conv2d_grad_input",
                                  "conv2d_sddmm", "conv2d_grow_topk", "conv2d_fused_weight_grad"}
    tiers = [c.tier for c in cases]
    assert tiers == sorted(tiers), "tier-0 cases must run first"
    shards = gv.shard(cases, 7)
    assert sorted(i for s in shards for i in s) == list(range(len(cases)))
    owner = {(cases[i].backend, cases[i].op, cases[i].dtype): n
             for n, s in enumerate(shards) for i in s}
    assert all(owner[(cases[i].backend, cases[i].op, cases[i].dtype)] == n
               for n, s in enumerate(shards) for i in s), "a kernel group split over shards"
    bench = gv.bench_cases()
    assert {(bs, dt) for _, bs, _, dt in bench} == {(bs, dt) for bs in (16, 32, 64)
                                                    for dt in ("fp16", "bf16")}
    sps = {sp for _, _, sp, _ in bench}
    assert min(sps) == 0.5 and max(sps) == 0.98


def test_cases_run_on_the_interpreted_triton_launchers():
    """One case per Triton op (dtypes in turn) through the real launchers under the
    interpreter: the built arguments fit them and the results match the reference."""
    from sparsekern import kernels
    cases = gv.cases()
    sample = [next(c for c in cases if c.backend == "triton" and c.op == op and c.tier == 0
                   and c.dtype == gv.DTYPES[i % 3]) for i, op in enumerate(gv.TRITON_OPS)]
    for c in sample:
        row = gv.run_case(c, kernels.IMPLS, "cpu")
        assert row["status"] == "pass", row


def test_compare_reports_every_kind_of_difference():
    a = torch.tensor([1.0, float("nan"), -0.0, 3.0])
    assert gv.compare(a.clone(), a) == []
    assert gv.compare((a.clone(), torch.tensor([4, 2])), (a, torch.tensor([4, 2]))) == []
    b = a.clone()
    b[3] = 3.0000002
    assert "1/4 entries differ" in gv.compare(b, a)[0]
    b = a.clone()
    b[1] = 0.0
    assert gv.compare(b, a)
    assert "entries differ" in gv.compare((a, torch.tensor([2, 4])),
                                          (a, torch.tensor([4, 2])))[0]
    assert "expected torch.float32" in gv.compare(a.half(), a)[0]
    assert "2 outputs, expected 1" in gv.compare((a, a), a)[0]
    assert "expected cuda" in gv.compare(a, a, "cuda")[0]


def test_run_case_flags_a_wrong_implementation():
    from sparsekern import reference as ref
    case = next(c for c in gv.cases() if c.op == "grow_topk" and c.tier == 0)

    def swapped(*args):
        idx, scores = ref.grow_topk(*args)
        return idx.flip(0), scores.flip(0)

    assert gv.run_case(case, {"grow_topk": ref.grow_topk}, "cpu")["status"] == "pass"
    row = gv.run_case(case, {"grow_topk": swapped}, "cpu")
    assert row["status"] == "mismatch" and "entries differ" in row["detail"]
    row = gv.run_case(case, {"grow_topk": lambda *a: 1 / 0}, "cpu")
    assert row["status"] == "error" and "ZeroDivisionError" in row["detail"]


def test_module_and_rigl_checks_are_exact_by_construction():
    """The modules part on a backend that sums in another order than the reference (the C++
    one): every check passes bit for bit, the RigL run makes 3 mask updates that move masks;
    past the budget the checks are reported as skipped."""
    import sparsekern as sk
    if sk.available_backends()["cpp"] != "ok":
        pytest.skip(f"cpp backend: {sk.available_backends()['cpp']}")
    rows = gv.module_checks("cpu", ["cpp"], ("fp32",), compile_check=False)
    assert [r["status"] for r in rows] == ["pass"] * 4, rows
    assert "RigL" in rows[-1]["id"]
    late = gv.module_checks("cpu", ["cpp"], ("fp32",), deadline=0.0, compile_check=False)
    assert {r["status"] for r in late} == {"skipped"}


def test_worker_refuses_interpreted_kernels(tmp_path):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert gv._interpreted_kernels()
    assert gv._worker("kernels", 0, 1, 0.0, str(tmp_path / "w.jsonl")) == 2
    assert not (tmp_path / "w.jsonl").exists()


def test_without_a_gpu_it_says_so_and_exits_zero(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU here" in proc.stdout and "nothing validated" in proc.stdout
    assert "TRITON_INTERPRET=1 was set; unset" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_pipeline_fails_on_a_planted_mismatch(tmp_path):
    """The self test runs the real pipeline (workers, collection, report, exit status) with the
    reference standing in for both backends; one op answering wrong fails the run and is the
    only failure reported."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--selftest", "--plant", "grow_topk",
                           "--parts", "kernels", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    report = json.loads((tmp_path / "validate.json").read_text())
    bad = [r for r in report["rows"] if r["status"] != "pass"]
    assert {(r["backend"], r["op"], r["status"]) for r in bad} == {
        ("triton", "grow_topk", "mismatch"), ("cuda", "grow_topk", "mismatch")}, bad
    assert len(bad) == 6 and report["counts"]["pass"] > 40
    assert "FAIL triton:grow_topk:fp16" in proc.stdout
    md = (tmp_path / "validate.md").read_text()
    assert "| kernels | triton | grow_topk | fp32 | 0 | 1 | 0 | 0 |" in md
    assert "## Failures" in md


def test_markdown_has_the_benchmark_table():
    rows = [dict(part="bench", id="x", status="pass", rows=[dict(
        model="ViT-B/16", layer="mlp.fc1", op="forward", dtype="fp16", block=32, sparsity=0.9,
        provider="sparsekern bsr-layout", ms=0.0123, x_dense=3.1, peak_extra_mb=None)])]
    md = gv.markdown({"gpu": "test"}, rows, ["bench: something"])
    assert "| ViT-B/16 mlp.fc1 | forward | fp16 | 32 | 0.9 | sparsekern bsr-layout | 0.0123 | "\
           "3.1 |  |" in md
    assert "- bench: something" in md
