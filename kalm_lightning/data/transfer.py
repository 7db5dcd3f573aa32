"""What a batch becomes on the training device.

The DataLoader workers send each radiograph as uint8 single-channel pixels, [B, 1, S, S]: 12 times
fewer bytes than normalised float RGB, so the workers spend their time reading images rather than
copying floats. The augmentation drawn for each image in the worker (`hflip`, `angle`, from the
generator seeded by seed, epoch and index: a resumed run draws the same), the scaling to [0, 1],
the normalisation and the expansion to three channels run here, batched, on the device. The result
is exactly `MURADataset`'s documented output, [B, 3, S, S] normalised float; batches that already
are (a Dataset with `pixels=False`) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image rotated about its centre by its own angle (bilinear, black outside), batched."""
    angle = torch.deg2rad(degrees.to(images.device, torch.float32))
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def model_input(
    batch: dict[str, Any], mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> dict[str, Any]:
    """uint8 pixels (+ the drawn augmentation) -> normalised float [B, 3, S, S] on their device.

    The augmentation runs on one channel at 0-255 (black stays 0); scaling, normalising and the
    expansion to three channels are then one fused multiply-add, (p / 255 - mean) / std."""
    pixels = batch["image"]
    if pixels.dtype != torch.uint8:
        return batch
    images = pixels.float()
    if "hflip" in batch:
        flip = batch["hflip"].to(images.device).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
    if "angle" in batch:
        images = rotate(images, batch["angle"])
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return {**batch, "image": torch.addcmul(-mean / std, images, 1.0 / (255.0 * std))}
