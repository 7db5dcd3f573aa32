"""Preemption: SIGTERM or SIGUSR1 ends training at the next batch boundary, with a checkpoint that
`ckpt_path=last` continues exactly; under SLURM, SIGUSR1 also requeues the job.

Clusters warn before they take a machine back: SLURM and Kubernetes send SIGTERM, and a SLURM job
started with `#SBATCH --signal=USR1@90` gets SIGUSR1 ninety seconds before its time ends. The
signal handler only notes the signal; the stop happens between two batches, where the model, the
optimiser and the loops are consistent:

- in the middle of an epoch, `checkpoints/last.ckpt` is written (to a temporary name, then
  renamed: see `checkpoints.AtomicCheckpointIO`) and training stops at once. The DataModule records
  how many batches of the epoch were done, and a resumed run's sampler skips exactly those.
- after an epoch's last batch (or during its validation), the epoch ends as usual, its own
  checkpoints are written, and training stops before the next epoch.

Either way the command prints one line naming the checkpoint and exits with 128 + the signal's
number (143 for SIGTERM, 138 for SIGUSR1), which schedulers read as "terminated, not finished".
With several processes (DDP) every rank stops at the same batch: the decision is reduced across ranks.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

from kalm_lightning.errors import Preempted
from kalm_lightning.runs import Run

log = logging.getLogger(__name__)

SIGNALS = ("SIGTERM", "SIGUSR1")


def requeue_slurm_job() -> str:
    """`scontrol requeue` this SLURM job (what Lightning's SLURM environment does); says what happened."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not re.fullmatch(r"[0-9_]+", job):
        return f"not requeued: SLURM job id {job!r} is not a job number"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return "not requeued: scontrol is not on PATH"
    if done.returncode != 0:
        return f"requeueing SLURM job {job} failed: {done.stderr.strip()}"
    return f"SLURM job {job} requeued"


class Preemption(pl.Callback):
    """Turn SIGTERM / SIGUSR1 into a saved checkpoint and a clean stop at a batch boundary.

    requeue: on SIGUSR1 inside a SLURM batch job, ask SLURM to requeue the job (the requeued job
    continues this run: `runs.requeued()`)."""

    def __init__(self, signals: tuple[str, ...] = SIGNALS, requeue: bool = True) -> None:
        self.signals = tuple(signal.Signals[name] for name in signals)
        self.requeue = requeue
        self.received: int | None = None
        self._stopping_after_epoch = False

    def _note(self, signum: int, _frame: Any) -> None:
        log.warning("Received %s: stopping at the next batch boundary", signal.Signals(signum).name)
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's own handlers (registered when fit starts), which end the run on SIGTERM
        # without a checkpoint of the epoch in progress; Lightning restores the old ones at teardown.
        self.received, self._stopping_after_epoch = None, False
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                signal.signal(signum, self._note)

    def _requested(self, trainer: pl.Trainer) -> bool:
        """Whether any process received a signal (the same answer on every rank)."""
        return bool(trainer.strategy.reduce_boolean_decision(self.received is not None, all=False))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._requested(trainer):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's end is next: its checkpoints are written there (on_train_epoch_end)
        path = self._last_checkpoint(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # with optimiser and loop state
        self._stop(
            trainer,
            f"in epoch {trainer.current_epoch} after batch {batch_idx + 1} of "
            f"{trainer.num_training_batches}; saved {path}",
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._requested(trainer) and trainer.current_epoch + 1 < (trainer.max_epochs or 0):
            trainer.should_stop = True  # ModelCheckpoint still writes this epoch's checkpoints
            self._stopping_after_epoch = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stopping_after_epoch:
            self._stop(
                trainer,
                f"at the end of epoch {trainer.current_epoch - 1}; its checkpoint "
                f"is {self._last_checkpoint(trainer)}",
            )

    def _last_checkpoint(self, trainer: pl.Trainer) -> Path:
        return Run(Path(trainer.default_root_dir)).last_checkpoint  # the run directory

    def _stop(self, trainer: pl.Trainer, where: str) -> None:
        signum = self.received or signal.SIGTERM  # another rank's signal: stop as for SIGTERM
        for logger in trainer.loggers:
            logger.save()
        requeue = ""
        if (
            self.requeue
            and signum == signal.SIGUSR1
            and SLURMEnvironment.detect()
            and trainer.is_global_zero
        ):
            requeue = f"; {requeue_slurm_job()}"
        raise Preempted(
            f"stopped by {signal.Signals(signum).name} {where}{requeue}; continue with "
            "ckpt_path=last",
            int(signum),
            report=trainer.is_global_zero,
        )
