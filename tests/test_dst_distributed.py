"""Two-process (gloo, CPU) data-parallel DST under DDP: masks identical on both ranks and equal
to one process training on the concatenated batch (also when the ranks accumulate two
micro-batches, the first under ``no_sync``, through a non-reentrant checkpoint)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _dist import run_ranks

WORLD = 2
STEPS = 7
# (method, dp_growth, extra kwargs)
CONFIGS = [
    ("RigL", "gather", {}),
    ("RigL", "allreduce", {}),
    ("DSTEE", "auto", {}),
    ("BiDST", "auto", {"refresh_every": 2, "search_space": 0.2, "lam": 1e-2, "tau": 0.01}),
    ("RigL", "gather", {"_loop": "ckpt_accum"}),
]


def _model():
    from sparsekern.nn import SparseConv2d, SparseLinear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            kw = dict(dtype=torch.float64)
            self.conv = SparseConv2d(2, 4, 3, padding=1, sparsity=0.5, **kw)
            self.fc1 = SparseLinear(64, 16, sparsity=0.75, **kw)
            self.fc2 = SparseLinear(16, 3, sparsity=0.5, block_size=(2, 2), layout="bsr", **kw)

        def forward(self, x):
            h = F.relu(self.conv(x)).flatten(1)
            if getattr(self, "ckpt", False):
                h = torch.utils.checkpoint.checkpoint(self.fc1, h, use_reentrant=False)
            else:
                h = self.fc1(h)
            return self.fc2(F.relu(h))

    return Net()


def _global_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    return (torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g))


def _train(method, growth, extra, rank=0, world=1):
    """Masks after STEPS steps; with world > 1 each rank trains on its half under DDP
    (``extra["_loop"] == "ckpt_accum"``: as two micro-batches through a checkpoint)."""
    import contextlib

    import sparsekern as sk
    from sparsekern import dst

    extra = dict(extra)
    accum = extra.pop("_loop", None) == "ckpt_accum" and world > 1

    sk.set_backend("reference")
    torch.manual_seed(0)
    model = _model()
    model.ckpt = accum
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    kw = {"delta_t": 2} if method != "BiDST" else {}
    m = getattr(dst, method)(model, opt, total_steps=STEPS + 3, dp_growth=growth,
                             **{**kw, **extra})
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    for t in range(1, STEPS + 1):
        x, y = _global_batch(t)
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        if accum:
            for j, (xm, ym) in enumerate(zip(x.chunk(2), y.chunk(2))):
                with net.no_sync() if j == 0 else contextlib.nullcontext():
                    (F.cross_entropy(net(xm), ym) / 2).backward()
        else:
            F.cross_entropy(net(x), y).backward()
        m.step()
        opt.zero_grad()
    assert m.n_updates >= 2
    return {ls.name: ls.module.mask.clone() for ls in m.layers}


def _train_all(rank, world):
    return [_train(meth, growth, extra, rank, world) for meth, growth, extra in CONFIGS]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_masks_match_single_process(tmp_path):
    ranks = [res for res, _ in run_ranks(_train_all, tmp_path, WORLD)]
    for i, (meth, growth, extra) in enumerate(CONFIGS):
        single = _train(meth, growth, extra)
        for name, mask in single.items():
            for r in range(WORLD):
                assert torch.equal(ranks[r][i][name], mask), (meth, growth, name, r)
