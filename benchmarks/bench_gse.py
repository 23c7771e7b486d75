"""Cost of GSE's update step against a plain training step and against RigL's update step.

One sparse layer (a seeded random mask, the same for every method) trained with SGD (momentum
0.9) on an MSE loss: a 2048x2048 ``Linear`` (batch 256) and a 3x3 ``Conv2d`` 128->128 on 16x16
inputs (batch 32), both at 95% sparsity, ``delta_t = 4``, ``alpha = 0.3``. The methods run
interleaved in one process; every round times, per method, one update cycle of four steps
(forward + backward + ``m.step()`` + ``zero_grad``): the step after an update (a new mask may
cost the next forward/backward), a plain step, the step before an update (where RigL arms its
growth request: the drop's top-k over ``|W|``) and the update step. The update step is charged
``post + pre + update − 2·plain`` (everything an update adds to a plain step), reported against
the plain step and against RigL's. Ratios are medians of per-round ratios, so machine load hits
both sides alike; wall-clock figures are indicative.

    python benchmarks/bench_gse.py                     # both layers, 1 thread
    python benchmarks/bench_gse.py --cases linear --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

from sparsekern import dst  # noqa: E402
from sparsekern.nn import SparseConv2d, SparseLinear  # noqa: E402

ROOT = Path(__file__).resolve().parent

#: name -> (layer factory, input shape)
CASES = {
    "linear": (lambda s: SparseLinear(2048, 2048, sparsity=s), (256, 2048)),
    "conv": (lambda s: SparseConv2d(128, 128, 3, padding=1, sparsity=s), (32, 128, 16, 16)),
}
METHODS = {
    "gse-uniform": (dst.GSE, {"sampler": "uniform"}),
    "gse-grabo": (dst.GSE, {"sampler": "grabo"}),
    "gse-graest": (dst.GSE, {"sampler": "graest"}),
    "rigl": (dst.RigL, {}),
}


class Runner:
    """One method on its own copy of the layer; :meth:`pair` times a plain and an update step."""

    def __init__(self, cls, kw, factory, in_shape, sparsity, seed=0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(factory(sparsity))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.method = cls(self.model, self.opt, total_steps=10**6, delta_t=4, alpha=0.3,
                          t_end=1.0, **kw)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(in_shape, generator=g)
        with torch.no_grad():
            self.y = torch.randn(self.model(self.x).shape, generator=g)

    def _count(self) -> int:
        return self.method.stats()["step"]

    def one(self) -> tuple[float, bool]:
        t0 = time.perf_counter()
        F.mse_loss(self.model(self.x), self.y).backward()
        due = self.method.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, due

    def cycle(self) -> tuple[float, float]:
        """``(plain, update)`` seconds over one ``delta_t = 4`` cycle: the step after an update
        (what a mask change costs the next forward/backward), a plain step, the step before
        an update (RigL arms its growth request there: the drop's top-k over ``|W|``) and the
        update step. The update step is charged ``post + pre + update − 2·plain``."""
        while self.method.n_updates == 0 or not self.method.is_update_step(self._count()):
            self.one()
        post, d0 = self.one()
        plain, d1 = self.one()
        pre, d2 = self.one()
        upd, d3 = self.one()
        if d0 or d1 or d2 or not d3:
            raise RuntimeError("bench_gse: lost the update phase")
        return plain, post + pre + upd - 2 * plain


def run_case(name: str, rounds: int, warmup: int, sparsity: float, methods) -> dict:
    factory, in_shape = CASES[name]
    runners = {m: Runner(*METHODS[m], factory, in_shape, sparsity) for m in methods}
    times = {m: ([], []) for m in methods}
    for r in range(warmup + rounds):
        for m, run in runners.items():
            p, u = run.cycle()
            if r >= warmup:
                times[m][0].append(p)
                times[m][1].append(u)
    out = {}
    for m, (plain, upd) in times.items():
        out[m] = {"plain_ms": 1e3 * statistics.median(plain),
                  "update_ms": 1e3 * statistics.median(upd),
                  "update_over_plain": statistics.median(u / p for p, u in zip(plain, upd))}
    if "rigl" in times:
        rigl_upd = times["rigl"][1]
        for m, (_, upd) in times.items():
            out[m]["update_over_rigl_update"] = statistics.median(
                u / r for u, r in zip(upd, rigl_upd))
    lay = runners[methods[0]].model[0]
    out["_layer"] = {"weight": list(lay.weight.shape), "input": list(in_shape),
                     "sparsity": sparsity, "active": int(lay.mask.sum())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_gse.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for case in args.cases:
        res = run_case(case, args.rounds, args.warmup, args.sparsity, args.methods)
        results[case] = res
        print(f"{case} {res['_layer']}")
        for m in args.methods:
            r = res[m]
            vs = r.get("update_over_rigl_update")
            print(f"  {m:<12} plain {r['plain_ms']:8.2f} ms  update {r['update_ms']:8.2f} ms  "
                  f"update/plain {r['update_over_plain']:.2f}"
                  + (f"  update/RigL update {vs:.2f}" if vs is not None else ""), flush=True)
    payload = {"config": vars(args), "machine": {"cpu": cpu_model(),
                                                 "threads": torch.get_num_threads()},
               "torch": torch.__version__, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
