"""Class activation maps (Zhou et al. 2016) of the paper's CNNs, in the source image's frame.

For the paper's CNN (GAP, then a linear layer) the map is exact, not an approximation: with F the
last feature map and w = W_fc[abnormal] - W_fc[normal], M = sum_c w_c F_c, and
mean(M) + b_abnormal - b_normal is the logit difference the softmax turns into p(abnormal). Each
map is min-max normalised per image to [0, 1] (what is drawn is where, not how much) and upsampled
to the source size: CNN_g's over the whole image, CNN_l's over its crop mapped back into the box
(zero outside it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kalm_lightning.models.backbone import Backbone
from kalm_lightning.models.kalm import KALMNet, crop, resize_view


def evidence_map(cnn: Backbone, images: torch.Tensor) -> torch.Tensor:
    """M [B, h, w] = sum_c (W_fc[abnormal] - W_fc[normal])_c F_c: the logit difference per cell."""
    features = cnn.forward_features(images).float()
    weights = (cnn.fc.weight[1] - cnn.fc.weight[0]).float()
    return torch.einsum("bchw,c->bhw", features, weights)


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map of [B, H, W] scaled to [0, 1] (a constant map to 0)."""
    low = maps.flatten(1).amin(1).view(-1, 1, 1)
    high = maps.flatten(1).amax(1).view(-1, 1, 1)
    return (maps - low) / (high - low).clamp_min(1e-12)


def upsampled(maps: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ]


def global_heatmap(cnn: Backbone, images: torch.Tensor, image_size: int) -> torch.Tensor:
    """CNN_g's map [B, S, S] of source images [B, 3, S, S] (it sees them at image_size)."""
    return upsampled(
        normalised(evidence_map(cnn, resize_view(images, image_size))), images.shape[-1]
    )


def local_heatmap(net: KALMNet, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """CNN_l's map of each box's crop, put back where the crop came from: [B, S, S], 0 outside.

    The crop samples source point (x + w u, y + h v) at crop point (u, v) (eq. 8-9); the inverse,
    u = (X - x) / w and v = (Y - y) / h, samples the crop's map at each source pixel X, Y."""
    size = images.shape[-1]
    maps = normalised(evidence_map(net.local_cnn, crop(images, boxes, net.image_size)))
    x, y, w, h = (v.float().view(-1, 1, 1) for v in boxes.unbind(dim=1))
    centres = (torch.arange(size, device=images.device, dtype=torch.float32) * 2 + 1) / size - 1
    grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
    grid = torch.stack([(grid_x - x) / w, (grid_y - y) / h], dim=-1)
    inside = (grid.abs() <= 1).all(dim=-1)  # the box; the map's edge cells reach its border
    sampled = F.grid_sample(
        maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled[:, 0] * inside
