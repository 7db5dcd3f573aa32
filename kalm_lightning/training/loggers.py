"""Which Lightning loggers take what: W&B runs to finish, images for TensorBoard and W&B."""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def finish_wandb(loggers: Iterable[Logger]) -> None:
    """Close each W&B run: one run per job, also when a multirun runs several jobs in one process."""
    for logger in wandb_loggers(loggers):
        logger.experiment.finish()


def log_image(loggers: Iterable[Logger], key: str, image, step: int) -> None:
    """An HWC uint8 image to every logger that takes images (TensorBoard, W&B)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=None)
