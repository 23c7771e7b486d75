"""Per-op dense crossover of the C++ conv ops: sparse kernels vs the dense (oneDNN) path.

For every sparse conv layer of a model (after ``sk.sparsify``) times ``sparsekern::_conv2d``,
``_conv2d_grad_input`` and ``_conv2d_sddmm`` on the layer's own shapes with the path forced
(``SPARSEKERN_DENSE_CROSSOVER=never`` = sparse kernels, ``always`` = oneDNN on the selected
W ⊙ mask), and prints what the crossover picks (``auto``, ``torch.ops.sparsekern._conv2d_plan``)
and the time of the picked path over the better one. ``--steps`` instead times whole
training steps (bench_models' providers) of dense PyTorch and of each variant with the crossover
off (``never``) and on (``auto``). One process, interleaved rounds; only ratios are meaningful on
a shared machine.

    python3 benchmarks/bench_conv_crossover.py [--models demo,resnet18]
        [--variants uniform:0.9:1,erk:0.9:1,uniform:0.9:16] [--rounds 5] [--threads 2]
        [--stat median|min] [--steps] [--out benchmarks/results/bench_conv_crossover.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sparsekern as sk  # noqa: E402
from bench_models import build_model, build_provider, model_case, parse_variant  # noqa: E402
from common import machine_info  # noqa: E402

OPS = ("conv2d", "conv2d_grad_input", "conv2d_sddmm")
ENV = "SPARSEKERN_DENSE_CROSSOVER"


def _layers(model_name: str, dist: str, sparsity: float, block: int):
    """(name, module, input shape) of every SparseConv2d after sparsify, from one forward."""
    case = model_case(model_name, False)
    model = build_model(model_name, False)
    sk.sparsify(model, sparsity, distribution=dist, block_size=(block, block), layout="dense")
    shapes = {}

    def hook(name):
        def record(module, args, out):
            shapes.setdefault(name, tuple(args[0].shape))
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
             if isinstance(m, sk.nn.SparseConv2d)]
    with torch.no_grad():
        model(torch.randn(case.batch, *case.sample))
    for h in hooks:
        h.remove()
    return [(n, m, shapes[n]) for n, m in model.named_modules() if n in shapes]


def _args(op, m, x, dy):
    br, bc = m.block_size
    topo = list(m._topo_tensors())
    w, mask = m._values().detach(), m.mask
    conv = (list(m.stride), list(m.padding), list(m.dilation), m.groups)
    if op == "conv2d":
        return (x, w, mask, topo, br, bc, *conv)
    if op == "conv2d_grad_input":
        return (dy, w, mask, topo, br, bc, list(x.shape[2:]), *conv)
    return (dy, x, mask, topo, br, bc, *conv)


def _time(fn, mode):
    os.environ[ENV] = mode
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def whole_steps(args):
    """Whole training steps: dense, and each variant with the crossover off and on."""
    stat = min if args.stat == "min" else statistics.median
    rows = []
    print(f"threads={args.threads}; step ms = {args.stat} of {args.rounds} interleaved rounds")
    print(f"{'model':8} {'variant':16} {'dense':>9} {'never':>9} {'auto':>9} {'x dense never':>13} "
          f"{'x dense auto':>12} {'auto/never':>10}")
    for model_name in args.models.split(","):
        case = model_case(model_name, False)
        for variant in args.variants.split(","):
            dense = build_provider(model_name, parse_variant("dense"), False)
            sparse = build_provider(model_name, parse_variant(variant + ":dense"), False)
            runs = {"dense": (dense, "never"), "never": (sparse, "never"), "auto": (sparse, "auto")}
            t = {k: [] for k in runs}
            for r in range(args.rounds + 1):
                for k, (p, mode) in runs.items():
                    os.environ[ENV] = mode
                    t0 = time.perf_counter()
                    for _ in range(case.steps_per_round):
                        p.step()
                    if r:
                        t[k].append((time.perf_counter() - t0) / case.steps_per_round)
            ms = {k: stat(v) * 1e3 for k, v in t.items()}
            print(f"{model_name:8} {variant:16} {ms['dense']:9.1f} {ms['never']:9.1f} "
                  f"{ms['auto']:9.1f} {ms['dense'] / ms['never']:12.2f}x "
                  f"{ms['dense'] / ms['auto']:11.2f}x {ms['never'] / ms['auto']:9.2f}x")
            rows.append(dict(model=model_name, variant=variant, step_ms=ms))
    os.environ.pop(ENV, None)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,resnet18")
    ap.add_argument("--variants", default="uniform:0.9:1,erk:0.9:1,uniform:0.9:16,uniform:0.9:32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per-path statistic; min resists preemption on a crowded machine")
    ap.add_argument("--steps", action="store_true",
                    help="whole training steps with the crossover off and on (variants "
                         "dist:sparsity:block, dense layout)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.steps:
        rows = whole_steps(args)
        if args.out:
            Path(args.out).write_text(json.dumps({"machine": machine_info(args.threads),
                                                  "stat": args.stat, "steps": rows}, indent=1))
        return
    ops = torch.ops.sparsekern
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"threads={args.threads}; ms = {args.stat} of {args.rounds} interleaved rounds; "
          "pick = auto's path; loss = picked time / best time")
    print(f"{'model':8} {'variant':16} {'layer':22} {'op':18} {'dens':>5} {'P':>5} "
          f"{'sparse':>8} {'dense':>8} {'s/d':>6} {'pick':>6} {'loss':>5}")
    for model_name in args.models.split(","):
        for variant in args.variants.split(","):
            dist, sp, block = variant.split(":")
            for name, m, xs in _layers(model_name, dist, float(sp), int(block)):
                x = torch.randn(xs, generator=gen)
                with torch.no_grad():
                    os.environ[ENV] = "never"
                    y = ops._conv2d(*_args("conv2d", m, x, None))
                dy = torch.randn(y.shape, generator=gen)
                density = float(m.mask.float().mean())
                for op in OPS:
                    a = _args(op, m, x, dy)
                    fn = lambda: getattr(ops, "_" + op)(*a)  # noqa: E731
                    os.environ.pop(ENV, None)
                    pick = ops._conv2d_plan(op, list(xs), list(m.mask.shape), int(a[3][1].numel()),
                                            *m.block_size, *a[-4:])
                    for mode in ("never", "always"):
                        _time(fn, mode)
                    t = {"never": [], "always": []}
                    for _ in range(args.rounds):
                        for mode in t:
                            t[mode].append(_time(fn, mode))
                    stat = min if args.stat == "min" else statistics.median
                    s, d = (stat(t[k]) * 1e3 for k in ("never", "always"))
                    loss = (s if pick == "sparse" else d) / min(s, d)
                    p = y.shape[2] * y.shape[3]
                    print(f"{model_name:8} {variant:16} {name[-22:]:22} {op:18} {density:5.2f} "
                          f"{p:5d} {s:8.2f} {d:8.2f} {s / d:6.2f} {pick:>6} {loss:5.2f}")
                    rows.append(dict(model=model_name, variant=variant, layer=name, op=op,
                                     x_shape=list(xs), weight_shape=list(m.mask.shape),
                                     block=int(block), stride=list(m.stride), density=density,
                                     pixels=p, sparse_ms=s, dense_ms=d, pick=pick, loss=loss))
    os.environ.pop(ENV, None)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine_info(args.threads),
                                              "stat": args.stat, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
