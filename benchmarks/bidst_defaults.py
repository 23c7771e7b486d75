"""The digits experiment behind BiDST's ``tau`` default (its ``phi``/``lam`` defaults now come from
``benchmarks/dst_planted.py``, where methods differ; sparsekern/dst/README.md): ResNetSmall
(width 16) on scikit-learn's digits at 95% sparsity (ERK), SGD + momentum with a cosine
schedule, refresh every epoch, every (phi, tau) on a few seeds, RigL and static as references.

    python benchmarks/bidst_defaults.py [--epochs 8] [--seeds 0 1] [--lam 1e-4]

Prints one line per run and a summary table (mean test accuracy, mask changes).
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="sparsekern: C\\+\\+ extension")

from sparsekern import dst  # noqa: E402
from sparsekern.data import load_digits  # noqa: E402
from sparsekern.models import ResNetSmall  # noqa: E402


def run(method: str, seed: int, epochs: int, lam: float, phi: str = "sq_active",
        tau: float = 0.0, batch: int = 64, lr: float = 0.1, width: int = 16,
        sparsity: float = 0.95) -> dict:
    train, test, n_classes = load_digits(seed=0)
    torch.manual_seed(seed)
    model = ResNetSmall(1, n_classes, width)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    spe = math.ceil(len(train) / batch)
    total = spe * epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    common = dict(total_steps=total, sparsity=sparsity, distribution="erk", seed=seed)
    if method == "bidst":
        m = dst.BiDST(model, opt, refresh_every=spe, lam=lam, phi=phi, tau=tau, **common)
    elif method == "rigl":
        m = dst.RigL(model, opt, delta_t=spe // 2, **common)
    else:
        m = dst.Static(model, opt, **common)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch):
            idx = perm[i:i + batch]
            F.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
            m.step()
            opt.zero_grad()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test.x).argmax(1) == test.y).float().mean().item() * 100
    st = m.stats()
    return {"acc": acc, "swapped": st["n_net_swapped"], "R": st["exploration"],
            "updates": st["n_updates"], "secs": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lam", type=float, nargs="+", default=[1e-4])
    p.add_argument("--taus", type=float, nargs="+", default=[0.0, 1e-3, 1e-2])
    p.add_argument("--phis", nargs="+", default=["sq_active", "abs", "signed"])
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--baselines", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    configs = [("bidst", lam, phi, tau) for lam, phi, tau in
               itertools.product(a.lam, a.phis, a.taus)]
    if a.baselines:
        configs = [("static", 0, "-", 0), ("rigl", 0, "-", 0)] + configs
    for method, lam, phi, tau in configs:
        res = [run(method, s, a.epochs, lam, phi if phi != "-" else "sq_active", tau,
                   sparsity=a.sparsity) for s in a.seeds]
        accs = [r["acc"] for r in res]
        row = (method, lam, phi, tau, sum(accs) / len(accs), min(accs), max(accs),
               sum(r["swapped"] for r in res) / len(res), sum(r["R"] for r in res) / len(res),
               sum(r["secs"] for r in res))
        rows.append(row)
        print("%-6s lam=%-7g phi=%-9s tau=%-6g acc=%.2f [%.2f, %.2f] swapped=%.0f R=%.3f "
              "(%.0fs)" % row, flush=True)
    print("\n| method | λ | φ | τ | test acc % (mean over seeds) | min | max | swapped | R |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %g | %s | %g | %.2f | %.2f | %.2f | %.0f | %.3f |" % r[:9])


if __name__ == "__main__":
    main()
