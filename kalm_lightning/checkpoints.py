"""Reading checkpoint files, one place, and never running code that came inside one.

Every load (evaluate, predict, stage 2's `stage.global_ckpt`, `load_stage`, resuming with
`ckpt_path`) reads with `torch.load(weights_only=True)`: tensors, numbers, strings and plain
containers, which is all a kalm-lightning checkpoint holds. A file whose pickle asks for anything
else (a function to call, a class to build) is refused before any of it runs.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kalm_lightning.errors import UserError

WEIGHTS_ONLY = True  # what every checkpoint load in the project passes to torch.load / Lightning


def last_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint `ckpt_path=last` continues from: every epoch's end, or a preempted batch."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: each file is written to a temporary name
    beside it and renamed over the old one, so whatever kills the process (SIGKILL, a full disk)
    leaves either the previous checkpoint or the new one, never half a file."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)
