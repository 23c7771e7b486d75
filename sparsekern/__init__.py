"""sparsekern: sparse kernels and one fused backward for dynamic sparse training."""
import importlib.util
import warnings

import torch  # noqa: F401  (loads libtorch before the extension)

from . import ops  # noqa: E402  (defines the op schemas the extension registers kernels for)

if importlib.util.find_spec("sparsekern._C") is None:
    warnings.warn("sparsekern: C++ extension sparsekern._C is not built; the cpp backend is "
                  "off (pip install --no-build-isolation -e . builds it)", stacklevel=2)
else:
    try:
        from . import _C  # noqa: F401  (registers the C++ kernels of the sparsekern::_* ops)
    except ImportError as _e:
        warnings.warn(f"sparsekern: C++ extension failed to load ({_e}); the cpp backend is off",
                      stacklevel=2)

from .ops import available_backends, backend, get_backend, set_backend  # noqa: E402
from .explain import explain  # noqa: E402
from . import functional  # noqa: E402
from .nn import CandidateRequest, GrowRequest, SparseConv2d, SparseLinear  # noqa: E402
from .sparsify import densify, sparsify  # noqa: E402
from . import dst  # noqa: E402

__version__ = "0.1.0"
__all__ = ["available_backends", "backend", "get_backend", "set_backend", "explain",
           "functional", "SparseLinear", "SparseConv2d", "GrowRequest", "CandidateRequest",
           "sparsify", "densify", "dst"]
