"""Code layout contracts: the reference stands alone (it imports nothing from sparsekern and
production code takes no helper from it), production helpers agree with the reference's own
copies, and the Triton kernels take their geometry by name."""
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from sparsekern import _util, topology
from sparsekern import reference as ref
from sparsekern.topology import build_topology

PKG = Path(__file__).resolve().parents[1] / "sparsekern"
# the ops whose meaning production code may take from the reference (fallbacks, non-finite rows)
REFERENCE_OPS = {"bsr_mm", "bsr_mm_t", "sddmm", "grow_topk", "fused_weight_grad", "conv2d",
                 "conv2d_grad_input", "conv2d_sddmm", "conv2d_grow_topk",
                 "conv2d_fused_weight_grad"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def test_reference_imports_no_sparsekern_module():
    bad = []
    for node in ast.walk(_tree(PKG / "reference.py")):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0]
                                                 == "sparsekern"):
            bad.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] == "sparsekern"]
    assert bad == [], f"reference.py imports {bad}"


def test_production_takes_only_ops_from_the_reference():
    """Production modules may call the reference's ops, never its helpers:
    ``from ..reference import helper`` and ``ref.helper`` are both refused."""
    assert all(inspect.isfunction(getattr(ref, name)) for name in REFERENCE_OPS)
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "reference.py":
            continue
        rel, tree, aliases = path.relative_to(PKG), _tree(path), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if mod == "reference" or mod.endswith(".reference"):
                    problems += [f"{rel}: from {mod} import {a.name}" for a in node.names]
                elif mod in ("", "sparsekern"):
                    aliases |= {a.asname or a.name for a in node.names if a.name == "reference"}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names
                            if a.name == "sparsekern.reference" and a.asname}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr not in REFERENCE_OPS):
                problems.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    assert problems == [], problems


# --------------------------------------------------------------------------- helper copies
@pytest.mark.parametrize("shape,bs", [((7, 10), (3, 4)), ((16, 8), (4, 4)), ((5, 3), (1, 1)),
                                      ((0, 4), (2, 2))])
def test_block_helpers_match_the_reference(shape, bs):
    g = torch.randn(*shape)
    mask = torch.rand(*shape) < 0.4
    t = build_topology(mask, bs).tensors
    for a, b in zip(topology.block_coords(t[0], t[1]), ref.block_coords(t[0], t[1])):
        assert torch.equal(a, b)
    vals = topology.gather_blocks(g, t[0], t[1], *bs)
    assert torch.equal(vals, ref.gather_blocks(g, t[0], t[1], *bs))
    assert torch.equal(topology.scatter_blocks(vals, t[0], t[1], shape),
                       ref.scatter_blocks(vals, t[0], t[1], shape))


def test_small_helpers_match_the_reference():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert _util.acc_dtype(dt) == ref.acc_dtype(dt)
    s = torch.tensor([1.0, float("nan"), 3.0, -0.0, 3.0, 0.0, float("-inf"), float("nan")])
    for k in range(s.numel() + 1):
        got, want = _util.stable_topk(s, k), ref.stable_topk(s, k)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1].nan_to_num(7.0), want[1].nan_to_num(7.0))
    for args in (([7, 8], [3, 3], [1, 1], [1, 1], [1, 1]),
                 ([9, 5], [2, 3], [2, 1], [0, 2], [2, 1])):
        assert _util.conv_out_hw(*args) == ref.conv_out_hw(*args)
    assert _util.PHI_CHOICES == ref.PHI_CHOICES
    g, w = torch.randn(4, 5), torch.randn(4, 5)
    active, cand = torch.rand(4, 5) < 0.5, torch.rand(4, 5) < 0.5
    for phi in ref.PHI_CHOICES:
        assert torch.equal(_util.psi_grad(g, w, active, cand, 0.3, phi),
                           ref.psi_grad(g, w, active, cand, 0.3, phi))


def test_as_pair():
    assert _util.as_pair(3, "stride", "f") == (3, 3)
    assert _util.as_pair([2, 0], "padding", "f", minimum=0) == (2, 0)
    with pytest.raises(TypeError, match="f: stride must be an int or a pair of ints, got 'x'"):
        _util.as_pair("x", "stride", "f")
    with pytest.raises(ValueError, match=r"f: block_size must be an int or a pair of ints >= 1"):
        _util.check_block_size((0, 2), "f")
    with pytest.raises(ValueError, match="pair of ints >= 1"):
        _util.as_pair((True, 2), "stride", "f")


# --------------------------------------------------------------------------- kernel geometry
def _kernel_params(kernel) -> set:
    fn = kernel
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    return set(fn.arg_names)


def test_geometry_names_are_kernel_parameters():
    pytest.importorskip("triton")
    from sparsekern.kernels import _common, bsr_mm, conv, sddmm

    x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    geo = _common.conv_geometry(x, y, (4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1)
    for kernel, d in ((bsr_mm._spmm_kernel, "y"), (sddmm._sddmm_block_kernel, "dy"),
                      (sddmm._wgrad_kernel, "dy")):
        names = set(geo.kwargs(d))
        assert names <= _kernel_params(kernel), names - _kernel_params(kernel)
        assert all(n.startswith("stride_") or n.isupper() or n.startswith("conv_")
                   for n in names)
    assert set(_common.NO_SPECIALIZE) <= _kernel_params(conv._conv_dgrad_kernel)
    lin = _common.linear_geometry(torch.randn(5, 3), torch.randn(5, 4)).kwargs("dy")
    assert [lin[n] for n in ("stride_xb", "stride_xk", "stride_dyb", "stride_dym")] == [3, 1, 4, 1]
    assert geo.kwargs("y")["stride_yc"] == 16 and geo.kwargs("y")["CIN_G"] == 3


@pytest.mark.parametrize("tamper", ["rename", "drop"])
def test_launcher_with_a_wrong_geometry_name_raises(tamper):
    pytest.importorskip("triton")
    from sparsekern.kernels import _common, bsr_mm, configs

    class Tampered(_common.Geometry):
        def kwargs(self, d):
            kw = super().kwargs(d)
            v = kw.pop("stride_xk")
            if tamper == "rename":
                kw["stride_kx"] = v
            return kw

    x, mask = torch.randn(5, 20), torch.rand(12, 20) < 0.5
    w, y = torch.randn(12, 20), torch.empty(5, 12)
    topo = build_topology(mask, (1, 1)).tensors
    geo = _common.linear_geometry(x, y)
    bad = Tampered(**{f.name: getattr(geo, f.name) for f in dataclasses.fields(geo)})
    with pytest.raises(TypeError, match="stride_xk"):
        bsr_mm.launch_spmm(x, w, mask, topo, configs.tiling(1, 1), y, bad)


def test_rigl_and_set_share_one_constructor():
    from sparsekern.dst import SET, RigL
    from sparsekern.dst.rigl import RigLSchedule

    assert RigL.__init__ is SET.__init__ is RigLSchedule.__init__
    defaults = {k: p.default for k, p in inspect.signature(RigL).parameters.items()}
    assert defaults["skip_optimizer_step_on_update"] is True and defaults["delta_t"] == 100
    assert (RigL.grows_by_gradient, SET.grows_by_gradient) == (True, False)


def test_conv_padding_is_validated_by_check_conv_args_alone():
    from sparsekern import functional as skF

    _, pad, dil, _ = skF.check_conv_args("f", 1, "same", 1, 1)
    assert skF.resolve_conv_padding(pad, (4, 3), dil) == ((1, 1), [0, 0, 0, 1])
    assert skF.resolve_conv_padding("valid", (3, 3), (1, 1)) == ((0, 0), [0, 0, 0, 0])
    _, pad, _, _ = skF.check_conv_args("f", 1, (2, 3), 1, 1)
    assert skF.resolve_conv_padding(pad, (3, 3), (1, 1)) == ((2, 3), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="f: padding must be an int or a pair of ints >= 0"):
        skF.check_conv_args("f", 1, (-1, 0), 1, 1)
