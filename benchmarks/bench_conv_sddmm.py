"""In-process A/B of the unstructured (element-mask) conv weight gradient on the C++ backend.

Times ``sparsekern::_conv2d_sddmm`` with 1x1 blocks in its outer-product form against the former
dot-product form (``SPARSEKERN_CONV_SDDMM=dot``, read per call) and against dense PyTorch's
``torch.nn.grad.conv2d_weight``, on the CIFAR ResNet-18 3x3 conv shapes at 90% unstructured.
One process, interleaved rounds, medians; only the ratios are meaningful on a shared machine.

    python3 benchmarks/bench_conv_sddmm.py [--rounds 7] [--threads 2] [--batch 64]
"""
import argparse
import os
import statistics
import time

import torch

import sparsekern  # noqa: F401  (registers the ops)
from sparsekern.topology import build_topology

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, spatial), 3x3, stride 1, pad 1


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops = torch.ops.sparsekern
    isa = os.environ.get("SPARSEKERN_CPU_ISA", "auto")
    print(f"threads={args.threads} ISA={isa} batch={args.batch} density={args.density}")
    print(f"{'shape':>22} {'dense ms':>9} {'dot ms':>8} {'outer ms':>9} "
          f"{'outer/dot':>9} {'vs dense':>9} {'max rel err':>11}")
    gen = torch.Generator().manual_seed(0)
    for c, s in SHAPES:
        x = torch.randn(args.batch, c, s, s, generator=gen)
        dy = torch.randn(args.batch, c, s, s, generator=gen)
        mask = torch.rand(c, c, 3, 3, generator=gen) < args.density
        topo = build_topology(mask.view(c, -1)).tensors
        conv = ([1, 1], [1, 1], [1, 1], 1)
        wshape = (c, c, 3, 3)

        def dense():
            return torch.nn.grad.conv2d_weight(x, wshape, dy, stride=1, padding=1)

        def sparse(form):
            if form:
                os.environ["SPARSEKERN_CONV_SDDMM"] = form
            else:
                os.environ.pop("SPARSEKERN_CONV_SDDMM", None)
            return ops._conv2d_sddmm(dy, x, mask, topo, 1, 1, *conv)

        want = dense().view(c, -1)[mask.view(c, -1)]
        got = sparse(None).view(-1)
        old = sparse("dot").view(-1)
        scale = want.abs().max().clamp_min(1e-30)
        err = max(((got - want).abs().max() / scale).item(), ((old - want).abs().max() / scale).item())
        times = {"dense": [], "dot": [], "outer": []}
        for _ in range(args.rounds):
            times["dense"].append(_timed(dense))
            times["dot"].append(_timed(lambda: sparse("dot")))
            times["outer"].append(_timed(lambda: sparse(None)))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{f'{c}->{c} {s}x{s} N={args.batch}':>22} {med['dense']:9.2f} {med['dot']:8.2f} "
              f"{med['outer']:9.2f} {med['dot'] / med['outer']:8.2f}x "
              f"{med['dense'] / med['outer']:8.2f}x {err:11.2e}")
    os.environ.pop("SPARSEKERN_CONV_SDDMM", None)


if __name__ == "__main__":
    main()
