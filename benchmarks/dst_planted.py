"""Planted-topology benchmark (ALGORITHMS.md): a sparse teacher MLP with a planted random mask
at the target density; a student of the same architecture and density, from a different random
mask, is trained by each DST method on the teacher's outputs (Gaussian inputs, MSE). Reports
test loss, argmax agreement with the teacher, recovery ``|M ∧ M*| / |M*|`` of the planted mask,
exploration degree, and wall time per training step and per update step; mean ± std over seeds.

    python benchmarks/dst_planted.py                       # the full grid (< 10 min, 2 cores)
    python benchmarks/dst_planted.py --methods rigl dst-ee:c=0.5 bidst:phi=eq9 --seeds 0

A method is a name of ``METHODS`` with optional ``:key=value,...`` overrides of its arguments.
MLP only: a CNN teacher does not fit the 10-minute budget on a 2-core machine.
"""
from __future__ import annotations

import argparse
import ast
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
from sparsekern.nn.base import random_mask  # noqa: E402

ROOT = Path(__file__).resolve().parent

#: name -> (class, arguments beyond the shared schedule)
METHODS = {
    "static": (dst.Static, {}),
    "set": (dst.SET, {}),
    "rigl": (dst.RigL, {}),
    "dst-ee": (dst.DSTEE, {}),
    "bidst": (dst.BiDST, {}),
    "mest": (dst.MEST, {}),
    "gse-uniform": (dst.GSE, {"sampler": "uniform", "alpha": 0.3, "t_end": 0.75}),
    "gse-grabo": (dst.GSE, {"sampler": "grabo", "alpha": 0.3, "t_end": 0.75}),
    "gse-graest": (dst.GSE, {"sampler": "graest", "alpha": 0.3, "t_end": 0.75}),
}
DEFAULT_METHODS = list(METHODS)


def parse_method(spec: str):
    """``name[:k=v,...]`` -> ``(label, class, kwargs)``."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"dst_planted: unknown method {name!r} (one of {list(METHODS)})")
    cls, kw = METHODS[name]
    kw = dict(kw)
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            kw[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kw[k] = v
    return spec, cls, kw


def mlp(sizes) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def teacher(sizes, sparsity: float, seed: int):
    """A dense-shaped MLP whose weights carry a planted random mask (He-scaled on the active
    fan-in so activations keep their scale); returns it and the masks."""
    g = torch.Generator().manual_seed(10_000 + seed)
    net, masks = mlp(sizes), []
    with torch.no_grad():
        for lin in (m for m in net if isinstance(m, nn.Linear)):
            mask = random_mask(tuple(lin.weight.shape), (1, 1), sparsity, g)
            fan = max(1.0, float(mask.sum(1).float().mean()))
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (2 / fan) ** 0.5 * mask)
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
            masks.append(mask)
    return net.requires_grad_(False), masks


def run_one(spec, sizes, sparsity, seed, steps, batch, delta_t, lr):
    label, cls, extra = spec
    teach, planted = teacher(sizes, sparsity, seed)
    gen = torch.Generator().manual_seed(20_000 + seed)
    x_test = torch.randn(2048, sizes[0], generator=gen)
    y_test = teach(x_test)
    torch.manual_seed(seed)
    student = mlp(sizes)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    kw = dict(total_steps=steps, sparsity=sparsity, distribution="uniform", seed=1000 + seed)
    if cls is dst.BiDST:
        kw["refresh_every"] = delta_t
    elif cls is dst.MEST:
        kw["update_every"] = delta_t
    elif cls is not dst.Static:
        kw["delta_t"] = delta_t
    method = cls(student, opt, **{**kw, **extra})
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    step_t, upd_t = [], []
    for t in range(1, steps + 1):
        x = torch.randn(batch, sizes[0], generator=gen)
        t0 = time.perf_counter()
        F.mse_loss(student(x), teach(x)).backward()
        due = method.step()
        opt.zero_grad(set_to_none=True)
        (upd_t if due else step_t).append(time.perf_counter() - t0)
        sched.step()
    with torch.no_grad():
        out = student(x_test)
    st = method.stats()
    layers = [ls.module for ls in method.layers]
    recovery = [float((lay.mask & m).sum() / m.sum()) for lay, m in zip(layers, planted)]
    return {
        "test_loss": float(F.mse_loss(out, y_test)),
        "test_acc": float((out.argmax(1) == y_test.argmax(1)).float().mean() * 100),
        "recovery": sum(recovery) / len(recovery), "layer_recovery": recovery,
        "exploration": st["exploration"], "n_updates": st["n_updates"],
        "step_ms": 1e3 * statistics.median(step_t) if step_t else None,
        "update_step_ms": 1e3 * statistics.median(upd_t) if upd_t else None,
    }


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3g} ± {sd:.2g}"


def table(results: dict) -> str:
    head = ("| method | sparsity | test MSE | argmax acc % | recovery | exploration | "
            "step ms | update-step ms |")
    lines = [head, "|---" * 8 + "|"]
    for key, runs in results.items():
        label, sp = key.rsplit("@", 1)
        col = lambda k: _ms([r[k] for r in runs])  # noqa: E731
        lines.append(f"| {label} | {float(sp):.0%} | {col('test_loss')} | {col('test_acc')} | "
                     f"{col('recovery')} | {col('exploration')} | {col('step_ms')} | "
                     f"{col('update_step_ms')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 128, 10])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--delta-t", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: no oversubscription on a shared machine)")
    p.add_argument("--out", default=str(ROOT / "results" / "dst_planted.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_method(m) for m in args.methods]
    results, t_start = {}, time.perf_counter()
    for sp in args.sparsities:
        for spec in specs:
            for seed in args.seeds:
                r = run_one(spec, args.sizes, sp, seed, args.steps, args.batch, args.delta_t,
                            args.lr)
                results.setdefault(f"{spec[0]}@{sp}", []).append(r)
                print(f"{spec[0]:<24} s={sp} seed {seed}: mse {r['test_loss']:.4g} acc "
                      f"{r['test_acc']:.1f} rec {r['recovery']:.3f} expl {r['exploration']:.3f}",
                      flush=True)
    print(table(results))
    payload = {"config": vars(args), "machine": {"cpu": cpu_model(),
                                                 "threads": torch.get_num_threads()},
               "torch": torch.__version__, "wall_s": time.perf_counter() - t_start,
               "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
