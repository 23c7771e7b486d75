"""Dynamic sparse training methods on top of sparsekern's layers (``sparsekern/dst/ALGORITHMS.md``,
``sparsekern/dst/README.md``)::

    from sparsekern import dst
    m = dst.RigL(model, optimizer, total_steps=T, sparsity=0.9, delta_t=100)
    for x, y in loader:
        criterion(model(x), y).backward()
        m.step()            # optimizer step (skipped on RigL update steps) + mask updates
        optimizer.zero_grad()
    m.stats(); m.state_dict(); m.load_state_dict(...)
"""
from .base import DropAndGrow, DSTMethod, LayerState, epochs_to_steps
from .bidst import BiDST
from .dst_ee import DSTEE
from .gse import GSE
from .mest import MEST
from .rigl import RigL
from .set import SET
from .static import Static

METHODS = {"static": Static, "set": SET, "rigl": RigL, "dst-ee": DSTEE, "bidst": BiDST,
           "mest": MEST, "gse": GSE}

__all__ = ["BiDST", "DSTEE", "DSTMethod", "DropAndGrow", "GSE", "LayerState", "MEST", "METHODS",
           "RigL", "SET", "Static", "epochs_to_steps"]
