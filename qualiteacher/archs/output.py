"""The result every student returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class StudentOutput(NamedTuple):
    """image: (B, 3, H, W) restored image; aux_loss: scalar backbone loss added to the training total."""

    image: Tensor
    aux_loss: Tensor
