"""Classical restorers that need no training, written on torch / kornia from their papers'
formulas: the baselines a user tries first. All take and return batches ``(B, 3, H, W)`` in [0, 1]
on the input's device.

``classical_restorer("dcp")(images)``; ``list_classical()``; ``DEFAULT_CLASSICAL[task]``.
"""
from qualiteacher.classical.catalogue import (
    CLASSICAL,
    DEFAULT_CLASSICAL,
    ClassicalMethod,
    classical_method,
    classical_restorer,
    default_classical,
    list_classical,
)

__all__ = ["CLASSICAL", "DEFAULT_CLASSICAL", "ClassicalMethod", "classical_method", "classical_restorer", "default_classical",
           "list_classical"]
