"""The C++ CPU backend: thin wrappers over the ``torch.ops.sparsekern._<op>`` kernel ops
(schemas from :mod:`sparsekern.spec`; ``sparsekern._C`` registers their CPU implementations,
``csrc/cpu/``).

The kernels take float32 and bfloat16 tensors (they compute in fp32 and return the input's
dtype, like the reference). Other dtypes (float64, float16) and grouped convolutions are
routed to :mod:`sparsekern.reference` here (:func:`reference_reason`), so the backend accepts
every input the reference does. Non-contiguous inputs are copied to contiguous ones inside the
kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from . import spec

try:
    from . import _C  # noqa: F401  (registers torch.ops.sparsekern._*)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(f"sparsekern._C is not built or failed to load ({e}); build it with "
                      "`pip install --no-build-isolation -e .` or "
                      "`python setup.py build_ext --inplace`") from e

DEVICES = ("cpu",)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kernel(name: str):
    """The ``sparsekern::_<name>`` op if it has a CPU kernel, else None."""
    qual = f"sparsekern::_{name}"
    try:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"):
            return None
        return getattr(torch.ops.sparsekern, "_" + name)
    except (AttributeError, RuntimeError):
        return None


def reference_reason(name: str, args: tuple) -> Optional[str]:
    """Why the call ``name(*args)`` runs on the reference instead of the C++ kernel (op
    ``name`` in :data:`IMPLS`), or None when the kernel runs it. The op's first two arguments
    (``x``/``dy`` and ``w``, or ``dy`` and ``x``) must be fp32/bf16, convolutions ungrouped."""
    a, b = args[0], args[1]
    if a.dtype not in KERNEL_DTYPES or b.dtype not in KERNEL_DTYPES:
        return (f"dtypes {a.dtype}/{b.dtype}: the C++ kernels take "
                f"{', '.join(map(str, KERNEL_DTYPES))}")
    groups_at = _GROUPS_AT.get(name)
    if groups_at is not None and args[groups_at] != 1:
        return f"groups={args[groups_at]}: the C++ conv kernels are ungrouped"
    return None


_GROUPS_AT = {s.name: s.index("groups") for s in spec.SPECS if "groups" in s.arg_names}


def _wrap(name: str):
    kernel = _kernel(name)
    if kernel is None:
        return None
    fallback = getattr(ref, name)

    def impl(*args):
        if reference_reason(name, args) is not None:
            return fallback(*args)
        return kernel(*args)

    impl.__name__ = name
    impl.__qualname__ = name
    impl.__doc__ = f"C++ CPU kernel ``sparsekern::_{name}`` (see :func:`reference_reason`)."
    return impl


IMPLS = {n: f for n in spec.NAMES if (f := _wrap(n)) is not None}
