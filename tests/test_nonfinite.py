"""One meaning of NaN/inf on every backend and path (the reference's): dormant weights are
exact zeros (NaN/inf stored there never reach a result); a NaN/inf in the activations propagates
as in the dense op on the effective weight (NaN·0 = NaN), whether the kernel's sparse path or
its dense fallback runs."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import ops
from sparsekern.nn.base import random_mask
from sparsekern.topology import build_topology

BACKENDS = ("reference", "cpp", "triton")


def _nan_pattern_equal(a, b):
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.95, 0.3])  # sparse path / the C++ dense fallback
@pytest.mark.parametrize("block", [(1, 1), (4, 4)])
def test_linear_activation_nan_inf(backend, sparsity, block, monkeypatch):
    g = torch.Generator().manual_seed(0)
    m, k, b = 24, 40, 6
    mask = random_mask((m, k), block, sparsity, g)
    topo = build_topology(mask, block).tensors
    w = torch.randn(m, k, generator=g).masked_fill(~mask, float("nan"))
    x = torch.randn(b, k, generator=g)
    dead = int((~mask.any(0)).nonzero()[0]) if (~mask.any(0)).any() else 0
    x[1, dead] = float("nan")   # a column no active weight may read
    x[3, 5] = float("inf")
    dy = torch.randn(b, m, generator=g)
    dy[2, 7] = float("-inf")
    weff = torch.where(mask, w, 0.0)
    with sk.backend(backend):
        y = ops.bsr_mm(x, w, mask, topo, *block)
        dx = ops.bsr_mm_t(dy, w, mask, topo, *block)
    _nan_pattern_equal(y, F.linear(x.double(), weff.double()).float())
    _nan_pattern_equal(dx, (dy.double() @ weff.double()).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.95, 0.3])
def test_conv_activation_nan(backend, sparsity):
    g = torch.Generator().manual_seed(1)
    layer = sk.SparseConv2d(3, 5, 3, padding=1, sparsity=sparsity)
    with torch.no_grad():
        layer.weight.masked_fill_(~layer.mask, float("inf"))
    x = torch.randn(3, 3, 6, 7, generator=g)
    x[1, 2, 0, 0] = float("nan")
    with sk.backend(backend):
        y = layer(x)
    want = F.conv2d(x.double(), torch.where(layer.mask, layer.weight, 0.0).double(),
                    layer.bias.double(), padding=1).float()
    _nan_pattern_equal(y.detach(), want)
    assert torch.isfinite(y[[0, 2]]).all()


def test_backend_env_names_the_reason():
    """SPARSEKERN_BACKEND naming a backend this machine lacks: ops raise with the reason."""
    if sk.available_backends()["cuda"] == "ok":
        pytest.skip("this machine has the CUDA backend")
    code = ("import torch, sparsekern as sk\n"
            "try:\n"
            "    sk.SparseLinear(4, 3)(torch.randn(2, 4))\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', e)\n")
    env = {**os.environ, "SPARSEKERN_BACKEND": "cuda"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RAISED sparsekern backend 'cuda'" in out.stdout and "unavailable" in out.stdout
