"""The classification loss's weights (MURA's baseline per body part, or balanced overall), and the
stop at a loss that is not finite."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from kalm_lightning.data.index import BODY_PARTS
from kalm_lightning.errors import UserError

CLASS_WEIGHTS = (None, "body_part", "balanced")


def class_weights(index: pd.DataFrame, kind: str) -> torch.Tensor:
    """[body parts, 2] loss weights (normal, abnormal) from a training index's image counts:
    MURA's baseline per body part, w_abnormal = N / (A + N) and w_normal = A / (A + N) of that
    part's normal (N) and abnormal (A) images; or the same from the whole split ("balanced")."""
    table = torch.ones(len(BODY_PARTS), 2, dtype=torch.float32)
    groups = {part: index[index["body_part"] == part] for part in BODY_PARTS}
    for code, part in enumerate(BODY_PARTS):
        rows = groups[part] if kind == "body_part" else index
        abnormal, normal = int((rows["label"] == 1).sum()), int((rows["label"] == 0).sum())
        if abnormal + normal:
            table[code] = torch.tensor([abnormal, normal], dtype=torch.float32) / (
                abnormal + normal
            )
    return table


def body_part_codes(body_part: Sequence[str] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(body_part, torch.Tensor):
        return body_part.to(device).long()
    return torch.tensor([BODY_PARTS.index(p) for p in body_part], device=device)


def check_finite(loss: torch.Tensor, batch: dict, module) -> None:
    """Stop at the first NaN or Inf loss of a stage (`module`), naming the step and the batch's
    images; the checkpoints saved before it stay as they are."""
    if torch.isfinite(loss.detach()).all():
        return
    ids = batch["image_id"].tolist()
    datamodule = getattr(module.trainer, "datamodule", None)
    paths = [datamodule.dataset("train").paths[i] for i in ids] if datamodule else ids
    shown = ", ".join(map(str, paths[:3])) + (
        f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    )
    raise UserError(
        f"training loss is {loss.item()} at step {module.global_step} (epoch "
        f"{module.current_epoch}); the batch held {shown}. The last good checkpoints are kept; "
        "lower model.optimizer.lr or check those images"
    )
