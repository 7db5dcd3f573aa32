"""Box geometry, one home: KALM's [-1, 1] boxes, pixels of the square source image, pixels of the
original radiograph, and the overlap of two boxes.

A KALM box is (x, y, w, h) in `affine_grid` units: the image spans [-1, 1] on both axes, (x, y) is
the crop's centre and (w, h) its half-extent (eq. 8-9), so the box covers [x - w, x + w] x
[y - h, y + h]. Pixel boxes are (x0, y0, x1, y1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

PIXEL_BOX = ["box_x0", "box_y0", "box_x1", "box_y1"]
LESION_BOX = ["x0", "y0", "x1", "y1"]


def crop_box(k: int) -> list[str]:
    """The pixel-box columns of window k (1, 2, ...) of a model whose CNN_l reads K windows."""
    return [f"crop{k}_{side}" for side in ("x0", "y0", "x1", "y1")]


def crop_weight(k: int) -> str:
    """The column of window k's attention weight."""
    return f"crop{k}_weight"


def windows_in(columns) -> int:
    """How many windows (K) a prediction table's columns hold (0 for a one-crop model)."""
    k = 0
    while crop_weight(k + 1) in columns:
        k += 1
    return k


def fit_geometry(
    height: int, width: int, size: int, mode: str
) -> tuple[float, float, float, float]:
    """(scale_x, scale_y, offset_x, offset_y) mapping original pixels into the size x size square."""
    if mode == "stretch":
        return size / width, size / height, 0.0, 0.0
    scale = size / max(height, width)
    return scale, scale, (size - width * scale) / 2, (size - height * scale) / 2


def to_original_map(heat: np.ndarray, height: int, width: int, size: int, mode: str) -> np.ndarray:
    """A map over the size x size model input [size, size] onto the original image [H, W]: the
    part of the square the image fills (all of it when stretched, the unpadded part when padded),
    resized bilinearly."""
    scale_x, scale_y, off_x, off_y = fit_geometry(height, width, size, mode)
    region = (off_x, off_y, off_x + width * scale_x, off_y + height * scale_y)
    image = Image.fromarray(np.asarray(heat, dtype=np.float32))  # mode F
    return np.asarray(image.resize((width, height), Image.BILINEAR, box=region))


def box_to_pixels(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """KALM boxes [..., 4] (x, y, w, h in [-1, 1] units) to (x0, y0, x1, y1) pixels of a size x size image."""
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


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise intersection over union of two [N, 4] arrays of (x0, y0, x1, y1) boxes."""
    iw = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(min=0)
    ih = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(min=0)
    inter = iw * ih
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)
