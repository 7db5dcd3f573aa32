"""Which Lightning loggers take what: W&B runs to finish, images (the box grid) for TensorBoard,
W&B and MLflow, files (config, reports, figures) as MLflow artefacts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger


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
    """An HWC uint8 image to every logger that takes images (TensorBoard, W&B, MLflow)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=None)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, artifact_file=f"{key}/{step:06d}.png")


def log_files(loggers: Iterable[Logger], files: Iterable[Path], folder: str | None = None) -> None:
    """Files that exist (the config, reports, figures) as artefacts of each MLflow run."""
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            for path in files:
                if Path(path).is_file():
                    logger.experiment.log_artifact(logger.run_id, str(path), folder)


def log_figures(
    loggers: Iterable[Logger], metrics: Mapping[str, Mapping], names: Iterable[str]
) -> None:
    """Study-level figures of each score block (kalm/study_auroc, ...) to each MLflow run."""
    figures = {
        f"{score}/study_{name}": float(block["study"][name])
        for score, block in metrics.items()
        if score in names
        for name in ("accuracy", "auroc", "kappa")
    }
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.log_metrics(figures)


def finish_mlflow(loggers: Iterable[Logger], exit_code: int = 0) -> None:
    """End each MLflow run a command started outside a Trainer (evaluate), FAILED on a crash."""
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.finalize("success" if exit_code == 0 else "failed")
