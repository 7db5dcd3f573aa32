"""Lightning callbacks that write progress as lines (kalm_lightning/progress.py): one line per
training epoch, and a line per tenth of an inference run's batches."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from kalm_lightning.progress import Progress

log = logging.getLogger("kalm_lightning")


class EpochLines(pl.Callback):
    """One line per epoch in the run's log (train.log) and on the terminal, after its
    validation: `epoch 3/30: train/loss 0.412, val/selection 0.830 (best 0.851), 212 s`."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.start = time.monotonic()

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = [
            f"{name} {float(metrics[name]):.3f}"
            for name in ("train/loss", "val/selection")
            if name in metrics and math.isfinite(float(metrics[name]))
        ]
        selection = metrics.get("val/selection")
        if selection is not None and math.isfinite(float(selection)):
            self.best = max(getattr(self, "best", -math.inf), float(selection))
            shown[-1] += f" (best {self.best:.3f})"  # the checkpoint kept: the highest so far
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        seconds = time.monotonic() - getattr(self, "start", time.monotonic())
        log.info(f"epoch {trainer.current_epoch}/{total}: {', '.join(shown)}, {seconds:.0f} s")


class ProgressLines(pl.Callback):
    """A line per tenth of a predict run's batches (`Progress`)."""

    def __init__(self, what: str = "scoring") -> None:
        self.what = what

    def on_predict_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        batches = trainer.num_predict_batches
        self.counter = Progress(self.what, int(sum(batches)) if batches else None, "batches")

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.counter.update(self.counter.done + 1)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.counter.end()
