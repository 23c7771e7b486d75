"""GPU benchmark of sparsekern's Triton kernels against cuBLAS/cuDNN dense and torch.sparse's
Triton kernels (``bsr_dense_mm``, ``sampled_addmm``), on ResNet-50 and ViT-B MLP shapes, block
sizes 16/32/64 and sparsities 0.5-0.99.

    python3 benchmarks/bench_triton.py                 # full sweep, fp16
    python3 benchmarks/bench_triton.py --quick --dtype bf16 --json out.json --csv out.csv
    python3 benchmarks/bench_triton.py --list          # the cases, no GPU needed

Per case: forward ``x @ (W⊙M)ᵀ``, grad_input ``dy @ (W⊙M)``, the active weight gradient
(SDDMM), and the growth step (dense: ``dyᵀx`` + ``torch.topk``; sparsekern: ``grow_topk``, which
never forms the dense gradient — time and peak extra memory; 1% of the blocks, by block
mean of ``|G|``). Times are medians of
``triton.testing.do_bench``; ``x dense`` is the speed-up over the dense op (> 1 is faster);
``TF/s eff`` counts the dense FLOPs, ``TF/s act`` only the active ones. Without a CUDA GPU the
script says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


@dataclass(frozen=True)
class LinearShape:
    """A GEMM ``[rows, in] @ [out, in]ᵀ`` from a real model (conv 1x1 layers as GEMMs over
    pixels)."""

    model: str
    layer: str
    rows: int  # batch x tokens (ViT) or batch x pixels (ResNet 1x1 convs)
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ConvShape:
    model: str
    layer: str
    n: int
    c_in: int
    c_out: int
    hw: int
    kernel: int
    stride: int
    padding: int


LINEAR_SHAPES = (
    LinearShape("ViT-B/16", "mlp.fc1", 8 * 197, 768, 3072),
    LinearShape("ViT-B/16", "mlp.fc2", 8 * 197, 3072, 768),
    LinearShape("ResNet-50", "layer3.conv1 (1x1)", 32 * 14 * 14, 1024, 256),
    LinearShape("ResNet-50", "layer4.conv3 (1x1)", 32 * 7 * 7, 512, 2048),
    LinearShape("ResNet-50", "fc", 256, 2048, 1000),
)
CONV_SHAPES = (
    ConvShape("ResNet-50", "layer2.conv2 (3x3)", 32, 128, 128, 28, 3, 1, 1),
    ConvShape("ResNet-50", "layer3.conv2 (3x3)", 32, 256, 256, 14, 3, 1, 1),
)
BLOCKS = (16, 32, 64)
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
QUICK_SPARSITIES = (0.5, 0.9, 0.99)


def cases(quick: bool):
    sps = QUICK_SPARSITIES if quick else SPARSITIES
    shapes = LINEAR_SHAPES[:3] if quick else LINEAR_SHAPES
    for shape in shapes:
        for bs in BLOCKS:
            for sp in sps:
                yield shape, bs, sp
    for shape in (CONV_SHAPES[:1] if quick else CONV_SHAPES):
        for bs in (16, 32):
            for sp in (0.9,) if quick else (0.5, 0.9):
                yield shape, bs, sp


def _block_mask(m, k, bs, sparsity, device, gen):
    from sparsekern.topology import expand_blocks, grid_shape
    nb = grid_shape((m, k), (bs, bs))
    n = nb[0] * nb[1]
    keep = max(1, n - int(sparsity * n))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=gen)[:keep]] = True
    return expand_blocks(flat.view(nb), (bs, bs), (m, k)).to(device)


def _bench(fn, dev: str):
    """Median ms of ``fn`` (``do_bench`` on CUDA; one timed call elsewhere, for smoke tests)."""
    import time

    import triton.testing
    try:
        if dev == "cuda":
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    except Exception as e:  # noqa: BLE001 - a provider that fails is reported, not fatal
        return f"n/a ({type(e).__name__}: {str(e)[:60]})"


def _peak_extra(fn, dev: str):
    """Peak memory allocated during ``fn`` beyond what was allocated before (bytes; CUDA)."""
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_linear(shape: LinearShape, bs: int, sp: float, dtype, gen, dev="cuda") -> list[dict]:
    import torch.nn.functional as F
    from sparsekern import reference as ref
    from sparsekern.kernels import IMPLS
    from sparsekern.topology import block_reduce, build_topology
    try:
        from torch.sparse._triton_ops import bsr_dense_mm, sampled_addmm
    except ImportError:  # pragma: no cover - torch without the module
        bsr_dense_mm = sampled_addmm = None

    m, k, b = shape.out_features, shape.in_features, shape.rows
    mask = _block_mask(m, k, bs, sp, dev, gen)
    topology = build_topology(mask, (bs, bs))
    topo = topology.tensors
    w = (torch.randn(m, k, generator=gen) / k ** 0.5).to(dev, dtype)
    weff = w * mask.to(dtype)
    values = ref.gather_blocks(w, topo[0], topo[1], bs, bs).contiguous()
    x = torch.randn(b, k, generator=gen).to(dev, dtype)
    dy = torch.randn(b, m, generator=gen).to(dev, dtype)
    density = mask.float().mean().item()
    flops = 2.0 * b * m * k
    try:  # torch's BSR needs the shape divisible by the block
        w_bsr = weff.to_sparse_bsr((bs, bs))
    except RuntimeError as e:
        w_bsr = f"n/a ({str(e)[:60]})"
    exclude = topology.block_mask  # grow among inactive blocks
    n_grow = max(1, int(0.01 * exclude.numel()))

    rows = []

    def bench(fn):
        return _bench(fn, dev)

    def add(op, provider, t, mem=None):
        row = dict(model=shape.model, layer=shape.layer, op=op, block=bs, sparsity=sp,
                   density=round(density, 4), provider=provider, rows=b, in_f=k, out_f=m,
                   ms=t if isinstance(t, float) else None,
                   note=None if isinstance(t, float) else t, peak_extra_mb=mem)
        rows.append(row)

    add("forward", "dense (cuBLAS)", bench(lambda: F.linear(x, weff)))
    if bsr_dense_mm is not None and isinstance(w_bsr, str):
        add("forward", "torch bsr_dense_mm", w_bsr)
    elif bsr_dense_mm is not None:
        xt = x.t().contiguous()
        add("forward", "torch bsr_dense_mm", bench(lambda: bsr_dense_mm(w_bsr, xt)))
    add("forward", "sparsekern dense-layout", bench(lambda: IMPLS["bsr_mm"](x, w, mask, topo,
                                                                             bs, bs)))
    add("forward", "sparsekern bsr-layout", bench(lambda: IMPLS["bsr_mm"](x, values, mask,
                                                                           topo, bs, bs)))
    add("grad_input", "dense (cuBLAS)", bench(lambda: dy @ weff))
    add("grad_input", "sparsekern", bench(lambda: IMPLS["bsr_mm_t"](dy, values, mask, topo,
                                                                     bs, bs)))
    add("weight_grad", "dense (cuBLAS)", bench(lambda: dy.t() @ x))
    if sampled_addmm is not None and isinstance(w_bsr, str):
        add("weight_grad", "torch sampled_addmm", w_bsr)
    elif sampled_addmm is not None:
        dyt = dy.t().contiguous()
        add("weight_grad", "torch sampled_addmm",
            bench(lambda: sampled_addmm(w_bsr, dyt, x, beta=0.0, alpha=1.0)))
    add("weight_grad", "sparsekern sddmm", bench(lambda: IMPLS["sddmm"](dy, x, mask, topo,
                                                                         bs, bs)))

    def dense_grow():
        g = block_reduce((dy.t().float() @ x.float()).abs(), (bs, bs), "mean")
        return torch.topk(g.masked_fill_(exclude, -1.0).flatten(), n_grow)

    def sk_grow():
        return IMPLS["grow_topk"](dy, x, exclude, n_grow, None, 0.0, 1.0, bs, bs)

    grow = "growth top-1%"
    add(grow, "dense dyᵀx + torch.topk", bench(dense_grow), _peak_extra(dense_grow, dev))
    add(grow, "sparsekern grow_topk", bench(sk_grow), _peak_extra(sk_grow, dev))
    for r in rows:
        r["flops_dense"] = flops
        r["flops_active"] = flops * (density if r["op"] != "growth top-1%" else 1.0)
    return rows


def run_conv(shape: ConvShape, bs: int, sp: float, dtype, gen, dev="cuda") -> list[dict]:
    import torch.nn.functional as F
    from sparsekern.kernels import IMPLS
    from sparsekern.topology import build_topology

    kk = shape.c_in * shape.kernel ** 2
    mask2 = _block_mask(shape.c_out, kk, bs, sp, dev, gen)
    topo = build_topology(mask2, (bs, bs)).tensors
    mask = mask2.view(shape.c_out, shape.c_in, shape.kernel, shape.kernel)
    w = (torch.randn(mask.shape, generator=gen) / kk ** 0.5).to(dev, dtype)
    weff = w * mask.to(dtype)
    x = torch.randn(shape.n, shape.c_in, shape.hw, shape.hw, generator=gen).to(dev, dtype)
    conv = ([shape.stride] * 2, [shape.padding] * 2, [1, 1], 1)
    y = F.conv2d(x, weff, None, shape.stride, shape.padding)
    dy = torch.randn(y.shape, generator=gen).to(dev, dtype)
    density = mask.float().mean().item()
    flops = 2.0 * y.shape[0] * y.shape[2] * y.shape[3] * shape.c_out * kk
    rows = []

    def bench(fn):
        return _bench(fn, dev)

    def add(op, provider, t):
        rows.append(dict(model=shape.model, layer=shape.layer, op=op, block=bs, sparsity=sp,
                         density=round(density, 4), provider=provider, rows=y[:, 0].numel(),
                         in_f=kk, out_f=shape.c_out, ms=t if isinstance(t, float) else None,
                         note=None if isinstance(t, float) else t, peak_extra_mb=None,
                         flops_dense=flops, flops_active=flops * density))

    hw = [shape.hw, shape.hw]
    add("conv forward", "dense (cuDNN)",
        bench(lambda: F.conv2d(x, weff, None, shape.stride, shape.padding)))
    add("conv forward", "sparsekern", bench(lambda: IMPLS["conv2d"](x, w, mask, topo, bs, bs,
                                                                     *conv)))
    add("conv grad_input", "dense (cuDNN)",
        bench(lambda: torch.nn.grad.conv2d_input(x.shape, weff, dy, shape.stride,
                                                  shape.padding)))
    add("conv grad_input", "sparsekern",
        bench(lambda: IMPLS["conv2d_grad_input"](dy, w, mask, topo, bs, bs, hw, *conv)))
    add("conv weight_grad", "dense (cuDNN)",
        bench(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, shape.stride,
                                                   shape.padding)))
    add("conv weight_grad", "sparsekern sddmm",
        bench(lambda: IMPLS["conv2d_sddmm"](dy, x, mask, topo, bs, bs, *conv)))
    return rows


def finish(rows: list[dict]) -> None:
    """Speed-up over the dense provider of the same case, and FLOP rates."""
    dense = {}
    for r in rows:
        if r["provider"].startswith("dense") and r["ms"]:
            dense[(r["model"], r["layer"], r["op"], r["block"], r["sparsity"])] = r["ms"]
    for r in rows:
        d = dense.get((r["model"], r["layer"], r["op"], r["block"], r["sparsity"]))
        r["x_dense"] = round(d / r["ms"], 2) if d and r["ms"] else None
        r["tflops_eff"] = round(r["flops_dense"] / (r["ms"] * 1e9), 1) if r["ms"] else None
        r["tflops_act"] = round(r["flops_active"] / (r["ms"] * 1e9), 1) if r["ms"] else None
        if r["peak_extra_mb"] is not None:
            r["peak_extra_mb"] = round(r["peak_extra_mb"] / 2**20, 1)


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':10} {'layer':20} {'op':15} {'bs':>3} {'sp':>5} {'provider':26} "
            f"{'ms':>8} {'x dense':>7} {'TF/s eff':>8} {'TF/s act':>8} {'peak MB':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = f"{r['ms']:8.3f}" if r["ms"] else f"{'':8}"
        extra = "" if r["ms"] else "  " + (r["note"] or "")
        print(f"{r['model']:10} {r['layer'][:20]:20} {r['op'][:15]:15} {r['block']:>3} "
              f"{r['sparsity']:>5} {r['provider'][:26]:26} {ms} "
              f"{r['x_dense'] if r['x_dense'] is not None else '':>7} "
              f"{r['tflops_eff'] if r['tflops_eff'] is not None else '':>8} "
              f"{r['tflops_act'] if r['tflops_act'] is not None else '':>8} "
              f"{r['peak_extra_mb'] if r['peak_extra_mb'] is not None else '':>8}{extra}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and sparsities")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--json", help="write rows + machine info here")
    ap.add_argument("--csv", help="write rows here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    todo = list(cases(args.quick))
    if args.list:
        for shape, bs, sp in todo:
            print(asdict(shape), f"block={bs}", f"sparsity={sp}")
        print(f"{len(todo)} cases")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here (or TRITON_INTERPRET=1); nothing measured. "
              "Run it on a machine with an NVIDIA GPU.")
        return 0
    import triton
    import sparsekern
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for shape, bs, sp in todo:
        run = run_linear if isinstance(shape, LinearShape) else run_conv
        rows.extend(run(shape, bs, sp, dtype, gen))
    finish(rows)
    print_table(rows)
    machine = dict(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   torch=torch.__version__, triton=triton.__version__,
                   sparsekern=sparsekern.__version__, python=platform.python_version(),
                   dtype=args.dtype, tf32=torch.backends.cuda.matmul.allow_tf32)
    print(json.dumps(machine))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, rows=rows), f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
