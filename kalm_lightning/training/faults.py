"""Faults of the machine rather than of the input: a full or read-only disk, a DDP peer that died,
a step out of memory. Each becomes one line naming what happened, where, what is intact and the
command that continues; the full traceback goes to the run's log file.

`FaultReport` (a callback, in `conf/callbacks/default.yaml`) sees a failing `fit` first, while
the trainer still says where it stood: epoch, batch, rank, batch size, image sizes, precision. It
puts the line on the exception (`LINE`), which `cli.one_line_errors` prints. A dead peer is
reported and the process ended right there: the collectives that teardown would run next can
only wait for the rank that is gone. Where rank 0 reaches no collective for a while, the
observer of its child ranks (`training/launcher.py`) reports the dead peer in its place.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from kalm_lightning.errors import report_fault
from kalm_lightning.runs import DISK_ERRNOS, Run
from kalm_lightning.training.loggers import finish_wandb
from kalm_lightning.training.preemption import requeue_slurm_job

LINE = "kalm_line"  # the attribute of an exception that carries its one line
# PyTorch's zip writer turns a refused write into a RuntimeError without its errno.
WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")
PEER_FAILURES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
    "NCCL error",
    "Broken pipe",
)
OOM_FAILURES = ("can't allocate memory", "CUDA out of memory", "not enough memory")


class WriteRefused(Exception):
    """The disk refused a write; the partial file is gone, earlier files are untouched."""

    def __init__(self, path: Path, reason: str, fix: str) -> None:
        super().__init__(f"{reason} while writing {path}")
        self.path, self.reason, self.fix = path, reason, fix


def write_refusal(path: Path, error: BaseException) -> WriteRefused | None:
    """What refused the write of path, when a full, limited, read-only or vanished disk did."""
    code = getattr(error, "errno", None)
    if code in DISK_ERRNOS:
        reason = DISK_ERRNOS[code]
    elif isinstance(error, RuntimeError) and any(s in str(error) for s in WRITER_FAILURES):
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        if limit != resource.RLIM_INFINITY:
            reason = f"the file size limit (ulimit -f) of {limit / 2**20:.0f} MiB is reached"
            code = errno.EFBIG
        elif free < 2**26:  # under 64 MiB left: the write ran the disk full
            reason = f"no space left on the device ({free / 2**20:.0f} MiB free)"
            code = errno.ENOSPC
        else:
            return None
    else:
        return None
    fixes = {
        errno.EFBIG: "raise the limit (ulimit -f unlimited)",
        errno.EROFS: f"make {path.parent} writable",
        errno.ENOENT: f"restore {path.parent}",
        errno.EACCES: f"make {path.parent} writable",
    }
    return WriteRefused(path, reason, fixes.get(code, f"free space on the disk of {path.parent}"))


def last_state(run: Run) -> str:
    """What a resumed run continues from, in words."""
    last = run.last_checkpoint
    if not last.is_file():
        return "no checkpoint of this run was written yet (ckpt_path=last starts it afresh)"
    try:
        saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        where = f"epoch {saved.get('epoch')}, step {saved.get('global_step')}"
    except Exception:  # a checkpoint we cannot read is no better than none: say which file
        where = "unreadable"
    return f"{last} ({where}) is the last whole checkpoint"


def is_peer_failure(error: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistBackendError", ())
    return isinstance(error, dist_error) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in PEER_FAILURES)
    )


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in OOM_FAILURES)
    )


def fault_line(error: BaseException) -> str | None:
    """The one line of a machine fault outside fit (a report, a prediction, a cache), or the
    line FaultReport put on it; None for anything else (a bug keeps its traceback)."""
    line = getattr(error, LINE, None)
    if line is not None:
        return line
    refused = error if isinstance(error, WriteRefused) else None
    if refused is None and isinstance(error, OSError) and error.filename:
        refused = write_refusal(Path(error.filename), error)
    if refused is not None:
        return f"{refused.reason} while writing {refused.path}; {refused.fix}, then run the command again"
    if is_out_of_memory(error):
        return f"out of memory ({first_line(error)}); lower batch_size or the image sizes"
    return None


def first_line(error: BaseException) -> str:
    """The gist of an error: its first sentence, without a C++ source location in front."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h)[^\]]*\]\s*", "", text.splitlines()[0])
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0][:200]


def where_it_stood(trainer: pl.Trainer) -> str:
    """Where a fit stands, in words: training or validating, the epoch, the batches done."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    doing = {"train": "training", "validate": "validating", "sanity_check": "validating"}
    stage = doing.get(str(getattr(trainer.state.stage, "value", "")), "training")
    batches = trainer.num_training_batches
    if not isinstance(batches, int):
        return "before the first training step"
    return f"{stage}, epoch {trainer.current_epoch}, after batch {done} of {batches}"


class FaultReport(pl.Callback):
    """Turn a machine fault during fit into its one line (see the module docstring)."""

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        run = Run(Path(trainer.default_root_dir))
        where = where_it_stood(trainer)
        refused = exception if isinstance(exception, WriteRefused) else None
        if refused is None and isinstance(exception, OSError) and exception.filename:
            refused = write_refusal(Path(exception.filename), exception)
        if refused is not None:
            line = (
                f"{refused.reason} while writing {refused.path} ({where}); nothing was lost: "
                f"{last_state(run)}; {refused.fix}, then continue with ckpt_path=last"
            )
        elif is_peer_failure(exception):
            self.peer_lost(trainer, run, where, exception)
            return
        elif is_out_of_memory(exception):
            data = getattr(trainer, "datamodule", None)
            batch = getattr(data, "batch_size", "?")
            sizes = (getattr(data, "image_size", "?"), getattr(data, "source_size", "?"))
            device = trainer.strategy.root_device
            line = (
                f"out of memory on {device} ({where}) with data.batch_size="
                f"{batch}, data.image_size={sizes[0]}, data.source_size={sizes[1]}, "
                f"trainer.precision={trainer.precision}; lower data.batch_size (e.g. "
                f"data.batch_size={max(1, batch // 2) if isinstance(batch, int) else '?'}) or the "
                f"sizes, or on a GPU use trainer.precision=bf16-mixed; {last_state(run)}; "
                "continue with ckpt_path=last"
            )
        else:
            return
        setattr(exception, LINE, line)

    def peer_lost(
        self, trainer: pl.Trainer, run: Run, where: str, exception: BaseException
    ) -> None:
        """Report a dead DDP peer from this surviving rank and end the process now."""
        rank, world = trainer.global_rank, trainer.world_size
        requeue = ""
        if SLURMEnvironment.detect() and trainer.is_global_zero:
            requeue = f"; {requeue_slurm_job()}"
        line = (
            f"another DDP rank stopped answering ({where}; rank {rank} of {world} saw: "
            f"{first_line(exception)}); this rank stopped too; {last_state(run)}{requeue}; "
            "continue with ckpt_path=last"
        )
        setattr(exception, LINE, line)
        for observer in threading.enumerate():  # Lightning's, which would SIGKILL this rank
            if observer.name == "child-process-observer":
                observer._finished = True
        report_fault(exception, "kalm-train", line)
        finish_wandb(trainer.loggers, 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # teardown's collectives would wait for the dead rank
