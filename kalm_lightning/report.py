"""Reports of an evaluation: the paper's Table 1 (markdown), ROC curves, and Fig. 3-style box grids."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from kalm_lightning.data.images import fit_geometry

SCORE_LABELS = {"global": "g", "local": "l", "kalm": "KALM", "predictions": "predictions"}
PRED_COLOUR, TRUE_COLOUR = (255, 64, 64), (64, 255, 64)


def box_to_pixels(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """KALM boxes (x, y, w, h in [-1, 1] grid units) to (x0, y0, x1, y1) pixels of a size x size image."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack(
        [
            (x - w + 1) / 2 * size,
            (y - h + 1) / 2 * size,
            (x + w + 1) / 2 * size,
            (y + h + 1) / 2 * size,
        ],
        dim=-1,
    )


def to_original_pixels(
    box: Sequence[float], height: int, width: int, size: int, mode: str
) -> list[float]:
    """A box on the resized size x size source image mapped back onto the original radiograph."""
    scale_x, scale_y, left, top = fit_geometry(height, width, size, mode)
    x0, y0, x1, y1 = box
    return [
        (x0 - left) / scale_x,
        (y0 - top) / scale_y,
        (x1 - left) / scale_x,
        (y1 - top) / scale_y,
    ]


def to_source_pixels(
    box: Sequence[float], height: int, width: int, size: int, mode: str
) -> list[float]:
    """A box on the original radiograph mapped onto the resized size x size source image."""
    scale_x, scale_y, left, top = fit_geometry(height, width, size, mode)
    x0, y0, x1, y1 = box
    return [x0 * scale_x + left, y0 * scale_y + top, x1 * scale_x + left, y1 * scale_y + top]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised [B, 3, S, S] images to uint8 [B, S, S] for display (each rescaled to its range)."""
    grey = images[:, 0].float()
    low = grey.flatten(1).amin(1).view(-1, 1, 1)
    high = grey.flatten(1).amax(1).view(-1, 1, 1)
    return ((grey - low) / (high - low).clamp_min(1e-6) * 255).round().byte().numpy()


def box_grid(
    images: np.ndarray,
    boxes: Sequence[Sequence[float]],
    captions: Sequence[str] = (),
    true_boxes: Sequence[Sequence[float] | None] = (),
    columns: int = 4,
    tile: int = 224,
) -> Image.Image:
    """Radiographs with the KALM box in red and, where known, the lesion box in green."""
    rows = max(1, math.ceil(len(images) / columns))
    grid = Image.new("RGB", (columns * tile, rows * tile))
    for i, pixels in enumerate(images):
        scale = tile / pixels.shape[1]
        image = (
            Image.fromarray(pixels).convert("RGB").resize((tile, round(pixels.shape[0] * scale)))
        )
        draw = ImageDraw.Draw(image)
        if i < len(true_boxes) and true_boxes[i] is not None:
            draw.rectangle([v * scale for v in true_boxes[i]], outline=TRUE_COLOUR, width=2)
        draw.rectangle([v * scale for v in boxes[i]], outline=PRED_COLOUR, width=2)
        if i < len(captions):
            draw.text((4, 4), captions[i], fill=(255, 255, 0))
        grid.paste(image, ((i % columns) * tile, (i // columns) * tile))
    return grid


def boxes_figure(
    frame: pd.DataFrame, dataset, source_size: int, lesions: pd.DataFrame | None, count: int
) -> Image.Image:
    """Fig. 3: radiographs with their KALM box, images with a known lesion (or abnormal) first."""
    known = frame["path"].isin(lesions["path"]) if lesions is not None else frame["label"] == 1
    chosen = (list(frame.index[known]) + list(frame.index[~known]))[:count]
    positions = {p: i for i, p in enumerate(dataset.paths)}
    rows = [positions[frame.at[i, "path"]] for i in chosen]
    truth = lesions.set_index("path") if lesions is not None else None
    pred, true = [], []
    for i, row in zip(chosen, rows, strict=True):
        geometry = (*dataset.original_size(row), source_size, dataset.resize)
        pred.append(
            to_source_pixels(frame.loc[i, ["box_x0", "box_y0", "box_x1", "box_y1"]], *geometry)
        )
        path = frame.at[i, "path"]
        known_box = truth is not None and path in truth.index
        true.append(
            to_source_pixels(truth.loc[path, ["x0", "y0", "x1", "y1"]], *geometry)
            if known_box
            else None
        )
    captions = [
        f"{frame.at[i, 'body_part'][3:]} y={frame.at[i, 'label']} p={frame.at[i, 'prob']:.2f}"
        for i in chosen
    ]
    images = to_uint8(torch.stack([dataset[r]["image"] for r in rows]))
    return box_grid(images, pred, captions, true)


def log_box_grid(loggers: Sequence, batch: Mapping[str, torch.Tensor], step: int) -> None:
    """Send a validation box grid to the loggers that take images (TensorBoard, W&B)."""
    images = to_uint8(batch["images"])
    size = images.shape[-1]
    boxes = box_to_pixels(batch["boxes"], size).tolist()
    captions = [
        f"y={int(y)} p={float(p):.2f}" for y, p in zip(batch["label"], batch["prob"], strict=True)
    ]
    grid = np.asarray(box_grid(images, boxes, captions))
    for logger in loggers:
        name = type(logger).__name__
        if name == "TensorBoardLogger":
            logger.experiment.add_image("val/kalm_boxes", grid, step, dataformats="HWC")
        elif name == "WandbLogger":
            logger.log_image("val/kalm_boxes", [grid], step=None)


def roc_figure(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str
) -> None:
    """Study-level ROC curves of each score, AUROC in the legend."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    figure, axis = plt.subplots(figsize=(5, 5), dpi=120)
    for name, (prob, label) in curves.items():
        if torch.unique(label).numel() < 2:
            continue
        fpr, tpr, _ = binary_roc(prob.double(), label.long())
        auroc = binary_auroc(prob.double(), label.long()).item()
        axis.plot(
            fpr.numpy(), tpr.numpy(), label=f"{SCORE_LABELS.get(name, name)} (AUROC {auroc:.3f})"
        )
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _cell(value: float, interval: Sequence[float] | None, percent: bool) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:.1%}" if percent else f"{value:.3f}"
    if interval and not math.isnan(interval[0]):
        low, high = (f"{v:.1%}" if percent else f"{v:.3f}" for v in interval)
        text += f" [{low}, {high}]"
    return text


def table_rows(metrics: Mapping[str, Mapping], model: str, level: str = "study") -> list[list[str]]:
    """Rows of the paper's Table 1 for one model: score, accuracy, AUROC, kappa, studies."""
    rows = []
    for name, block in metrics.items():
        if name not in SCORE_LABELS:
            continue
        m, ci = block[level], block.get("intervals", {})
        label = f"{model}_{SCORE_LABELS[name]}" if name != "predictions" else model
        rows.append(
            [
                label,
                _cell(m["accuracy"], ci.get("accuracy"), True),
                _cell(m["auroc"], ci.get("auroc"), False),
                _cell(m["kappa"], ci.get("kappa"), False),
                str(m["n"]),
            ]
        )
    return rows


def table_markdown(metrics: Mapping[str, Mapping], model: str) -> str:
    """Table 1 at study level, then the same figures per body part."""
    head = "| model | accuracy | AUROC | kappa | studies |\n|---|---|---|---|---|\n"
    lines = [f"## {model}: study level (as the paper's Table 1)\n", head]
    lines += ["| " + " | ".join(row) + " |\n" for row in table_rows(metrics, model)]
    parts = sorted({part for block in metrics.values() for part in block.get("by_body_part", {})})
    for part in parts:
        lines += [f"\n### {part}\n\n", head]
        for name, block in metrics.items():
            if name in SCORE_LABELS and part in block["by_body_part"]:
                per_part = {name: {"study": block["by_body_part"][part]}}
                lines += ["| " + " | ".join(row) + " |\n" for row in table_rows(per_part, model)]
    return "".join(lines)


def write_json(data: Mapping, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
