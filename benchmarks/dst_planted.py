"""Planted-topology benchmark (ALGORITHMS.md): a sparse teacher with a planted random mask at the
target density; a student of the same shape and density, from a different random mask, is
trained by each DST method on the teacher's outputs (Gaussian inputs, MSE). Two tasks:

- ``linear``: the teacher is one bias-free sparse linear map ``y = W*x``, the student one sparse
  ``Linear``. Without hidden units the planted mask is identifiable, so recovery
  ``|M ∧ M*| / |M*|`` measures how well a method finds the right connections (chance: the
  density).
- ``mlp``: a teacher MLP (loss and argmax agreement only: a student's hidden units may be any
  permutation of the teacher's, so per-layer recovery of a hidden layer is not identifiable and
  sits at chance for every method; it stays in the JSON as ``recovery``/``layer_recovery``).

Reports test loss, argmax agreement with the teacher, recovery, exploration degree, and wall
time per training step and per update step; mean ± std over seeds.

    python benchmarks/dst_planted.py                       # the full grid (< 10 min, 2 cores)
    python benchmarks/dst_planted.py --tasks linear --methods rigl gse-grabo:gamma=4 --seeds 0

A method is a name of ``METHODS`` with optional ``:key=value,...`` overrides of its arguments.
A CNN teacher does not fit the 10-minute budget on a 2-core machine.
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
#: ``linear``: identifiable planted mask (recovery); ``mlp``: loss and accuracy only
TASKS = ("linear", "mlp")


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


def mlp(sizes, bias: bool = True) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def teacher(sizes, sparsity: float, seed: int, task: str = "mlp"):
    """The teacher of ``task`` and its planted masks. ``"mlp"``: a dense-shaped MLP whose
    weights carry a planted random mask (He-scaled on the active fan-in so activations keep
    their scale). ``"linear"``: one bias-free linear map ``y = W*x`` with a planted random mask
    (weights ``N(0, 1/fan-in)``): no hidden units, so the planted mask is identifiable."""
    g = torch.Generator().manual_seed(10_000 + seed)
    net, masks = mlp(sizes, bias=task == "mlp"), []
    gain = 2.0 if task == "mlp" else 1.0
    with torch.no_grad():
        for lin in (m for m in net if isinstance(m, nn.Linear)):
            mask = random_mask(tuple(lin.weight.shape), (1, 1), sparsity, g)
            fan = max(1.0, float(mask.sum(1).float().mean()))
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (gain / fan) ** 0.5
                             * mask)
            if lin.bias is not None:
                lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
            masks.append(mask)
    return net.requires_grad_(False), masks


def run_one(spec, sizes, sparsity, seed, steps, batch, delta_t, lr, task="mlp"):
    label, cls, extra = spec
    teach, planted = teacher(sizes, sparsity, seed, task)
    gen = torch.Generator().manual_seed(20_000 + seed)
    x_test = torch.randn(2048, sizes[0], generator=gen)
    y_test = teach(x_test)
    torch.manual_seed(seed)
    student = mlp(sizes, bias=task == "mlp")
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


def table(results: dict, task: str) -> str:
    """Markdown table of ``task``'s runs (the MLP's has no recovery column: not identifiable)."""
    rec = task != "mlp"
    cols = ["test MSE", "argmax acc %"] + (["recovery"] if rec else []) + [
        "exploration", "step ms", "update-step ms"]
    keys = ["test_loss", "test_acc"] + (["recovery"] if rec else []) + [
        "exploration", "step_ms", "update_step_ms"]
    lines = ["| method | sparsity | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for key, runs in results.items():
        t, _, rest = key.partition("/")
        if t != task:
            continue
        label, sp = rest.rsplit("@", 1)
        vals = [_ms([r[k] for r in runs]) for k in keys]
        lines.append(f"| {label} | {float(sp):.0%} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 128, 10],
                   help="the MLP task's layer sizes")
    p.add_argument("--linear-sizes", type=int, nargs=2, default=[256, 128],
                   metavar=("N_IN", "N_OUT"), help="the linear task's input and output sizes")
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
    results, t_start, c_start = {}, time.perf_counter(), time.process_time()
    for task in args.tasks:
        sizes = args.sizes if task == "mlp" else args.linear_sizes
        for sp in args.sparsities:
            for spec in specs:
                for seed in args.seeds:
                    r = run_one(spec, sizes, sp, seed, args.steps, args.batch, args.delta_t,
                                args.lr, task)
                    results.setdefault(f"{task}/{spec[0]}@{sp}", []).append(r)
                    print(f"{task:<6} {spec[0]:<24} s={sp} seed {seed}: mse "
                          f"{r['test_loss']:.4g} acc {r['test_acc']:.1f} rec {r['recovery']:.3f} "
                          f"expl {r['exploration']:.3f}", flush=True)
    for task in args.tasks:
        print(f"\n{task}:\n{table(results, task)}")
    payload = {"config": vars(args), "machine": {"cpu": cpu_model(),
                                                 "threads": torch.get_num_threads()},
               "torch": torch.__version__, "wall_s": time.perf_counter() - t_start,
               "cpu_s": time.process_time() - c_start,
               "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out} ({payload['wall_s']:.0f} s wall, {payload['cpu_s']:.0f} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
