"""``sparsekern-train``: train a small ResNet with a DST method and report accuracy, density,
mask dynamics and step time against the same model trained dense.

    python -m sparsekern.train --method rigl --sparsity 0.9 --epochs 20 --out runs/demo
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .data import batches, load_dataset
from .models import ResNetSmall

METHODS = ("dense", "static", "set", "rigl", "dst-ee", "bidst", "mest", "gse")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekern-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=METHODS, default="rigl")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--distribution", choices=("erk", "uniform"), default="erk")
    p.add_argument("--block-size", type=int, nargs="+", default=[1],
                   help="mask block size: one int (square) or two (rows cols)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--width", type=int, default=32, help="channels of the first stage")
    p.add_argument("--delta-t", type=int, default=20,
                   help="steps between mask updates (BiDST: refreshes, MEST: prune-and-grow)")
    p.add_argument("--gse-sampler", choices=("uniform", "grabo", "graest"), default="grabo",
                   help="GSE's subset distribution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=ops.BACKENDS, default="auto")
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py")
    p.add_argument("--out", default="runs/demo", help="folder for report.json and plots")
    p.add_argument("--no-dense-baseline", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.delta_t < 1:
        parser.error(f"--delta-t must be >= 1, got {args.delta_t}")
    if len(args.block_size) not in (1, 2) or min(args.block_size) < 1:
        parser.error(f"--block-size takes one or two positive ints, got {args.block_size}")
    args.block_size = tuple(args.block_size * (3 - len(args.block_size)))[:2]
    if args.dataset == "cifar10" and args.data_dir is None:
        parser.error("--dataset cifar10 needs --data-dir (the cifar-10-batches-py folder)")
    return args


def make_method(name: str, model: nn.Module, optimizer, args, total_steps: int, steps_per_epoch: int):
    """The DST method object for ``name`` (None for ``dense``)."""
    if name == "dense":
        return None
    from . import dst

    common = dict(total_steps=total_steps, sparsity=args.sparsity,
                  distribution=args.distribution, block_size=args.block_size, seed=args.seed)
    every = args.delta_t
    if name == "static":
        return dst.Static(model, optimizer, **common)
    if name == "set":
        return dst.SET(model, optimizer, delta_t=every, **common)
    if name == "rigl":
        return dst.RigL(model, optimizer, delta_t=every, **common)
    if name == "dst-ee":
        return dst.DSTEE(model, optimizer, delta_t=every, **common)
    if name == "bidst":
        return dst.BiDST(model, optimizer, refresh_every=every, **common)
    if name == "mest":
        return dst.MEST(model, optimizer, update_every=every, **common)
    if name == "gse":
        return dst.GSE(model, optimizer, delta_t=every, sampler=args.gse_sampler, **common)
    raise ValueError(f"unknown method {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 256) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``split``."""
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches(split, batch_size))
    model.train()
    return 100.0 * correct / max(1, len(split))


def _progress(iterable, total, desc, quiet):
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def train_run(method_name: str, args, train, test, n_classes: int, log=print) -> dict:
    """Train one model; returns its history. Raises KeyboardInterrupt with the partial history
    attached as ``.history``."""
    torch.manual_seed(args.seed)
    model = ResNetSmall(train.x.shape[1], n_classes, args.width)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total)
    method = make_method(method_name, model, opt, args, total, steps_per_epoch)
    hist = {"method": method_name, "epochs": [], "updates": [], "status": "running"}
    gen = torch.Generator().manual_seed(args.seed)
    seen_updates = 0
    try:
        for epoch in range(1, args.epochs + 1):
            loss_sum, n, t_step = 0.0, 0, 0.0
            it = _progress(batches(train, args.batch_size, gen), steps_per_epoch,
                           f"{method_name} epoch {epoch}/{args.epochs}", args.quiet)
            for x, y in it:
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if method is None:
                    opt.step()
                else:
                    method.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                t_step += time.perf_counter() - t0
                loss_sum += loss.item() * len(y)
                n += len(y)
                if method is not None:
                    st = method.stats()
                    if st["n_updates"] > seen_updates:
                        seen_updates = st["n_updates"]
                        hist["updates"].append({"step": st["step"], "iou": st.get("iou"),
                                                "exploration": st.get("exploration")})
            row = {"epoch": epoch, "train_loss": loss_sum / max(1, n),
                   "test_acc": evaluate(model, test), "step_time_ms": 1e3 * t_step / steps_per_epoch}
            if method is not None:
                st = method.stats()
                row.update(density=st.get("density"), n_updates=st["n_updates"],
                           iou=st.get("iou"), exploration=st.get("exploration"))
            hist["epochs"].append(row)
            log(_format_row(method_name, row))
    except KeyboardInterrupt as e:
        hist["status"] = "interrupted"
        e.history = _finish(hist, method)
        raise
    hist["status"] = "complete"
    return _finish(hist, method)


def _finish(hist: dict, method) -> dict:
    if method is not None:
        st = method.stats()
        hist["final_stats"] = _jsonable(st)
        hist["update_interval"] = None if method.name == "Static" else method.delta_t
        hist["layer_density"] = _jsonable(st.get("layer_density", {}))
    if hist["epochs"]:
        last = hist["epochs"][-1]
        hist["test_acc"] = last["test_acc"]
        hist["step_time_ms"] = sum(r["step_time_ms"] for r in hist["epochs"]) / len(hist["epochs"])
    return hist


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _format_row(name: str, r: dict) -> str:
    return (f"[{name}] epoch {r['epoch']:3d}  loss {r['train_loss']:.4f}  "
            f"test acc {r['test_acc']:6.2f}%  density {_fmt(r.get('density'), '.4f')}  "
            f"updates {_fmt(r.get('n_updates'), 'd')}  IoU {_fmt(r.get('iou'), '.3f')}  "
            f"explored {_fmt(r.get('exploration'), '.3f')}  step {r['step_time_ms']:.1f} ms")


def write_report(out: Path, args, runs: dict, status: str, plots: bool) -> Path:
    """Write ``report.json`` (and plots) for whatever ``runs`` holds now."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    report = {"status": status, "config": cfg, "backend": ops.resolve_backend(torch.device("cpu")),
              "torch": torch.__version__, "runs": runs}
    sparse, dense = runs.get(args.method), runs.get("dense")
    if sparse and dense and "test_acc" in sparse and "test_acc" in dense \
            and args.method != "dense":
        report["comparison"] = {
            "test_acc": {args.method: sparse["test_acc"], "dense": dense["test_acc"]},
            "step_time_ms": {args.method: sparse["step_time_ms"], "dense": dense["step_time_ms"]},
            "acc_gap": dense["test_acc"] - sparse["test_acc"]}
    path = out / "report.json"
    path.write_text(json.dumps(_jsonable(report), indent=2))
    if plots:
        from .plots import plot_report

        report["plots"] = plot_report(report, out)
        path.write_text(json.dumps(_jsonable(report), indent=2))
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ops.set_backend(args.backend)
        train, test, n_classes = load_dataset(args.dataset, args.data_dir, args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"sparsekern-train: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    names = [args.method] + ([] if args.no_dense_baseline or args.method == "dense" else ["dense"])
    print(f"sparsekern-train: {args.method} at sparsity {args.sparsity} on {args.dataset} "
          f"({len(train)} train / {len(test)} test), backend "
          f"{ops.resolve_backend(torch.device('cpu'))}", flush=True)
    runs: dict = {}
    try:
        for name in names:
            runs[name] = train_run(name, args, train, test, n_classes)
    except KeyboardInterrupt as e:
        runs[name] = getattr(e, "history", {"method": name, "status": "interrupted"})
        path = write_report(out, args, runs, "interrupted", not args.no_plots)
        print(f"\ninterrupted: partial report in {path}", file=sys.stderr)
        return 130
    path = write_report(out, args, runs, "complete", not args.no_plots)
    print(_summary_table(runs))
    print(f"report: {path}")
    return 0


def _summary_table(runs: dict) -> str:
    lines = [f"{'run':<10}{'test acc %':>12}{'step ms':>10}", "-" * 32]
    for name, r in runs.items():
        lines.append(f"{name:<10}{r.get('test_acc', float('nan')):>12.2f}"
                     f"{r.get('step_time_ms', float('nan')):>10.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
