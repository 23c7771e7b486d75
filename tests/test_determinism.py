"""Bit-for-bit reproducibility on the C++ backend at a fixed thread count (2 threads): identical
runs give identical weights and masks, and a run resumed from a checkpoint equals the run that
was never interrupted — conv models included (their weight-gradient reductions used to follow
a dynamic thread schedule)."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import dst

STEPS, STOP = 8, 3  # delta_t=2: steps 4, 6 and 8 are update steps after the resume


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.c0(x))
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def _batch(t):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)


def _fresh(method, block):
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cls = {"rigl": dst.RigL, "set": dst.SET}[method]
    m = cls(model, opt, total_steps=5 * STEPS, sparsity=0.8, distribution="uniform", delta_t=2,
            block_size=block, seed=1)
    return model, opt, m


def _train(model, opt, m, t0, t1):
    for t in range(t0, t1 + 1):
        x, y = _batch(t)
        F.cross_entropy(model(x), y).backward()
        m.step()
        opt.zero_grad()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def two_threads_cpp():
    if sk.available_backends()["cpp"] != "ok":
        pytest.fail(f"cpp backend unavailable: {sk.available_backends()['cpp']}")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    sk.set_backend("cpp")
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("block", [(1, 1), (4, 4)])
@pytest.mark.usefixtures("two_threads_cpp")
def test_identical_runs_and_resume_are_bit_identical(block):
    model, opt, m = _fresh("rigl", block)
    _train(model, opt, m, 1, STEPS)
    want = _state(model)
    assert m.stats()["n_updates"] >= 3

    model, opt, m = _fresh("rigl", block)
    _train(model, opt, m, 1, STEPS)
    again = _state(model)
    for k in want:
        assert torch.equal(again[k], want[k]), f"second run differs in {k}"

    model, opt, m = _fresh("rigl", block)
    _train(model, opt, m, 1, STOP)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dst": m.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2, opt2, m2 = _fresh("rigl", block)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    m2.load_state_dict(ck["dst"])
    _train(model2, opt2, m2, STOP + 1, STEPS)
    got = _state(model2)
    for k in want:
        assert torch.equal(got[k], want[k]), f"resumed run differs in {k}"
