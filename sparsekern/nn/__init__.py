"""Drop-in sparse layers and the requests DST methods arm on them."""
from .attention import MultiheadAttention
from .conv import SparseConv2d
from .linear import SparseLinear
from .request import CandidateRequest, GrowRequest

__all__ = ["SparseLinear", "SparseConv2d", "MultiheadAttention", "GrowRequest", "CandidateRequest"]
