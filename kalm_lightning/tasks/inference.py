"""Scoring a trained stage over a dataset, without gradients: the loop and the image table that
evaluate, predict and the study share."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from rich.progress import track
from torch.utils.data import DataLoader

from kalm_lightning.data.dataset import MURADataset, collate_skipping_bad
from kalm_lightning.data.geometry import PIXEL_BOX, box_to_pixels, to_original_pixels
from kalm_lightning.data.transfer import model_input
from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.studies import GLOBAL, KALM, SCORES, prob_column
from kalm_lightning.stages.base import StageModule

INDEX_COLUMNS = ["path", "image", "study", "body_part", "label"]


def pick_device(name: str) -> torch.device:
    """device=auto (CUDA when present), cpu, cuda, cuda:N; a CUDA name without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible: use device=cpu")
    return torch.device(name)


@torch.no_grad()
def predict_images(
    module: StageModule,
    loader: DataLoader,
    device: torch.device,
    precision: str,
    progress: bool = False,
    tta: str = "none",
) -> dict[str, torch.Tensor]:
    """Every score of every image in the loader, plus KALM boxes (stage 2), ordered by image id.
    tta="hflip": each score is the mean of the image's and its mirror's (the boxes the image's)."""
    module.to(device).eval()
    autocast = "bf16" in precision and device.type == "cuda"
    parts: dict[str, list[torch.Tensor]] = {}
    norm = loader.dataset.mean.flatten(), loader.dataset.std.flatten()
    batches = track(loader, description="scoring", transient=True) if progress else loader
    for batch in batches:
        if batch is None:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            images = model_input({"image": batch["image"].to(device)}, *norm)["image"]
            outputs = module.score(module.prepare_images(images))
            if tta == "hflip":
                mirrored = module.score(module.prepare_images(images.flip(-1)))
                for name in SCORES:
                    if name in outputs:
                        outputs[name] = (outputs[name].float() + mirrored[name].float()) / 2
        outputs["image_id"] = batch["image_id"]
        for key, value in outputs.items():
            parts.setdefault(key, []).append(value.float().cpu() if key != "image_id" else value)
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


def image_table(dataset: MURADataset, outputs: dict, source_size: int) -> pd.DataFrame:
    """One row per scored image: its index columns, each score, and the KALM box in original pixels."""
    ids = outputs["image_id"].numpy()
    frame = dataset.index.iloc[ids][INDEX_COLUMNS].reset_index(drop=True)
    for name in SCORES:
        if name in outputs:
            frame[prob_column(name)] = outputs[name].numpy()
    frame["prob"] = frame[prob_column(KALM)] if KALM in outputs else frame[prob_column(GLOBAL)]
    if "boxes" in outputs:
        pixels = box_to_pixels(outputs["boxes"], source_size).tolist()
        original = [
            to_original_pixels(box, *dataset.original_size(i), source_size, dataset.resize)
            for box, i in zip(pixels, ids, strict=True)
        ]
        frame[PIXEL_BOX] = np.round(np.array(original), 1)
        # the box's share of the image (w * h of a box in [-1, 1] units), as large as it is drawn
        frame["box_area"] = (outputs["boxes"][:, 2] * outputs["boxes"][:, 3]).numpy()
    return frame


def score_dataset(
    module: StageModule,
    dataset: MURADataset,
    batch_size: int,
    num_workers: int,
    device: str,
    precision: str,
    progress: bool = False,
    tta: str = "none",
) -> pd.DataFrame:
    """Run a trained stage over a dataset: one row per image with its scores and KALM box."""
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_bad
    )
    outputs = predict_images(module, loader, pick_device(device), precision, progress, tta)
    return image_table(dataset, outputs, module.preprocessing.source_size)
