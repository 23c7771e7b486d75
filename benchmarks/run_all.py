"""Run the benchmark suite and regenerate the README's performance table and plot.

    python benchmarks/run_all.py [--quick] [--skip-run]

Runs ``bench_cpu.py`` (and ``bench_triton.py`` when a CUDA GPU is present), then rewrites the
block between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->`` in README.md from
``benchmarks/results/bench_cpu.json`` and draws ``benchmarks/results/bench_cpu.png``. Then
runs ``bench_models.py`` (whole training steps; ``--no-models`` skips it) and rewrites the
``<!-- models-table:start -->`` ... ``<!-- models-table:end -->`` block from
``benchmarks/results/bench_models.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def _x(v):
    return "-" if v is None else f"{v:.2f}×"


def _ms(v):
    return "-" if v is None else f"{v:.2f}"


def _pair(d: dict, key: str, f=_x) -> str:
    """Dense-layout and bsr-layout figures as ``a / b``."""
    a, b = d.get(key), d.get(key + "_bsr")
    return f(a) if b is None else f"{f(a)} / {f(b)}"


def _name(r: dict) -> str:
    name = r.get("name") or r["case"]["name"]
    if r.get("dense_dtype") and r["dense_dtype"] != r["case"].get("dtype", "float32"):
        name += f" (dense baseline in {r['dense_dtype']}: no native {r['case']['dtype']})"
    return name


def perf_table(payload: dict) -> str:
    """Markdown table (and machine line) from a ``bench_cpu.py`` JSON payload."""
    m = payload["machine"]
    lines = [f"Machine: {m.get('cpu', '?')}, {m.get('threads', '?')} threads, torch "
             f"{m.get('torch', '?')}; command `{payload.get('command', 'bench_cpu.py')}`; medians "
             "in ms; ratios are dense time / sparsekern time in the same process run, for "
             "sparsekern's two weight layouts as *dense layout / bsr layout*.", "",
             "| case | dense fwd | torch.sparse fwd | sparsekern fwd (dense / bsr layout) "
             "| fwd × dense | fwd × torch.sparse | bwd × dense | dense step | sparsekern step "
             "| step × dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload.get("linear", []) + payload.get("conv", []):
        f, st = r["forward_ms"], r["step_ms"]
        lines.append(f"| {_name(r)} | {_ms(f.get('dense'))} | {_ms(f.get('torch.sparse'))} | "
                     f"{_pair(f, 'sparsekern', _ms)} | {_pair(r, 'forward_speedup_vs_dense')} | "
                     f"{_pair(r, 'forward_speedup_vs_torch_sparse')} | "
                     f"{_pair(r, 'backward_speedup_vs_dense')} | {_ms(st.get('dense'))} | "
                     f"{_pair(st, 'sparsekern', _ms)} | {_pair(r, 'step_speedup_vs_dense')} |")
    g = payload.get("grow_topk")
    if g:
        lines += ["", f"Growth top-k ({_name(g)}): dense `dy.T @ x` + "
                  f"`torch.topk` {_ms(g['time_ms'].get('dense'))} ms, sparsekern "
                  f"{_ms(g['time_ms'].get('sparsekern'))} ms ({_x(g.get('speedup_vs_dense'))})."]
        for name, mem in (g.get("peak_extra_bytes") or {}).items():
            if isinstance(mem, dict) and "extra_bytes" in mem:
                lines.append(f"Peak extra memory, {name}: {mem['extra_bytes'] / 2**20:.1f} MiB "
                             f"({mem['extra_bytes'] / g['dense_gradient_bytes']:.1%} of the dense "
                             "gradient).")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload.get("linear", []) + payload.get("conv", [])
    names = [_name(r) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    y = range(len(rows))
    best = lambda r, k: max(r.get(k) or 0, r.get(k + "_bsr") or 0)  # noqa: E731
    ax.barh([i + 0.2 for i in y], [best(r, "forward_speedup_vs_dense") for r in rows], 0.4,
            label="forward")
    ax.barh([i - 0.2 for i in y], [best(r, "step_speedup_vs_dense") for r in rows], 0.4,
            label="training step")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(y), names, fontsize=7)
    ax.set_xlabel("speed-up over dense PyTorch (same run; the faster weight layout)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_readme(table: str, readme: Path = ROOT / "README.md", start: str = START,
                  end: str = END) -> bool:
    text = readme.read_text()
    if start not in text or end not in text:
        print(f"README has no {start} ... {end} block; table not written", file=sys.stderr)
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    return True


def run_models(quick: bool, skip_run: bool) -> None:
    """Run ``bench_models.py`` (unless ``skip_run``) and write its table into the README."""
    out = RESULTS / "bench_models.json"
    if not skip_run:
        cmd = [sys.executable, str(HERE / "bench_models.py"), "--out", str(out)]
        subprocess.run(cmd + (["--quick"] if quick else []), check=True)
    if not out.exists():
        print(f"{out} does not exist: models table not written", file=sys.stderr)
        return
    sys.path.insert(0, str(HERE))
    from bench_models import markdown_table

    table = markdown_table(json.loads(out.read_text()))
    print(table)
    update_readme(table, start="<!-- models-table:start -->", end="<!-- models-table:end -->")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-run", action="store_true", help="only regenerate from saved JSON")
    p.add_argument("--no-models", action="store_true",
                   help="skip bench_models.py (whole training steps, ~12 minutes)")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_cpu.json"
    if not args.skip_run:
        cmd = [sys.executable, str(HERE / "bench_cpu.py"), "--out", str(out)]
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
        import torch

        if torch.cuda.is_available():
            subprocess.run([sys.executable, str(HERE / "bench_triton.py"), "--json",
                            str(RESULTS / "bench_triton.json")], check=True)
        else:
            print("no CUDA GPU: Triton benchmark not run")
    payload = json.loads(out.read_text())
    table = perf_table(payload)
    print(table)
    plot(payload, RESULTS / "bench_cpu.png")
    update_readme(table)
    if not args.no_models:
        run_models(args.quick, args.skip_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
