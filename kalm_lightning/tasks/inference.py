"""Scoring a trained stage: `Trainer.predict` over the DataModule's predict dataloader (what
evaluate and predict share), and the class activation maps, a batch at a time."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from kalm_lightning.data.dataset import MURADataset, collate_skipping_bad
from kalm_lightning.data.mura import MURADataModule
from kalm_lightning.data.transfer import model_input
from kalm_lightning.errors import UserError
from kalm_lightning.stages.base import StageModule
from kalm_lightning.training.progress import ProgressLines


def pick_device(name: str) -> torch.device:
    """device=auto (CUDA when present), cpu, cuda, cuda:N; a CUDA name without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible: use device=cpu")
    return torch.device(name)


def trainer_for(device: str, precision: str, progress: bool, what: str) -> pl.Trainer:
    """A Trainer for inference on one device (nothing logged or saved); progress: a line per
    tenth of the batches (`ProgressLines`), read in a terminal and a log file alike."""
    chosen = pick_device(device)
    accelerator = "gpu" if chosen.type == "cuda" else "cpu"
    devices = [chosen.index or 0] if chosen.type == "cuda" else 1
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ProgressLines(what)] if progress else [],
    )


def predict_outputs(
    module: StageModule,
    datamodule: MURADataModule,
    device: str,
    precision: str,
    progress: bool = True,
    what: str = "scoring",
) -> dict[str, torch.Tensor]:
    """`Trainer.predict` of the stage over `datamodule.predict_on(...)`'s images: every output of
    `predict_step`, joined and in image-id order (the device transform runs in the DataModule's
    `on_after_batch_transfer`, as in training)."""
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available" lines among a command's own
    try:
        trainer = trainer_for(device, precision, progress, what)
        batches = trainer.predict(module, datamodule=datamodule)
    finally:
        quiet.setLevel(level)
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in batches or []:
        for key, value in (batch or {}).items():
            parts.setdefault(key, []).append(value.cpu())
    if not parts:
        return {"image_id": torch.zeros(0, dtype=torch.long)}
    joined = {key: torch.cat(values) for key, values in parts.items()}
    order = torch.argsort(joined["image_id"])
    return {key: value[order] for key, value in joined.items()}


@torch.no_grad()
def heatmaps_of(
    module: StageModule, pixels: torch.Tensor, dataset: MURADataset
) -> dict[str, np.ndarray]:
    """The stage's class activation maps ({score: [B, S, S]}) of a dataset's uint8 items."""
    device = next(module.parameters()).device
    norm = dataset.mean.flatten(), dataset.std.flatten()
    images = model_input({"image": pixels.to(device)}, *norm)["image"]
    maps = module.eval().heatmaps(module.prepare_images(images))
    return {name: value.float().cpu().numpy() for name, value in maps.items()}


def heatmap_batches(
    module: StageModule, dataset: MURADataset, batch_size: int, num_workers: int, device: str
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Each batch's image ids and class activation maps ({score: [B, S, S]}, the stage's
    `heatmaps`), one batch at a time so that a large folder never holds them all."""
    module.to(pick_device(device)).eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_bad
    )
    for batch in loader:
        if batch is not None:
            yield batch["image_id"].tolist(), heatmaps_of(module, batch["image"], dataset)
