"""Test-session setup: the Triton interpreter must be chosen before ``triton`` is imported, and
every test starts on the reference backend (backend tests switch explicitly)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import sparsekern as sk  # noqa: E402


@pytest.fixture(autouse=True)
def _reference_backend():
    sk.set_backend("reference")
    torch.manual_seed(0)
    yield
    sk.set_backend("reference")
