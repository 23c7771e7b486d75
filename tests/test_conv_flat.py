"""The C++ conv ops' three sparse paths for stride-1 convolutions — the flat path (padded
channel-major input, one constant offset per weight, no im2col; row-aligned where the output
rows tile its chunks, the SDDMM reading dy in place), the batch-lane path (the flat
sums with the batch in the lanes: one pixel of a group of images per chunk) and the im2col path —
against the reference (forward, grad_input, SDDMM), each forced by ``SPARSEKERN_CONV_FLAT``
(``auto`` picks by image size and batch).

Tolerances: fp32 ``rtol=1e-4``, ``atol=1e-4·max|ref|``; bf16 ``rtol=2^-7``, ``atol=1e-2·max|ref|``
(as tests/test_cpp.py). Thread-count comparisons are exact.
"""
import pytest
import torch

from sparsekern import reference as ref
from sparsekern.topology import build_topology

try:
    from sparsekern import cpp_backend  # noqa: F401
except ImportError as e:  # pragma: no cover - CI builds the extension
    pytest.skip(f"sparsekern._C is not built: {e}", allow_module_level=True)

from test_cpp_robust import close  # noqa: E402

ops = torch.ops.sparsekern

# (N, C_in, C_out, H, W, kh, kw, padding, dilation)
SHAPES = [
    (2, 5, 7, 6, 5, 3, 3, (1, 1), (1, 1)),
    (3, 9, 17, 4, 4, 3, 3, (1, 1), (1, 1)),
    (1, 3, 4, 7, 6, 5, 3, (2, 0), (1, 2)),
    (2, 6, 9, 5, 6, 3, 2, (0, 1), (2, 1)),
    (4, 9, 11, 2, 2, 3, 3, (1, 1), (1, 1)),
    (2, 4, 6, 3, 1, 1, 1, (0, 0), (1, 1)),
    (1, 2, 3, 1, 1, 3, 3, (1, 1), (1, 1)),
    (0, 4, 6, 3, 3, 3, 3, (1, 1), (1, 1)),
    (5, 20, 40, 9, 7, 3, 3, (2, 1), (2, 1)),
    (130, 3, 5, 3, 4, 3, 3, (1, 1), (1, 1)),  # more images than one group of lanes
    # output rows that tile the flat chunks (row-aligned forward and grad_input)
    (2, 6, 10, 8, 8, 3, 3, (1, 1), (1, 1)),
    (1, 4, 8, 16, 16, 3, 3, (1, 1), (1, 1)),
    (2, 5, 6, 8, 8, 3, 3, (0, 0), (1, 1)),  # grad_input aligned, forward not
]


def _case(shape, block, layout, dtype, seed=0):
    n, cin, cout, h, w, kh, kw, pad, dil = shape
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(cout, cin, kh, kw, generator=g) < 0.35
    topo = build_topology(mask.flatten(1), block)
    weight = torch.randn(cout, cin, kh, kw, generator=g)
    weight[~mask] = float("nan")  # dormant weights must never reach a result
    if layout == "bsr":
        weight = ref.gather_blocks(weight.masked_fill(~mask, 0).flatten(1), topo.row_ptr,
                                   topo.col_idx, *block)
        kmask = torch.ones((), dtype=torch.bool).expand(cout, cin, kh, kw)
    else:
        kmask = mask
    x = torch.randn(n, cin, h, w, generator=g)
    conv = ([1, 1], list(pad), list(dil), 1)
    return (x.to(dtype), weight.to(dtype), kmask, topo.tensors, *block), conv, (h, w)


@pytest.mark.parametrize("mode", ["always", "batch", "never", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block,layout", [((1, 1), "dense"), ((2, 3), "dense"),
                                          ((4, 8), "bsr"), ((16, 16), "dense")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_grad_input_against_reference(monkeypatch, mode, shape, block, layout,
                                                  dtype):
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "never")
    monkeypatch.setenv("SPARSEKERN_CONV_FLAT", mode)
    (x, w, mask, topo, br, bc), conv, hw = _case(shape, block, layout, dtype)
    y = ops._conv2d(x, w, mask, topo, br, bc, *conv)
    close(y, ref.conv2d(x.double(), w.double(), mask, topo, br, bc, *conv).to(dtype), dtype)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx = ops._conv2d_grad_input(dy, w, mask, topo, br, bc, list(hw), *conv)
    want = ref.conv2d_grad_input(dy.double(), w.double(), mask, topo, br, bc, list(hw), *conv)
    close(dx, want.to(dtype), dtype)
    vals = ops._conv2d_sddmm(dy, x, mask, topo, br, bc, *conv)
    close(vals, ref.conv2d_sddmm(dy.double(), x.double(), mask, topo, br, bc, *conv).to(dtype),
          dtype)


@pytest.mark.parametrize("mode", ["batch", "never", "auto"])
@pytest.mark.parametrize("shape,stride", [((70, 5, 7, 8, 8, 3, 3, (1, 1), (1, 1)), [2, 2]),
                                          ((3, 4, 6, 5, 7, 3, 3, (1, 0), (1, 1)), [2, 3]),
                                          ((65, 6, 8, 4, 4, 1, 1, (0, 0), (1, 1)), [2, 2])])
@pytest.mark.parametrize("block", [(1, 1), (4, 8)])
def test_strided_forward_against_reference(monkeypatch, mode, shape, stride, block):
    """The batch-lane forward also takes strided convolutions (each chunk one output pixel)."""
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "never")
    monkeypatch.setenv("SPARSEKERN_CONV_FLAT", mode)
    (x, w, mask, topo, br, bc), conv, hw = _case(shape, block, "dense", torch.float32)
    conv = (stride, *conv[1:])
    y = ops._conv2d(x, w, mask, topo, br, bc, *conv)
    close(y, ref.conv2d(x.double(), w.double(), mask, topo, br, bc, *conv).float(), torch.float32)


@pytest.mark.parametrize("shape", [(5, 20, 40, 9, 7, 3, 3, (2, 1), (2, 1)),
                                   (3, 16, 24, 16, 16, 3, 3, (1, 1), (1, 1))])
@pytest.mark.parametrize("mode", ["always", "batch"])
@pytest.mark.parametrize("block", [(1, 1), (8, 8)])
def test_flat_path_is_thread_count_independent(monkeypatch, shape, mode, block):
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "never")
    monkeypatch.setenv("SPARSEKERN_CONV_FLAT", mode)
    (x, w, mask, topo, br, bc), conv, hw = _case(shape, block, "dense", torch.float32)
    dy = torch.randn_like(ops._conv2d(x, w, mask, topo, br, bc, *conv))
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append((ops._conv2d(x, w, mask, topo, br, bc, *conv),
                         ops._conv2d_grad_input(dy, w, mask, topo, br, bc, list(hw), *conv),
                         ops._conv2d_sddmm(dy, x, mask, topo, br, bc, *conv)))
    finally:
        torch.set_num_threads(threads)
    for got in outs[1:]:
        for a, b in zip(got, outs[0]):
            assert torch.equal(a, b)


def test_flat_mode_is_validated(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "never")
    monkeypatch.setenv("SPARSEKERN_CONV_FLAT", "sometimes")
    (x, w, mask, topo, br, bc), conv, _ = _case(SHAPES[0], (1, 1), "dense", torch.float32)
    with pytest.raises(RuntimeError, match="SPARSEKERN_CONV_FLAT must be never, always, batch or auto"):
        ops._conv2d(x, w, mask, topo, br, bc, *conv)
