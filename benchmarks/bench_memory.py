"""Memory ∝ density: build and train (RigL, a mask update every step) a stack of
``SparseLinear(N, N, layout="bsr")`` layers whose dense form does not fit in memory.

Each configuration runs in a fresh process (``ru_maxrss`` is a per-process peak). Reports the
peak resident memory of the whole process (Python + torch included), what dense fp32 training
would hold (weights + gradients + SGD momentum), what the sparse layers hold, and the time to
build the model and per training step (forward, backward with RigL's growth request, mask
update, optimizer step).

    python3 benchmarks/bench_memory.py            # the small configuration (under a minute)
    python3 benchmarks/bench_memory.py --big      # 4 x 32768² (dense: 48 GiB), minutes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

GIB = 2 ** 30
OUT = Path(__file__).resolve().parent / "results" / "bench_memory.json"


@dataclass(frozen=True)
class Config:
    name: str
    n: int  # SparseLinear(n, n)
    layers: int
    block: int = 32
    sparsity: float = 0.95
    batch: int = 8
    steps: int = 3  # training steps; every one updates the masks (delta_t=1)


CONFIGS = {
    "small": Config("small", 4096, 4),
    "big": Config("big", 32768, 4),  # dense fp32 weights + grads + momentum: 48 GiB
}


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(cfg: Config, threads: int) -> dict:
    import sparsekern as sk
    from sparsekern import dst

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = peak_rss()
    t0 = time.perf_counter()
    mods = []
    for i in range(cfg.layers):
        mods.append(sk.SparseLinear(cfg.n, cfg.n, bias=False, sparsity=cfg.sparsity,
                                    block_size=cfg.block, layout="bsr"))
        if i + 1 < cfg.layers:
            mods.append(nn.ReLU())
    model = nn.Sequential(*mods)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method = dst.RigL(model, opt, total_steps=cfg.steps + 1, delta_t=1, t_end=1.0, seed=0)
    build_s = time.perf_counter() - t0
    after_build = peak_rss()
    mk = cfg.n * cfg.n
    largest = max(t.numel() for t in [*model.parameters(), *model.buffers()])
    assert largest < mk, f"a tensor of {largest} >= M·K entries"
    x = torch.randn(cfg.batch, cfg.n)
    step_s, updated = [], []
    for _ in range(cfg.steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        updated.append(method.step())
        step_s.append(time.perf_counter() - t)
    stats = method.stats()
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    dense = cfg.layers * mk * 4
    return {
        "config": dataclasses.asdict(cfg),
        "threads": threads,
        "peak_rss_bytes": peak_rss(),
        "rss_before_build_bytes": base,
        "peak_rss_after_build_bytes": after_build,
        "dense_weights_grads_momentum_bytes": 3 * dense,
        "sparse_weights_grads_momentum_bytes": 3 * stored,
        "build_s": build_s,
        "step_s": step_s,
        "mask_updates": sum(updated),
        "n_grown": stats["n_grown"],
        "density": stats["density"],
    }


def child(name: str, threads: int) -> dict:
    """Run one configuration in a fresh process and return its result."""
    out = subprocess.run([sys.executable, __file__, "--run", name, "--threads", str(threads)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"bench_memory {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    head = (f"{'config':<7} {'layers x N':>12} {'dense W+G+mom':>14} {'sparse W+G+mom':>15} "
            f"{'peak RSS':>9} {'build':>7} {'step (update)':>14} {'updates':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        c = r["config"]
        steps = r["step_s"]
        rows.append(
            f"{c['name']:<7} {c['layers']:>3} x {c['n']:>6} "
            f"{r['dense_weights_grads_momentum_bytes'] / GIB:>10.2f} GiB "
            f"{r['sparse_weights_grads_momentum_bytes'] / GIB:>11.2f} GiB "
            f"{r['peak_rss_bytes'] / GIB:>5.2f} GiB {r['build_s']:>6.1f}s "
            f"{sorted(steps)[len(steps) // 2]:>13.2f}s {r['mask_updates']:>8}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="also run the 48 GiB-dense configuration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run(CONFIGS[args.run], args.threads)))
        return
    names = ["small", "big"] if args.big else ["small"]
    results = [child(n, args.threads) for n in names]
    print(table(results))
    prior = json.loads(OUT.read_text()) if OUT.exists() else {}
    runs = {r["config"]["name"]: r for r in prior.get("runs", [])}
    runs.update({r["config"]["name"]: r for r in results})
    path = write_json(OUT, {"machine": machine_info(args.threads),
                            "runs": [runs[k] for k in sorted(runs)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
