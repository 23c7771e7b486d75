"""Whole training steps of real models on the CPU: dense PyTorch vs ``sk.sparsify``.

    python benchmarks/bench_models.py [--quick] [--full] [--models resnet18,gpt2] \
        [--variants uniform:0.9:16:bsr,erk:0.9:1:dense] [--rounds 5] [--threads 2] \
        [--no-memory] [--dense-bf16] [--profile N] [--out benchmarks/results/bench_models.json]

A step is forward, loss, backward and an SGD step (momentum 0.9), as a user trains. Models:
CIFAR ResNet-18 (3×3 stem, batch 64, 32×32), VGG-16 for CIFAR (batch 64), 4 GPT-2-small blocks
(d 768, 12 heads, 8×128 tokens, ``F.scaled_dot_product_attention``, nn.Linear projections),
an MLP of 3×Linear(4096) (batch 256), and the demo's ``ResNetSmall`` at the
``sparsekern.train`` defaults (digits 1×8×8, width 32, batch 64, SGD nesterov, wd 5e-4).

A variant is ``distribution:sparsity:block:layout[:bf16]`` (``uniform:0.9:16:bsr``), passed to
``sk.sparsify(model, sparsity, distribution=..., block_size=(block, block), layout=...)``
with its defaults otherwise (the first conv stays dense); ``dense[:bf16]`` is the baseline.
``rigl:...`` times the RigL update step on its own: ``dst.RigL`` with ``delta_t=1``, so every
step arms the fused growth top-k request before the forward and installs new masks after
the backward (the optimizer step is skipped on update steps, as in RigL); its ratio is also
given to the plain sparse step of the same configuration. A bf16 row is compared with dense
bf16 where the CPU has native bf16 (avx512_bf16/AMX); elsewhere PyTorch's dense bf16 GEMM is
a slow fallback (seconds per product), so it is compared with dense fp32 (``dense_baseline``)
unless ``--dense-bf16``. ``demo-rigl`` is the demo's own
step: ``dst.RigL`` with the demo defaults (ERK 90%, unstructured, ``delta_t=20``), timed over
blocks of 20 steps so one mask update is in every block.

Timing: every provider of a model is built once and kept; one round times each in turn
(dense first), ``--rounds`` rounds; a provider's figure is the median of its round times
(``steps_per_round`` consecutive steps per round, their mean per step). Ratios are dense
median / variant median in the same process. Peak memory: one child process per model builds
each provider alone, runs two warm-up steps, then reads the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs) over one more step; ``peak_step_mib`` is that
mark minus the resident set before the step (activations, gradients, workspaces: the state
that lives across steps is not in it), ``state_mib`` the bytes of parameters, buffers and
optimizer state. glibc is told to mmap every block of 64 KiB or more, so freed memory cannot
hide an allocation. ``--profile N`` prints torch.profiler's top N ops (self CPU time) of one
step of each selected provider instead of timing.

Default run: the issue's grid (90% uniform unstructured / 16×16 / 32×32, ERK, 95%), the RigL
update step on ResNet-18, one bf16 row (MLP), and the demo; ``--full`` runs every combination
(tens of minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import machine_info, write_json  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.models import BasicBlock, ResNetSmall  # noqa: E402

ROW_COLUMNS = ("model", "variant", "kind", "distribution", "sparsity", "block_size", "layout",
               "dtype", "batch", "density", "steps_per_round", "step_ms", "step_ms_rounds",
               "dense_baseline", "speedup_vs_dense", "ratio_to_sparse_step", "peak_step_mib",
               "state_mib")
LR = 1e-3


# --------------------------------------------------------------------------- models
class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3×3 stem (no max-pool), stages of two blocks at widths w, 2w, 4w, 8w."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG-16 for CIFAR: 13 3×3 convs with batch norm, five max-pools, Linear(512w/64, 10)."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = v * width // 64
                layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class GPT2Block(nn.Module):
    """GPT-2 block (pre-norm): causal self-attention through ``F.scaled_dot_product_attention``
    and a 4× GELU MLP, every projection an ``nn.Linear`` so ``sk.sparsify`` swaps it."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


def mlp(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))


@dataclass(frozen=True)
class ModelCase:
    """A model, its input batch ``(batch, *sample)`` and loss; ``tiny`` for ``--quick``."""

    name: str
    batch: int
    sample: tuple
    loss: str  # "ce" (10 classes) or "mse" (against a random target of the output's shape)
    steps_per_round: int = 1
    demo_optimizer: bool = False


def build_model(name: str, tiny: bool) -> nn.Module:
    if name == "resnet18":
        return ResNet18(8 if tiny else 64)
    if name == "vgg16":
        return VGG16(8 if tiny else 64)
    if name == "gpt2":
        d, h = (64, 4) if tiny else (768, 12)
        return nn.Sequential(*[GPT2Block(d, h) for _ in range(4)])
    if name == "mlp":
        return mlp(128 if tiny else 4096)
    if name == "demo":
        return ResNetSmall(1, 10, 8 if tiny else 32)
    raise ValueError(f"unknown model {name!r}")


def model_case(name: str, tiny: bool) -> ModelCase:
    if name in ("resnet18", "vgg16"):
        hw = 16 if tiny and name == "resnet18" else 32  # VGG's five pools need 32x32
        return ModelCase(name, 4 if tiny else 64, (3, hw, hw), "ce")
    if name == "gpt2":
        return ModelCase(name, 2 if tiny else 8, (16, 64) if tiny else (128, 768), "mse")
    if name == "mlp":
        return ModelCase(name, 8 if tiny else 256, (128,) if tiny else (4096,), "mse")
    if name == "demo":
        return ModelCase(name, 8 if tiny else 64, (1, 8, 8), "ce", steps_per_round=20,
                         demo_optimizer=True)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


MODELS = ("resnet18", "vgg16", "gpt2", "mlp", "demo")


# --------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """What one row runs: ``kind`` ``dense`` (the baseline), ``step`` (``sk.sparsify``),
    ``rigl`` (the RigL update step) or ``demo-rigl`` (the demo's RigL step)."""

    kind: str
    distribution: Optional[str] = None
    sparsity: Optional[float] = None
    block: int = 1
    layout: str = "dense"
    dtype: str = "float32"

    @property
    def name(self) -> str:
        if self.kind == "dense":
            base = "dense"
        else:
            blk = "unstructured" if self.block == 1 else f"{self.block}x{self.block}"
            base = f"{self.distribution} {self.sparsity:.0%} {blk} {self.layout}"
            if self.kind != "step":
                base = f"{self.kind}: {base}"
        return base + (" bf16" if self.dtype == "bfloat16" else "")

    def plain(self) -> "Variant":
        """The plain sparse step (or dense baseline) this variant is compared with."""
        return replace(self, kind="step")


DEMO_RIGL = Variant("demo-rigl", "erk", 0.9, 1, "dense")


def parse_variant(spec: str) -> Variant:
    """``dense[:bf16]``, ``[rigl:]dist:sparsity:block:layout[:bf16]`` or ``demo-rigl``."""
    parts = spec.strip().split(":")
    dtype = "float32"
    if parts[-1] in ("bf16", "fp32"):
        dtype = "bfloat16" if parts.pop() == "bf16" else "float32"
    if parts == ["dense"]:
        return Variant("dense", dtype=dtype)
    if parts == ["demo-rigl"]:
        return replace(DEMO_RIGL, dtype=dtype)
    kind = "step"
    if parts and parts[0] == "rigl":
        kind = parts.pop(0)
    if len(parts) != 4:
        raise ValueError(f"variant {spec!r}: expected dense[:bf16] or "
                         "[rigl:]distribution:sparsity:block:layout[:bf16]")
    dist, s, b, layout = parts
    if dist not in ("uniform", "erk"):
        raise ValueError(f"variant {spec!r}: distribution must be uniform or erk, got {dist!r}")
    if layout not in ("dense", "bsr"):
        raise ValueError(f"variant {spec!r}: layout must be dense or bsr, got {layout!r}")
    try:
        sparsity, block = float(s), int(b)
    except ValueError:
        raise ValueError(f"variant {spec!r}: sparsity must be a float and block an int") from None
    if not 0 <= sparsity < 1 or block < 1:
        raise ValueError(f"variant {spec!r}: sparsity must be in [0, 1) and block >= 1")
    return Variant(kind, dist, sparsity, block, layout, dtype)


def _v(spec: str) -> Variant:
    return parse_variant(spec)


# The default run: the issue's 90% uniform grid, ERK, one 95% row, the RigL update step on
# ResNet-18 and a bf16 row on the MLP; the demo with its own RigL step.
DEFAULT_VARIANTS = {
    "resnet18": ["uniform:0.9:1:dense", "uniform:0.9:16:dense", "uniform:0.9:16:bsr",
                 "uniform:0.9:32:bsr", "erk:0.9:1:dense", "uniform:0.95:16:bsr",
                 "rigl:uniform:0.9:1:dense"],
    "vgg16": ["uniform:0.9:1:dense", "uniform:0.9:16:bsr", "uniform:0.9:32:bsr",
              "erk:0.9:1:dense"],
    "gpt2": ["uniform:0.9:1:dense", "uniform:0.9:16:bsr", "uniform:0.9:32:bsr",
             "erk:0.9:1:dense"],
    "mlp": ["uniform:0.9:1:dense", "uniform:0.9:16:bsr", "uniform:0.9:32:bsr",
            "uniform:0.95:32:bsr", "uniform:0.9:32:bsr:bf16"],
    "demo": ["erk:0.9:1:dense", "demo-rigl"],
}
QUICK_VARIANTS = {"resnet18": ["uniform:0.9:1:dense", "uniform:0.9:16:bsr",
                               "rigl:uniform:0.9:1:dense"],
                  "vgg16": ["uniform:0.9:16:bsr"], "gpt2": ["uniform:0.9:16:bsr"],
                  "mlp": ["uniform:0.9:16:bsr", "uniform:0.9:16:bsr:bf16"],
                  "demo": ["erk:0.9:1:dense", "demo-rigl"]}


def full_variants(model: str) -> list[str]:
    """Every combination: 90/95% × uniform/ERK × unstructured, 16×16 and 32×32 on both
    layouts (unstructured on the dense layout), the RigL update step, and bf16 rows."""
    out = [f"{d}:{s}:{b}:{lay}" for s in (0.9, 0.95) for d in ("uniform", "erk")
           for b, lay in ((1, "dense"), (16, "dense"), (16, "bsr"), (32, "dense"), (32, "bsr"))]
    out += ["rigl:uniform:0.9:1:dense", "rigl:uniform:0.9:16:bsr", "uniform:0.9:16:bsr:bf16",
            "uniform:0.9:32:bsr:bf16"]
    if model == "demo":
        out.append("demo-rigl")
    return out


def baseline_of(v: Variant, dense_bf16: bool) -> Variant:
    """The dense row ``v`` is compared with: dense in ``v``'s dtype, but dense fp32 for bf16
    on a CPU without native bf16 (unless ``dense_bf16``)."""
    if v.dtype == "bfloat16" and not (dense_bf16 or common.native_bf16()):
        return Variant("dense")
    return Variant("dense", dtype=v.dtype)


def with_baselines(variants: list[Variant], dense_bf16: bool = False) -> list[Variant]:
    """``variants`` in order with the fp32 dense baseline first, the baseline of every other
    row (:func:`baseline_of`) and the plain sparse step of every RigL row, each once."""
    need = [Variant("dense")]
    for v in variants:
        need.append(baseline_of(v, dense_bf16) if v.kind != "dense" else v)
        if v.kind in ("rigl", "demo-rigl"):
            need.append(v.plain())
        need.append(v)
    seen, out = set(), []
    for v in need:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


# --------------------------------------------------------------------------- providers
@dataclass
class Provider:
    """A built model with its optimizer (and DST method), ready to step."""

    variant: Variant
    model: nn.Module
    opt: torch.optim.Optimizer
    method: object
    x: torch.Tensor
    target: torch.Tensor
    loss: str

    def step(self) -> None:
        out = self.model(self.x)
        loss = (F.cross_entropy(out.float(), self.target) if self.loss == "ce"
                else F.mse_loss(out.float(), self.target))
        loss.backward()
        if self.method is None:
            self.opt.step()
        else:
            self.method.step()
        self.opt.zero_grad(set_to_none=True)

    def density(self) -> Optional[float]:
        """Active fraction of the weights of the sparse layers (None when there are none)."""
        active = total = 0
        for m in self.model.modules():
            if isinstance(m, (sk.SparseLinear, sk.SparseConv2d)):
                active += int(m.mask.sum())
                total += m.mask.numel()
        return active / total if total else None

    def state_bytes(self) -> int:
        """Bytes of parameters, buffers and optimizer state (what lives across steps)."""
        seen, n = set(), 0
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for st in self.opt.state.values():
            tensors += [v for v in st.values() if torch.is_tensor(v)]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel() * t.element_size()
        return n


def build_provider(model_name: str, v: Variant, tiny: bool, seed: int = 0) -> Provider:
    """The model of ``model_name`` (same initial weights and batch for every variant)
    transformed as ``v`` says, with its optimizer."""
    case = model_case(model_name, tiny)
    dtype = getattr(torch, v.dtype)
    torch.manual_seed(seed)
    model = build_model(model_name, tiny).to(dtype).train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((case.batch, *case.sample), generator=gen).to(dtype)
    if model_name == "demo":
        x = torch.rand((case.batch, *case.sample), generator=gen).to(dtype)
    with torch.no_grad():
        out_shape = model(x[:1]).shape[1:]
    target = (torch.randint(0, 10, (case.batch,), generator=gen) if case.loss == "ce"
              else torch.randn((case.batch, *out_shape), generator=gen))

    def optimizer(params):
        if case.demo_optimizer:  # sparsekern.train's optimizer
            return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4, nesterov=True)
        return torch.optim.SGD(params, lr=LR, momentum=0.9)

    method = None
    bs = (v.block, v.block)
    if v.kind == "dense":
        opt = optimizer(model.parameters())
    elif v.kind == "step":
        sk.sparsify(model, v.sparsity, distribution=v.distribution, block_size=bs,
                    layout=v.layout, seed=seed)
        opt = optimizer(model.parameters())
    elif v.kind in ("rigl", "demo-rigl"):
        opt = optimizer(model.parameters())
        delta_t = 1 if v.kind == "rigl" else case.steps_per_round
        method = sk.dst.RigL(model, opt, total_steps=10 ** 9, sparsity=v.sparsity,
                             distribution=v.distribution, delta_t=delta_t, block_size=bs,
                             layout=v.layout, seed=seed)
    else:
        raise ValueError(f"unknown variant kind {v.kind!r}")
    return Provider(v, model, opt, method, x, target, case.loss)


# --------------------------------------------------------------------------- timing
def time_providers(providers: dict[Variant, Provider], rounds: int, steps: int) -> dict:
    """Per provider, the per-step time (s) of each round: ``steps`` consecutive steps timed as
    one block; providers interleaved within every round. One warm-up block each first."""
    for p in providers.values():
        for _ in range(steps):
            p.step()
    per = {v: [] for v in providers}
    for _ in range(rounds):
        for v, p in providers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                p.step()
            per[v].append((time.perf_counter() - t0) / steps)
    return per


# --------------------------------------------------------------------------- peak memory
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_bytes_of(fn: Callable[[], object]) -> Optional[int]:
    """Resident-set high-water mark over ``fn()`` minus the resident set before it, or None
    where the mark cannot be reset (no /proc/self/clear_refs)."""
    gc.collect()
    try:
        before = _rss("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    fn()
    return _rss("VmHWM:") - before


def memory_child(model_name: str, specs: list[str], tiny: bool, threads: int) -> dict:
    """Peak step memory and state of each variant, built one at a time (run in a child)."""
    torch.set_num_threads(threads)
    out = {}
    for spec in specs:
        v = parse_variant(spec)
        p = build_provider(model_name, v, tiny)
        for _ in range(2):
            p.step()
        peak = peak_bytes_of(p.step)
        out[spec] = {"peak_step_bytes": peak, "state_bytes": p.state_bytes()}
        del p
        gc.collect()
    return out


def spec_of(v: Variant) -> str:
    if v.kind == "dense":
        s = "dense"
    elif v.kind == "demo-rigl":
        s = "demo-rigl"
    else:
        s = f"{v.distribution}:{v.sparsity}:{v.block}:{v.layout}"
        if v.kind == "rigl":
            s = "rigl:" + s
    return s + (":bf16" if v.dtype == "bfloat16" else "")


def measure_memory(model_name: str, variants: list[Variant], tiny: bool, threads: int) -> dict:
    """Run :func:`memory_child` in a fresh process (glibc mmaps blocks >= 64 KiB there)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", model_name,
           "--threads", str(threads), "--variants", ",".join(spec_of(v) for v in variants)]
    if tiny:
        cmd.append("--quick")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()
        print(f"  peak memory of {model_name} failed: {err[-1] if err else res.returncode}",
              file=sys.stderr)
        return {}
    raw = json.loads(res.stdout.strip().splitlines()[-1])
    return {parse_variant(k): v for k, v in raw.items()}


# --------------------------------------------------------------------------- driver
def run_model(model_name: str, variants: list[Variant], tiny: bool, rounds: int, threads: int,
              memory: bool, dense_bf16: bool = False) -> list[dict]:
    case = model_case(model_name, tiny)
    todo = with_baselines(variants, dense_bf16)
    providers = {v: build_provider(model_name, v, tiny) for v in todo}
    times = time_providers(providers, rounds, case.steps_per_round)
    med = {v: statistics.median(t) for v, t in times.items()}
    mem = measure_memory(model_name, todo, tiny, threads) if memory else {}
    rows = []
    for v in todo:
        base = v if v.kind == "dense" else baseline_of(v, dense_bf16)
        m = mem.get(v, {})
        peak, state = m.get("peak_step_bytes"), m.get("state_bytes")
        rows.append({
            "model": model_name, "variant": v.name, "kind": v.kind,
            "distribution": v.distribution, "sparsity": v.sparsity,
            "block_size": [v.block, v.block], "layout": v.layout, "dtype": v.dtype,
            "batch": case.batch, "density": providers[v].density(),
            "steps_per_round": case.steps_per_round, "step_ms": med[v] * 1e3,
            "step_ms_rounds": [t * 1e3 for t in times[v]],
            "dense_baseline": base.name, "speedup_vs_dense": med[base] / med[v],
            "ratio_to_sparse_step": (med[v] / med[v.plain()]
                                     if v.kind in ("rigl", "demo-rigl") else None),
            "peak_step_mib": None if peak is None else peak / 2 ** 20,
            "state_mib": None if state is None else state / 2 ** 20,
        })
    del providers
    gc.collect()
    return rows


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'model':9s} {'variant':42s} {'density':>7s} {'step ms':>9s} {'x dense':>8s} "
            f"{'vs step':>8s} {'peak MiB':>9s} {'state MiB':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rs = r["ratio_to_sparse_step"]
        lines.append(f"{r['model']:9s} {r['variant']:42s} {_f(r['density'], '7.3f')} "
                     f"{r['step_ms']:9.2f} {r['speedup_vs_dense']:7.2f}x "
                     f"{'-' if rs is None else f'{rs:.2f}x':>8s} "
                     f"{_f(r['peak_step_mib'], '9.1f')} {_f(r['state_mib'], '9.1f')}")
    return "\n".join(lines)


def markdown_table(payload: dict) -> str:
    """The README's table: machine line, then one row per variant."""
    m = payload["machine"]
    isa = (m.get("cpp_kernels") or {}).get("isa", "?")
    lines = [f"Machine: {m.get('cpu', '?')}, {m.get('threads', '?')} threads, C++ kernels "
             f"{isa}, torch {m.get('torch', '?')}; command `{payload.get('command')}`; "
             f"medians of {payload.get('rounds')} interleaved rounds; × dense = dense step / "
             "variant step in the same process.", "",
             "| model | variant | step ms | × dense | peak step MiB | state MiB |",
             "|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        extra = (f" ({r['ratio_to_sparse_step']:.2f}× the sparse step)"
                 if r["ratio_to_sparse_step"] else "")
        if r["dtype"] == "bfloat16" and r["dense_baseline"] == "dense":
            extra += " (vs dense fp32: no native bf16)"
        lines.append(f"| {r['model']} | {r['variant']} | {r['step_ms']:.1f} | "
                     f"{r['speedup_vs_dense']:.2f}×{extra} | {_f(r['peak_step_mib'], '.1f')} | "
                     f"{_f(r['state_mib'], '.1f')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants for every model, e.g. "
                        "uniform:0.9:16:bsr,rigl:uniform:0.9:1:dense,dense:bf16")
    p.add_argument("--full", action="store_true", help="every combination (long)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, "
                   "quick 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--dense-bf16", action="store_true",
                   help="compare bf16 rows with dense bf16 even on a CPU without native bf16")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_models.json"))
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="instead of timing: torch.profiler of one step (after one warm-up "
                        "step) of each provider, the top N ops by self CPU time")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--models: expected a comma-separated subset of {MODELS}, got {args.models!r}")
    args.models = models
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.variants is not None:
        try:
            args.variants = [parse_variant(s) for s in args.variants.split(",") if s.strip()]
        except ValueError as e:
            p.error(f"--variants: {e}")
        if any(v.kind == "demo-rigl" for v in args.variants) and models != ["demo"] \
                and not args.memory_child:
            p.error("--variants: demo-rigl runs on --models demo only")
    return args


def variants_for(model: str, args) -> list[Variant]:
    if args.variants is not None:
        return list(args.variants)
    if args.full:
        return [_v(s) for s in full_variants(model)]
    return [_v(s) for s in (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)[model]]


def profile(model_name: str, variants: list[Variant], tiny: bool, top: int) -> None:
    """Print torch.profiler's top ``top`` ops by self CPU time of one step of each variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for v in variants:
        p = build_provider(model_name, v, tiny)
        p.step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            p.step()
        print(f"{model_name}, {v.name}: one step, {torch.get_num_threads()} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
        del p
        gc.collect()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        specs = [spec_of(v) for v in args.variants]
        print(json.dumps(memory_child(args.memory_child, specs, args.quick, args.threads)))
        return 0
    torch.set_num_threads(args.threads)
    if args.profile:
        for model in args.models:
            profile(model, variants_for(model, args), args.quick, args.profile)
        return 0
    rounds = args.rounds or (1 if args.quick else 5)
    t0 = time.time()
    load_start = os.getloadavg()
    rows = []
    print(f"whole training steps, {args.threads} threads, medians of {rounds} interleaved "
          f"rounds; x dense = dense step / variant step", flush=True)
    for model in args.models:
        tm = time.time()
        new = run_model(model, variants_for(model, args), args.quick, rounds, args.threads,
                        not args.no_memory, args.dense_bf16)
        rows += new
        print(table(new), flush=True)
        print(f"  ({model}: {time.time() - tm:.0f} s)\n", flush=True)
    machine = machine_info(args.threads)
    machine["load_average_at_start"] = list(load_start)
    machine["load_average_at_end"] = list(os.getloadavg())
    payload = {"command": " ".join(["bench_models.py"] + list(argv if argv is not None
                                                              else sys.argv[1:])),
               "machine": machine, "rounds": rounds, "quick": args.quick, "lr": LR,
               "memory_method": None if args.no_memory else (
                   "VmHWM - VmRSS over one step (after two warm-up steps) in a child process "
                   "per model, one provider built at a time, /proc/self/clear_refs reset, "
                   "MALLOC_MMAP_THRESHOLD_=65536"),
               "columns": list(ROW_COLUMNS), "rows": rows, "wall_s": time.time() - t0}
    path = write_json(args.out, payload)
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
