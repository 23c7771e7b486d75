"""Method comparison on the demo task: every DST method (and dense) at several sparsities and
seeds, mean ± std of the final test accuracy, as a markdown table and JSON.

    python benchmarks/compare_methods.py --epochs 10 --seeds 0 1 2 --sparsities 0.9 0.95
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sparsekern import train
from sparsekern.data import load_dataset

METHODS = [m for m in train.METHODS if m != "dense"]


def run(args) -> dict:
    data = {}
    for seed in args.seeds:
        split = load_dataset("digits", seed=seed)
        cells = [("dense", 0.0)] + [(m, s) for s in args.sparsities for m in args.methods]
        for method, sparsity in cells:
            targs = train.parse_args(["--method", method, "--sparsity", str(sparsity),
                                      "--epochs", str(args.epochs), "--seed", str(seed),
                                      "--width", str(args.width), "--delta-t", str(args.delta_t),
                                      "--backend", args.backend, "--quiet", "--no-plots"])
            t0 = time.perf_counter()
            hist = train.train_run(method, targs, *split, log=lambda *_: None)
            key = f"{method}@{sparsity}"
            data.setdefault(key, []).append(hist["test_acc"])
            print(f"seed {seed} {key:<14} acc {hist['test_acc']:6.2f}%  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return data


def table(data: dict, sparsities, methods) -> str:
    def cell(key):
        accs = data.get(key)
        if not accs:
            return "-"
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{statistics.mean(accs):.2f} ± {sd:.2f}"

    head = "| method | " + " | ".join(f"{s:.0%} sparsity" for s in sparsities) + " |"
    lines = [head, "|---" * (len(sparsities) + 1) + "|",
             f"| dense | " + " | ".join(cell("dense@0.0") for _ in sparsities) + " |"]
    lines += [f"| {m} | " + " | ".join(cell(f"{m}@{s}") for s in sparsities) + " |"
              for m in methods]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--delta-t", type=int, default=20)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default="benchmarks/results/compare_methods.json")
    args = p.parse_args(argv)
    data = run(args)
    md = table(data, args.sparsities, args.methods)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "test_acc": data, "table": md}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
