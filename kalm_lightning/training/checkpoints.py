"""Reading checkpoint files, one place, and never running code that came inside one.

Every load (evaluate, predict, stage 2's `stage.global_ckpt`, `load_stage`, resuming with
`ckpt_path`) reads with `torch.load(weights_only=True)`: tensors, numbers, strings and plain
containers, which is all a kalm-lightning checkpoint holds. A file whose pickle asks for anything
else (a function to call, a class to build) is refused before any of it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from kalm_lightning.errors import UserError
from kalm_lightning.runs import partial_path
from kalm_lightning.training.faults import write_refusal

WEIGHTS_ONLY = True  # what every checkpoint load in the project passes to torch.load / Lightning
# The layout of a stage's hyper-parameters: 2 = the network as config nodes (`net`, with its
# localizer's) and the preprocessing recorded (`preprocessing`). Earlier files are refused.
CHECKPOINT_FORMAT = 2


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """A Lightning checkpoint as a dict; a missing, unreadable or unsafe file gets one clear line.

    mmap=True maps the tensors instead of reading them: enough to look at the hyper-parameters."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=WEIGHTS_ONLY, mmap=mmap)
    except FileNotFoundError as error:
        raise UserError(f"checkpoint {path} does not exist") from error
    except pickle.UnpicklingError as error:
        found = re.search(r"(?:Unsupported global|GLOBAL) ([\w.]+)", str(error))
        what = found.group(1) if found else "objects other than tensors and plain data"
        raise UserError(
            f"checkpoint {path} is refused: it asks to load {what}, which no kalm-lightning "
            "checkpoint holds and which could run code from the file; use a checkpoint you trust"
        ) from error
    except Exception as error:
        raise UserError(f"checkpoint {path} cannot be read ({error})") from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} is not a Lightning checkpoint (no dict inside)")
    return checkpoint


def read_trained(path: str, setting: str = "ckpt_path") -> dict:
    """A checkpoint a stage wrote (its hyper-parameters mapped, tensors not read), refusing in one
    line a file written before checkpoints carried their network and preprocessing."""
    checkpoint = read_checkpoint(path, mmap=True)
    hparams = checkpoint.get("hyper_parameters") or {}
    if hparams.get("stage") not in (1, 2):
        raise UserError(f"{setting}={path} is not a kalm-lightning stage-1 or stage-2 checkpoint")
    if hparams.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{setting}={path} was written by an older kalm-lightning (checkpoint format "
            f"{hparams.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}): it does not record "
            "its preprocessing or its localizer's config node; train it again with this version"
        )
    return checkpoint


# What only continuing a run's training reads: the optimisers' and schedulers' state, and with
# callbacks=ema (Lightning's WeightAveraging) the live weights and the averager's counters beside
# the averaged weights the file's state_dict holds.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "current_model_state", "averaging_state")


def drop_training_state(path: str) -> None:
    """The checkpoint at path rewritten (atomically) without its `TRAINING_STATE`: two thirds of a
    stage's file under Adam, more with weight averaging. It still evaluates, predicts, exports and
    serves, and starts a new run (as a stage 2's CNN_g or its CNN_l); `ckpt_path=` refuses to
    continue from it."""
    if set(TRAINING_STATE) & set(read_checkpoint(path, mmap=True)):
        checkpoint = read_checkpoint(path)
        for key in TRAINING_STATE:
            checkpoint.pop(key, None)
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic and streamed: each file is written by
    `torch.save` straight to a temporary name beside it, then renamed over the old one. Whatever
    kills the process (SIGKILL, a full disk) leaves the previous checkpoint or the new one, never
    half a file; and no in-memory copy of the whole file is made first (Lightning's own writer
    serialises to a buffer, then writes it: twice the time, and a checkpoint's size in memory).
    A write the disk refuses (full, size-limited, read-only, vanished) removes its temporary file
    and raises `faults.WriteRefused`, which the command reports in one line."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        partial = partial_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, partial)
            os.replace(partial, path)
        except Exception as error:
            refused = write_refusal(path, error)  # before the partial file frees its space
            with contextlib.suppress(OSError):
                # No debris, and its space back at once: truncated first, as the failed
                # writer may still hold the file open. The earlier checkpoints stand.
                os.truncate(partial, 0)
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            if refused is None:
                raise
            raise refused from error


class LastCheckpoint(ModelCheckpoint):
    """The checkpoint `ckpt_path=last` continues from, written at every epoch's end (a
    ModelCheckpoint with no monitor and filename `last`).

    When another checkpoint callback has just written this same step (the epoch's new best, the
    usual case early in training), last.ckpt becomes a hard link to that file instead of a second
    copy of the same weights and optimizer state. Only the callbacks' own bookkeeping differs
    between the two, and nothing a resumed run computes reads it. The link is made under a
    temporary name and renamed, like every write here; deleting the old best later leaves it
    intact. Where the file system has no hard links, the checkpoint is written out as usual."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        twin = next(
            (
                callback._last_checkpoint_saved
                for callback in trainer.checkpoint_callbacks
                if callback is not self
                and isinstance(callback, ModelCheckpoint)
                and callback.save_weights_only == self.save_weights_only
                # Lightning's own bookkeeping (2.1+): should a release rename it, no link is made
                and getattr(callback, "_last_global_step_saved", None) == trainer.global_step
                and getattr(callback, "_last_checkpoint_saved", "")
            ),
            None,
        )
        linked = twin is not None and trainer.strategy.broadcast(
            trainer.is_global_zero and _link(Path(twin), Path(filepath))
        )
        if not linked:
            super()._save_checkpoint(trainer, filepath)
            return
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def _link(source: Path, target: Path) -> bool:
    """Hard-link source as target, atomically; False where the file system refuses."""
    partial = partial_path(target)
    try:
        partial.unlink(missing_ok=True)
        os.link(source, partial)
    except OSError:
        return False
    os.replace(partial, target)
    return True
