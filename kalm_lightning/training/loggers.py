"""Which Lightning loggers take what: W&B runs to finish, images (the box grid) for TensorBoard and W&B."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from kalm_lightning.data.geometry import box_to_pixels
from kalm_lightning.evaluation.figures import box_grid, to_uint8


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def finish_wandb(loggers: Iterable[Logger], exit_code: int = 0) -> None:
    """Close each W&B run that was started: one run per job, also when a multirun runs several
    jobs in one process. A non-zero exit_code marks it failed (a crash, or 128 + the signal of a
    preempted run), so a crash never leaves a run open as if it were still going."""
    for logger in wandb_loggers(loggers):
        if getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish(exit_code=exit_code)


def log_image(loggers: Iterable[Logger], key: str, image, step: int) -> None:
    """An HWC uint8 image to every logger that takes images (TensorBoard, W&B)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=None)


def log_box_grid(loggers: Sequence, batch: Mapping[str, torch.Tensor], step: int) -> None:
    """Send a validation box grid to the loggers that take images (TensorBoard, W&B)."""
    images = to_uint8(batch["images"])
    boxes = box_to_pixels(batch["boxes"], images.shape[-1]).tolist()
    captions = [
        f"y={int(y)} p={float(p):.2f}" for y, p in zip(batch["label"], batch["prob"], strict=True)
    ]
    log_image(loggers, "val/kalm_boxes", np.asarray(box_grid(images, boxes, captions)), step)
