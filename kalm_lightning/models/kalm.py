"""KALM (section 3.2-3.4): key area localizer, differentiable crop, and the two-CNN network."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.errors import UserError
from kalm_lightning.models.backbone import Backbone

CENTRES = ("paper", "cell")
LOCAL_INITS = ("backbone", "global")


def _minmax(vector: torch.Tensor) -> torch.Tensor:
    low = vector.amin(dim=1, keepdim=True)
    span = vector.amax(dim=1, keepdim=True) - low
    # A constant vector scales to zeros instead of 0/0.
    return (vector - low) / span.clamp_min(torch.finfo(vector.dtype).tiny)


class KeyAreaLocalizer(nn.Module):
    """Eq. (4)-(7): a box (x, y, w, h) from a feature map; x, y by argmax, w, h learned."""

    def __init__(self, height: int, width: int, centre: str = "paper") -> None:
        super().__init__()
        if centre not in CENTRES:
            raise UserError(f"model.centre={centre!r} is not one of {', '.join(CENTRES)}")
        self.height, self.width, self.centre = height, width, centre
        self.fc_w = nn.Linear(width, 1)
        self.fc_h = nn.Linear(height, 1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        aggregated = feature_map.float().sum(dim=1)  # (4): [B, H, W]
        v_w = _minmax(aggregated.sum(dim=1))  # (5)-(6): [B, W]
        v_h = _minmax(aggregated.sum(dim=2))  # [B, H]
        offset = 0.5 if self.centre == "cell" else 0.0
        x = (v_w.argmax(dim=1).float() + offset) / self.width * 2 - 1  # (7)
        y = (v_h.argmax(dim=1).float() + offset) / self.height * 2 - 1
        w = torch.sigmoid(self.fc_w(v_w.to(self.fc_w.weight.dtype))).squeeze(1).float()
        h = torch.sigmoid(self.fc_h(v_h.to(self.fc_h.weight.dtype))).squeeze(1).float()
        return torch.stack([x, y, w, h], dim=1)


def crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Eq. (8)-(9): bilinear sampling of each box of images to size x size, differentiable in w, h."""
    x, y, w, h = boxes.to(images.dtype).unbind(dim=1)
    zero = torch.zeros_like(x)
    theta = torch.stack([torch.stack([w, zero, x], dim=1), torch.stack([zero, h, y], dim=1)], dim=1)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """The source image resized to the CNN input on the device (antialiased, like PIL)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


@dataclass
class KALMOutput:
    """What KALMNet returns: both CNNs' logits, the boxes, and the fused abnormal probability."""

    global_logits: torch.Tensor
    local_logits: torch.Tensor
    boxes: torch.Tensor
    prob: torch.Tensor

    @property
    def global_prob(self) -> torch.Tensor:
        return self.global_logits.float().softmax(dim=1)[:, 1]

    @property
    def local_prob(self) -> torch.Tensor:
        return self.local_logits.float().softmax(dim=1)[:, 1]


class KALMNet(nn.Module):
    """Fig. 1: CNN_g on the image at image_size, KALM on its features, CNN_l on the box from source_size."""

    def __init__(
        self,
        backbone: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        image_size: int = 224,
        source_size: int = 448,
        centre: str = "paper",
        local_init: str = "backbone",
    ) -> None:
        super().__init__()
        if local_init not in LOCAL_INITS:
            raise UserError(
                f"stage.local_init={local_init!r} is not one of {', '.join(LOCAL_INITS)}"
            )
        self.image_size, self.source_size = image_size, source_size
        self.global_cnn = Backbone(backbone, pretrained, checkpoint_path)
        height, width = self.global_cnn.feature_size(image_size)
        self.localizer = KeyAreaLocalizer(height, width, centre)
        local_weights = local_init == "backbone"
        self.local_cnn = Backbone(
            backbone, pretrained and local_weights, checkpoint_path if local_weights else None
        )
        if not local_weights:
            self.copy_global_to_local()

    def copy_global_to_local(self) -> None:
        """local_init=global: CNN_l starts as a copy of the (trained) CNN_g."""
        self.local_cnn.load_state_dict(self.global_cnn.state_dict())

    def forward(self, images: torch.Tensor) -> KALMOutput:
        features = self.global_cnn.forward_features(resize_view(images, self.image_size))
        global_logits = self.global_cnn.forward_head(features)
        boxes = self.localizer(features)
        local_logits = self.local_cnn(crop(images, boxes, self.image_size))
        prob = (global_logits.float().softmax(1)[:, 1] + local_logits.float().softmax(1)[:, 1]) / 2
        return KALMOutput(global_logits, local_logits, boxes, prob)
