"""Two-process (gloo, CPU) DST under FSDP2 (``fully_shard`` of every sparse layer and the root):
masks identical on both ranks and equal to one process training on the concatenated batch, as
under DDP (``test_dst_distributed.py``). Between forward and backward FSDP2 holds each weight as
a ``DTensor`` sharded on dim 0: drop scores gather it, resets touch each rank's own rows, growth
ranks the gathered ``X``/``dY`` without the weight."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _dist import run_ranks

WORLD = 2
STEPS = 7
CONFIGS = [
    ("RigL", "gather", {}),
    ("SET", "auto", {}),
    ("DSTEE", "gather", {}),
    ("BiDST", "auto", {"refresh_every": 2, "search_space": 0.2, "lam": 1e-2, "tau": 0.01}),
]


def _model():
    from sparsekern.nn import SparseConv2d, SparseLinear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            kw = dict(dtype=torch.float64)
            self.conv = SparseConv2d(2, 4, 3, padding=1, sparsity=0.5, **kw)
            self.fc1 = SparseLinear(64, 16, sparsity=0.75, **kw)
            self.fc2 = SparseLinear(16, 4, sparsity=0.5, block_size=(2, 2), layout="bsr", **kw)

        def forward(self, x):
            h = F.relu(self.conv(x)).flatten(1)
            return self.fc2(F.relu(self.fc1(h)))

    return Net()


def _global_batch(step):
    g = torch.Generator().manual_seed(700 + step)
    return (torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (8,), generator=g))


def _train(method, growth, extra, rank=0, world=1):
    """Masks after STEPS steps; with world > 1 each rank trains its half under FSDP2."""
    import sparsekern as sk
    from sparsekern import dst

    sk.set_backend("reference")
    torch.manual_seed(0)
    model = _model()
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        for layer in (model.conv, model.fc1, model.fc2):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    kw = {"delta_t": 2} if method != "BiDST" else {}
    m = getattr(dst, method)(model, opt, total_steps=STEPS + 3, dp_growth=growth,
                             **{**kw, **extra})
    for t in range(1, STEPS + 1):
        x, y = _global_batch(t)
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        F.cross_entropy(model(x), y).backward()
        m.step()
        opt.zero_grad()
    assert m.n_updates >= 2
    return {ls.name: ls.module.mask.clone() for ls in m.layers}


def _train_all(rank, world):
    return [_train(meth, growth, extra, rank, world) for meth, growth, extra in CONFIGS]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_masks_match_single_process(tmp_path):
    out = run_ranks(_train_all, tmp_path, WORLD)
    assert not [w for _, ws in out for w in ws if "view tensor" in w]  # no view tensors returned
    ranks = [{"masks": res} for res, _ in out]
    for i, (meth, growth, extra) in enumerate(CONFIGS):
        single = _train(meth, growth, extra)
        for name, mask in single.items():
            for r in range(WORLD):
                assert torch.equal(ranks[r]["masks"][i][name], mask), (meth, growth, name, r)
