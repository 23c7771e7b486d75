"""``sk.explain``: the backend, kernel path, ISA and fallback of an op call come from the same
decision functions the dispatch uses; the README's backend table is generated from
``sparsekern.explain.TABLE``."""
import re
from pathlib import Path

import pytest
import torch

import sparsekern as sk
from sparsekern import cpp_backend, ops, spec
from sparsekern.explain import backend_table_markdown
from sparsekern.topology import build_topology

README = Path(__file__).resolve().parents[1] / "README.md"


def _linear(density, block=(1, 1), m=64, k=48, b=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, k, generator=g) < density
    topo = build_topology(mask, block).tensors
    x = torch.randn(b, k, generator=g, dtype=dtype)
    w = torch.randn(m, k, generator=g, dtype=dtype)
    return x, w, mask, topo, *block


def test_readme_backend_section_is_generated():
    text = README.read_text()
    found = re.search(r"<!-- backend-table:start -->\n(.*?)<!-- backend-table:end -->", text,
                      re.S)
    assert found is not None, "README.md lacks the backend-table markers"
    assert found.group(1) == backend_table_markdown()
    assert sk.explain.backend_table_markdown() == backend_table_markdown()


def test_backend_resolution():
    args = _linear(0.1)
    with sk.backend("cpp"):
        e = sk.explain("bsr_mm", *args)
        assert e.backend == "cpp" and "set_backend('cpp')" in e.backend_reason
    with sk.backend("reference"):
        e = sk.explain(ops.bsr_mm, *args)
        assert e.backend == "reference" and e.runs == "sparsekern.reference.bsr_mm"
    assert sk.explain("bsr_mm", *args).backend == ops.resolve_backend(args[0].device)


def test_arguments_bind_like_the_op():
    x, w, mask, topo, br, bc = _linear(0.1)
    pos = sk.explain("bsr_mm", x, w, mask, topo, br, bc)
    kw = sk.explain("bsr_mm", x, w, mask=mask, topo=list(topo), br=br, bc=bc)
    assert pos == kw
    with pytest.raises(ValueError, match="op must be one of"):
        sk.explain("bsr_mmm", x, w, mask, topo, br, bc)
    with pytest.raises(TypeError, match="missing arguments \\['bc'\\]"):
        sk.explain("bsr_mm", x, w, mask, topo, br)
    with pytest.raises(TypeError, match="unexpected or repeated arguments \\['x'\\]"):
        sk.explain("bsr_mm", x, w, mask, topo, br, bc, x=x)


needs_cpp = pytest.mark.skipif("bsr_mm" not in getattr(cpp_backend, "IMPLS", {}),
                               reason="the C++ extension is not built")


@needs_cpp
@pytest.mark.parametrize("op", ["bsr_mm", "bsr_mm_t", "sddmm"])
def test_cpp_dense_threshold_is_the_kernels(op, monkeypatch):
    """The path follows use_dense (SPARSEKERN_DENSE_THRESHOLD is read on every call)."""
    args = _pad(op, _linear(0.3, (2, 2)))
    with sk.backend("cpp"):
        monkeypatch.setenv("SPARSEKERN_DENSE_THRESHOLD", "0")
        e = sk.explain(op, *args)
        assert e.path.startswith("dense: MKL") and e.fallback is None
        monkeypatch.setenv("SPARSEKERN_DENSE_THRESHOLD", "2")
        assert sk.explain(op, *args).path.startswith("sparse: ")
        monkeypatch.delenv("SPARSEKERN_DENSE_THRESHOLD")
        # built-in thresholds: 1x1 switches above density 0.25
        assert sk.explain(op, *_pad(op, _linear(0.6))).path.startswith("dense")
        assert sk.explain(op, *_pad(op, _linear(0.05))).path.startswith("sparse")


def _pad(op, args):
    """``bsr_mm``'s arguments for ``op`` (the gradient ``dy`` in place of ``x`` or ``w``)."""
    x, w, mask, topo, br, bc = args
    if op == "bsr_mm":
        return args
    dy = torch.randn(x.shape[0], mask.shape[0])
    return (dy, w, mask, topo, br, bc) if op == "bsr_mm_t" else (dy, x, mask, topo, br, bc)


@needs_cpp
def test_cpp_isa_is_the_kernels(monkeypatch):
    with sk.backend("cpp"):
        e = sk.explain("bsr_mm", *_linear(0.1))
        assert e.isa == torch.ops.sparsekern._cpu_isa()
        assert e.isa in ("avx512", "avx2", "generic")
        monkeypatch.setenv("SPARSEKERN_CPU_ISA", "generic")
        assert sk.explain("bsr_mm", *_linear(0.1)).isa == "generic"


@needs_cpp
def test_cpp_routes_to_the_reference():
    with sk.backend("cpp"):
        e = sk.explain("bsr_mm", *_linear(0.1, dtype=torch.float64))
        assert e.runs == "sparsekern.reference.bsr_mm" and "float64" in e.fallback
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(6, 2, 3, 3, generator=g) < 0.5
        topo = build_topology(mask.flatten(1)).tensors
        x, w = torch.randn(2, 4, 7, 8, generator=g), torch.randn(6, 2, 3, 3, generator=g)
        conv = ([1, 1], [1, 1], [1, 1])
        e = sk.explain("conv2d", x, w, mask, topo, 1, 1, *conv, 2)
        assert "groups=2" in e.fallback
        assert cpp_backend.reference_reason("conv2d", (x, w, mask, topo, 1, 1, *conv, 2)) \
            == e.fallback
        e = sk.explain("conv2d", torch.randn(2, 2, 7, 8), w, mask, topo, 1, 1, *conv, 1)
        assert e.fallback is None and e.runs == "C++ kernel sparsekern::_conv2d"


@needs_cpp
def test_nonfinite_rows_reported():
    x, w, mask, topo, br, bc = _linear(0.1)
    x[3, 5] = float("nan")
    with sk.backend("cpp"):
        e = sk.explain("bsr_mm", x, w, mask, topo, br, bc)
        assert e.nonfinite.startswith("1 row(s) of x hold NaN/inf")
        assert "non-finite rows" in str(e)
        assert sk.explain("sddmm", torch.randn(8, 64), x, mask, topo, br, bc).nonfinite is None


def test_triton_fallback_reasons():
    kernels = pytest.importorskip("sparsekern.kernels")
    x, w, mask, topo, _, _ = _linear(0.5)
    assert kernels.reference_reason("bsr_mm", (x, w, mask, topo, 16, 16)) is None
    assert kernels.kernel_path("bsr_mm", (x, w, mask, topo, 16, 16)).startswith("block path")
    assert kernels.kernel_path("bsr_mm", (x, w, mask, topo, 2, 2)).startswith("tile path")
    assert "float64" in kernels.reference_reason("bsr_mm", (x.double(), w.double(), mask, topo,
                                                            1, 1))
    assert "would pass 128" in kernels.reference_reason("bsr_mm", (x, w, mask, topo, 1, 200))
    dy = torch.randn(8, 64)
    assert kernels.reference_reason("grow_topk", (dy, x, mask, 3, None, 0.0, 1.0, 1, 1)) is None
    assert kernels.reference_reason("grow_topk", (dy[:, :0], x, mask[:0], 0, None, 0.0, 1.0,
                                                  1, 1)) == "empty weight"


def test_spec_names_every_op():
    assert set(spec.NAMES) == set(ops.OPS) == set(ops.LINEAR_OPS + ops.CONV_OPS)
    for s in spec.SPECS:
        assert s.act in s.arg_names
        assert s.index(s.act) in (0, 1)


@needs_cpp
@pytest.mark.parametrize("op", spec.CONV_OPS)
def test_cpp_conv_crossover_is_the_kernels(op, monkeypatch):
    """The conv path is the C++ ops' own crossover (``_conv2d_plan``), overridden by
    SPARSEKERN_DENSE_CROSSOVER as the ops are."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g)
    mask = torch.rand(4, 3, 3, 3, generator=g) < 0.5
    topo = build_topology(mask.reshape(4, 27), (1, 1)).tensors
    w = torch.randn(4, 3, 3, 3, generator=g)
    dy = torch.randn(2, 4, 6, 5, generator=g)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    grow = (mask.reshape(4, 27), 3, None, 0.0, 1.0)
    args = {"conv2d": (x, w, mask, topo, 1, 1, *conv),
            "conv2d_grad_input": (dy, w, mask, topo, 1, 1, [6, 5], *conv),
            "conv2d_sddmm": (dy, x, mask, topo, 1, 1, *conv),
            "conv2d_grow_topk": (dy, x, *grow, 1, 1, [4, 3, 3, 3], *conv),
            "conv2d_fused_weight_grad": (dy, x, mask, topo, 1, 1, *grow, *conv)}[op]
    with sk.backend("cpp"):
        for setting, want in (("always", "dense: oneDNN"), ("never", "sparse: ")):
            monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", setting)
            assert sk.explain(op, *args).path.startswith(want), setting
        monkeypatch.setenv("SPARSEKERN_DENSE_CROSSOVER", "auto")
        plan = torch.ops.sparsekern._conv2d_plan(op, [2, 3, 6, 5], [4, 3, 3, 3],
                                                 int(mask.sum()), 1, 1, *conv)
        assert sk.explain(op, *args).path.startswith("dense" if plan == "dense" else "sparse")


def _cuda_backend_module(monkeypatch):
    """``sparsekern.cuda_backend`` loaded as if CUDA kernels were registered (its decision
    functions only read dtypes, so they run on CPU tensors)."""
    import importlib.util
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda *a: True)
    path = Path(sk.__file__).with_name("cuda_backend.py")
    mod_spec = importlib.util.spec_from_file_location("sparsekern._cuda_probe", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_cuda_fallback_reasons(monkeypatch):
    """The CUDA provider's wrappers and explain() share one decision function."""
    cuda = _cuda_backend_module(monkeypatch)
    x, w, mask, topo, _, _ = _linear(0.5)
    dy = torch.randn(8, 64)
    assert cuda.reference_reason("bsr_mm", (x, w, mask)) is None
    assert "float32/torch.float64" in cuda.reference_reason("bsr_mm", (x, w.double(), mask))
    assert "bool mask" in cuda.reference_reason("sddmm", (dy, x, mask.float()))
    assert cuda.reference_reason("grow_topk", (dy, x, mask)) is None
    assert "float64" in cuda.reference_reason("grow_topk", (dy.double(), x.double(), mask))
    fused = (dy, x, mask, topo, 1, 1, mask.float())
    assert "exclude" in cuda.reference_reason("fused_weight_grad", fused)
    assert cuda.reference_reason("fused_weight_grad", fused[:6] + (mask,)) is None
