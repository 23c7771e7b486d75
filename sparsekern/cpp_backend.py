"""The C++ CPU backend: thin wrappers over the ``torch.ops.sparsekern._<op>`` kernels that
``sparsekern._C`` registers (``csrc/sparsekern.cpp``, ``csrc/cpu/``).

The kernels take float32 and bfloat16 tensors (they compute in fp32 and return the input's
dtype, like the reference). Other dtypes (float64, float16) and grouped convolutions are
routed to :mod:`sparsekern.reference` here, so the backend accepts every input the reference
does. Non-contiguous inputs are copied to contiguous ones inside the kernels.
"""
from __future__ import annotations

import torch

from . import reference as ref

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


# position of `groups` in the conv ops' arguments: grouped convolutions run on the reference
_GROUPS_ARG = {"conv2d": 9, "conv2d_grad_input": 10, "conv2d_sddmm": 9, "conv2d_grow_topk": 13,
               "conv2d_fused_weight_grad": 14}


def _wrap(name: str):
    kernel = _kernel(name)
    if kernel is None:
        return None
    fallback = getattr(ref, name)
    groups_at = _GROUPS_ARG.get(name)

    def impl(*args):
        # args[0], args[1]: the activation and the weight (x, w) or (dy, w) or (dy, x)
        if args[0].dtype not in KERNEL_DTYPES or args[1].dtype not in KERNEL_DTYPES:
            return fallback(*args)
        if groups_at is not None and args[groups_at] != 1:
            return fallback(*args)
        return kernel(*args)

    impl.__name__ = name
    impl.__qualname__ = name
    impl.__doc__ = (f"C++ CPU kernel ``sparsekern::_{name}`` (the reference for other dtypes"
                    + (" and grouped convolutions)." if groups_at is not None else ")."))
    return impl


_NAMES = ("bsr_mm", "bsr_mm_t", "sddmm", "grow_topk", "fused_weight_grad",
          "conv2d", "conv2d_grad_input", "conv2d_sddmm", "conv2d_grow_topk",
          "conv2d_fused_weight_grad")
IMPLS = {n: f for n in _NAMES if (f := _wrap(n)) is not None}
