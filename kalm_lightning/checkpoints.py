"""Reading checkpoint files: one place, so every load (evaluate, predict, stage 2, resume) is alike."""

from __future__ import annotations

import torch

from kalm_lightning.errors import UserError


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """A Lightning checkpoint as a dict, with a clear error for a missing or unreadable file.

    mmap=True maps the tensors instead of reading them: enough to look at the hyper-parameters."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError as error:
        raise UserError(f"checkpoint {path} does not exist") from error
    except Exception as error:
        raise UserError(f"checkpoint {path} cannot be read ({error})") from error
