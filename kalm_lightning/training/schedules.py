"""Learning-rate schedules beyond torch's own: linear warm-up, then cosine decay (Goyal et al.
2017; Loshchilov and Hutter 2017), per epoch, as a LambdaLR a `_partial_: true` node builds."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from kalm_lightning.errors import check_number


def warmup_cosine_factor(
    epoch: int, warmup_epochs: int, max_epochs: int, min_factor: float
) -> float:
    """The learning rate's factor at `epoch` (from 0): (e + 1) / (warmup + 1) during the warm-up,
    then min + (1 - min) (1 + cos(pi t)) / 2, t going from 0 to 1 over the remaining epochs."""
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    decay = max(max_epochs - warmup_epochs - 1, 1)
    t = min((epoch - warmup_epochs) / decay, 1.0)
    return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * t)) / 2


def warmup_cosine(
    optimizer: Optimizer, warmup_epochs: int, max_epochs: int, min_factor: float = 0.0
) -> LambdaLR:
    check_number("model.scheduler.warmup_epochs", warmup_epochs, 0, integer=True)
    check_number("model.scheduler.max_epochs", max_epochs, 1, integer=True)
    check_number("model.scheduler.min_factor", min_factor, 0, 1)
    return LambdaLR(
        optimizer,
        lambda epoch: warmup_cosine_factor(epoch, warmup_epochs, max_epochs, min_factor),
    )
