"""Figures: the paper's Fig. 3 (radiographs with their KALM box and, where known, the lesion box),
class activation maps under the box with their colour scale, study-level ROC curves and the
reliability diagram."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from torchmetrics.functional.classification import binary_auroc, binary_roc

from kalm_lightning.data.geometry import LESION_BOX, PIXEL_BOX, to_source_pixels
from kalm_lightning.evaluation.studies import SCORE_LABELS
from kalm_lightning.runs import write_atomic

PRED_COLOUR, TRUE_COLOUR = (255, 64, 64), (64, 255, 64)
HEAT = matplotlib.colormaps["inferno"]
HEAT_NAMES = {"global": "CNN_g CAM", "local": "CNN_l CAM (in its box)"}


def save_figure(figure: Any, path: Path) -> None:
    """A matplotlib figure written as PNG through the one atomic writer, then closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomic(path, buffer.getvalue())


def heat_blend(pixels: np.ndarray, heat: np.ndarray) -> Image.Image:
    """A radiograph (uint8 [H, W]) under a map in [0, 1] of the same size: the colour of the map
    over the grey image, more opaque where the map is high (its cold parts leave the image seen)."""
    grey = np.repeat(pixels[..., None].astype(np.float32) / 255, 3, axis=-1)
    heat = np.clip(np.nan_to_num(heat), 0, 1)[..., None]
    alpha = 0.15 + 0.55 * heat
    rgb = (1 - alpha) * grey + alpha * HEAT(heat[..., 0])[..., :3]
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def colour_bar(height: int, width: int = 44) -> Image.Image:
    """The map's scale beside a picture: 1 (top) to 0 (bottom), labelled."""
    bar = Image.new("RGB", (width, height), (0, 0, 0))
    ramp = np.linspace(1, 0, max(height - 24, 2))
    strip = (HEAT(ramp)[:, :3] * 255).astype(np.uint8)
    bar.paste(Image.fromarray(np.repeat(strip[:, None], 14, axis=1)), (4, 12))
    draw = ImageDraw.Draw(bar)
    draw.text((21, 6), "1", fill=(255, 255, 255))
    draw.text((21, height - 18), "0", fill=(255, 255, 255))
    return bar


def with_colour_bar(image: Image.Image) -> Image.Image:
    bar = colour_bar(image.height)
    out = Image.new("RGB", (image.width + bar.width, image.height))
    out.paste(image, (0, 0))
    out.paste(bar, (image.width, 0))
    return out


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
    heat: Sequence[np.ndarray] | None = None,
) -> Image.Image:
    """Radiographs with the KALM box in red and, where known, the lesion box in green; with heat
    (a map in [0, 1] per image), each over its map, and the colour scale at the right."""
    rows = max(1, math.ceil(len(images) / columns))
    grid = Image.new("RGB", (columns * tile, rows * tile))
    for i, pixels in enumerate(images):
        scale = tile / pixels.shape[1]
        image = (
            Image.fromarray(pixels).convert("RGB") if heat is None else heat_blend(pixels, heat[i])
        ).resize((tile, round(pixels.shape[0] * scale)))
        draw = ImageDraw.Draw(image)
        if i < len(true_boxes) and true_boxes[i] is not None:
            draw.rectangle([v * scale for v in true_boxes[i]], outline=TRUE_COLOUR, width=2)
        draw.rectangle([v * scale for v in boxes[i]], outline=PRED_COLOUR, width=2)
        if i < len(captions):
            draw.text((4, 4), captions[i], fill=(255, 255, 0))
        grid.paste(image, ((i % columns) * tile, (i // columns) * tile))
    return grid if heat is None else with_colour_bar(grid)


def boxes_figure(
    frame: pd.DataFrame,
    dataset,
    source_size: int,
    lesions: pd.DataFrame | None,
    count: int,
    heatmaps=None,
) -> Image.Image:
    """Fig. 3: radiographs with their KALM box, images with a known lesion (or abnormal) first.
    heatmaps (the stage's, of uint8 [B, 1, S, S] items): each image once per map, over it."""
    known = frame["file"].isin(lesions["path"]) if lesions is not None else frame["label"] == 1
    chosen = (list(frame.index[known]) + list(frame.index[~known]))[:count]
    positions = {p: i for i, p in enumerate(dataset.paths)}
    rows = [positions[frame.at[i, "file"]] for i in chosen]
    truth = lesions.set_index("path") if lesions is not None else None
    pred, true = [], []
    for i, row in zip(chosen, rows, strict=True):
        geometry = (*dataset.original_size(row), source_size, dataset.resize)
        pred.append(to_source_pixels(frame.loc[i, PIXEL_BOX], *geometry))
        path = frame.at[i, "file"]
        known_box = truth is not None and path in truth.index
        true.append(to_source_pixels(truth.loc[path, LESION_BOX], *geometry) if known_box else None)
    captions = [
        f"{frame.at[i, 'body_part'][3:]} y={frame.at[i, 'label']} p={frame.at[i, 'prob']:.2f}"
        for i in chosen
    ]
    items = torch.stack([dataset[r]["image"] for r in rows])
    images = to_uint8(items)
    if heatmaps is None:
        return box_grid(images, pred, captions, true)
    maps = heatmaps(items)  # {score: [B, S, S]}
    tiles = [(i, name) for i in range(len(rows)) for name in maps]
    return box_grid(
        images[[i for i, _ in tiles]],
        [pred[i] for i, _ in tiles],
        [f"{captions[i]} {HEAT_NAMES.get(name, name)}" for i, name in tiles],
        [true[i] for i, _ in tiles],
        columns=4,
        heat=[maps[name][i] for i, name in tiles],
    )


def overlay_image(
    pixels: np.ndarray,
    box: Sequence[float] | None,
    caption: str,
    longest: int = 768,
    heatmaps: Mapping[str, np.ndarray] | None = None,
    windows: Sequence[tuple[Sequence[float], float]] = (),
) -> Image.Image:
    """A radiograph (uint8 [H, W], shown at most `longest` px) with its KALM box and a caption;
    with heatmaps ({score: [H, W] in [0, 1]}), one panel per map under the box and the colour
    scale at the right; windows: every (box, attention weight) of a model that reads K windows,
    drawn thinner, each with its weight."""
    scale = min(1.0, longest / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    shown = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))
    panels = []
    for name, heat in (heatmaps or {None: None}).items():
        if heat is None:
            image = Image.fromarray(shown).convert("RGB")
        else:
            heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(size, Image.BILINEAR))
            image = heat_blend(shown, heat)
        draw = ImageDraw.Draw(image)
        for window, weight in windows:
            corners = [v * scale for v in window]
            draw.rectangle(corners, outline=PRED_COLOUR, width=1)
            draw.text((corners[0] + 3, corners[1] + 2), f"a={weight:.2f}", fill=PRED_COLOUR)
        if box is not None:
            draw.rectangle([v * scale for v in box], outline=PRED_COLOUR, width=3)
        label = caption if name is None else f"{caption}  {HEAT_NAMES.get(name, name)}"
        draw.text((6, 6), label, fill=(255, 255, 0))
        panels.append(image)
    if heatmaps is None:
        return panels[0]
    row = Image.new("RGB", (sum(p.width for p in panels), size[1]))
    for i, panel in enumerate(panels):
        row.paste(panel, (i * size[0], 0))
    return with_colour_bar(row)


def roc_figure(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str
) -> None:
    """Study-level ROC curves of each score, AUROC in the legend."""
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
    save_figure(figure, path)


def reliability_figure(calibration: Mapping, path: Path, title: str) -> None:
    """The reliability diagram of the decision score per study, calibrated, with its ECE."""
    points = calibration["reliability_study"]
    figure, axis = plt.subplots(figsize=(5, 5), dpi=120)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    shown = [
        (p, o, n)
        for p, o, n in zip(
            points["mean_predicted"], points["observed"], points["count"], strict=True
        )
        if n
    ]
    if shown:
        predicted, observed, _ = zip(*shown, strict=True)
        axis.plot(predicted, observed, marker="o", label="studies per bin")
        for p, o, n in shown:
            axis.annotate(str(n), (p, o), fontsize=7, xytext=(3, -9), textcoords="offset points")
    t = calibration["temperature"]
    axis.set(
        xlabel="mean predicted probability (abnormal)",
        ylabel="observed abnormal rate",
        title=f"{title}\nECE {calibration['ece_study_calibrated']:.3f}"
        + (f" (before T = {t:.2f}: {calibration['ece_study']:.3f})" if t != 1.0 else ""),
        xlim=(0, 1),
        ylim=(0, 1),
    )
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
