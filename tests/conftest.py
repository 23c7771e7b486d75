"""Test-session setup: the Triton interpreter must be chosen before ``triton`` is imported, and
every test starts on the reference backend (backend tests switch explicitly, or take the
``each_backend`` fixture to run once per backend users can get)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The C++ conv ops' dense crossover would route the tests' small shapes to oneDNN: the suite
# tests the sparse kernels; tests of the dense path set "always" themselves.
os.environ.setdefault("SPARSEKERN_DENSE_CROSSOVER", "never")

import pytest  # noqa: E402
import torch  # noqa: E402

import sparsekern as sk  # noqa: E402


@pytest.fixture(autouse=True)
def _reference_backend():
    sk.set_backend("reference")
    torch.manual_seed(0)
    yield
    sk.set_backend("reference")


MODULE_BACKENDS = ("reference", "cpp", "cpp-avx2", "cpp-generic", "triton")
"""Backends a module test runs on: the C++ one on each CPU code path (native = the best this
CPU has; ``SPARSEKERN_CPU_ISA`` forces the others), Triton under the interpreter."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "float64_only: the test needs float64 (gradcheck), which every backend "
        "serves with the reference, so it runs once, on the reference backend")


def pytest_generate_tests(metafunc):
    if "each_backend" in metafunc.fixturenames:
        only64 = metafunc.definition.get_closest_marker("float64_only") is not None
        metafunc.parametrize("each_backend", ("reference",) if only64 else MODULE_BACKENDS,
                             indirect=True)


@pytest.fixture
def each_backend(request, monkeypatch):
    """Run the test on one backend. The test module's ``WORK`` dtype (for tests that do not
    pick one) becomes float32, the kernels' dtype, on every backend but the reference. A
    backend that is not built fails the test, unless the build was asked to leave the C++
    extension out (``SPARSEKERN_NO_EXT=1``)."""
    name, _, isa = request.param.partition("-")
    if hasattr(request.module, "WORK"):
        monkeypatch.setattr(request.module, "WORK",
                            torch.float64 if name == "reference" else torch.float32)
    status = sk.available_backends()[name]
    if status != "ok":
        if name == "cpp" and os.environ.get("SPARSEKERN_NO_EXT") == "1":
            pytest.skip(f"cpp backend not built (SPARSEKERN_NO_EXT=1): {status}")
        pytest.fail(f"backend {name!r} is unavailable: {status}")
    if isa:
        monkeypatch.setenv("SPARSEKERN_CPU_ISA", isa)
    sk.set_backend(name)
    return request.param
