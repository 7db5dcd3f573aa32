"""KALM (section 3.2-3.4): key area localizer, differentiable crop, and the two-CNN network.

The paper's behaviour is the default everywhere. Options beyond the paper (for the localizer study,
`experiments/synthetic/`) are named in config and each one's formula is in its docstring:
`aggregation` (sum | cam | learned), `centre` (paper | cell | soft), `box_init`, and, in KALMNet,
`crop` (kalm | full | fixed: the study's controls)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.errors import check_choice, check_number
from kalm_lightning.models.backbone import Backbone

CENTRES = ("paper", "cell", "soft")
AGGREGATIONS = ("sum", "cam", "learned")
LOCAL_INITS = ("backbone", "global")
CROPS = ("kalm", "full", "fixed")


def _minmax(vector: torch.Tensor) -> torch.Tensor:
    low = vector.amin(dim=1, keepdim=True)
    span = vector.amax(dim=1, keepdim=True) - low
    # A constant vector scales to zeros instead of 0/0.
    return (vector - low) / span.clamp_min(torch.finfo(vector.dtype).tiny)


class KeyAreaLocalizer(nn.Module):
    """Eq. (4)-(7): a box (x, y, w, h) from a feature map; x, y by argmax, w, h learned.

    Beyond the paper (defaults keep it exact):
    - aggregation="cam": A = sum_c (W_fc[abnormal, c] - W_fc[normal, c]) F_c, the class activation
      map, instead of eq. (4)'s plain channel sum; needs `class_weights` in forward.
    - aggregation="learned": A = sum_c a_c F_c with a learnable a (starts at 1: eq. 4).
    - centre="cell": x = (argmax + 1/2) / W * 2 - 1, the winning cell's centre.
    - centre="soft": x = sum_j softmax(temperature * v_w)_j * ((j + 1/2) / W * 2 - 1), a
      soft-argmax through which x and y get a gradient (the paper's argmax gets none).
    - box_init=s: fc_w and fc_h start with zero weights and bias logit(s), so every box starts with
      half-extent s (PyTorch's default start gives about sigmoid(0) = 0.5 with noise).
    """

    def __init__(
        self,
        height: int,
        width: int,
        centre: str = "paper",
        aggregation: str = "sum",
        channels: int | None = None,
        temperature: float = 10.0,
        box_init: float | None = None,
    ) -> None:
        super().__init__()
        check_choice("stage.centre", centre, CENTRES)
        check_choice("stage.aggregation", aggregation, AGGREGATIONS)
        check_number("stage.temperature", temperature, 0, exclusive_minimum=True)
        self.height, self.width, self.centre = height, width, centre
        self.aggregation, self.temperature = aggregation, float(temperature)
        self.fc_w = nn.Linear(width, 1)
        self.fc_h = nn.Linear(height, 1)
        if aggregation == "learned":
            if channels is None:
                raise ValueError("aggregation='learned' needs the number of channels")
            self.channel_weights = nn.Parameter(torch.ones(channels))
        if box_init is not None:
            check_number("stage.box_init", box_init, 0.001, 0.999)
            for fc in (self.fc_w, self.fc_h):
                nn.init.zeros_(fc.weight)
                nn.init.constant_(fc.bias, math.log(box_init / (1 - box_init)))

    def aggregate(
        self, feature_map: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq. (4): the map A [B, H, W] whose profiles place the box (see the class docstring)."""
        features = feature_map.float()
        if self.aggregation == "sum":
            return features.sum(dim=1)
        if self.aggregation == "cam":
            if class_weights is None:
                raise ValueError("aggregation='cam' needs the global classifier's class_weights")
            weights = class_weights.float()
        else:
            weights = self.channel_weights.float()
        return torch.einsum("bchw,c->bhw", features, weights)

    def position(self, profile: torch.Tensor, cells: int) -> torch.Tensor:
        """Eq. (7): the centre in [-1, 1] along one axis from its min-max scaled profile [B, cells]."""
        if self.centre == "soft":
            grid = (torch.arange(cells, device=profile.device, dtype=profile.dtype) + 0.5) / cells
            weights = torch.softmax(self.temperature * profile, dim=1)
            return (weights * (grid * 2 - 1)).sum(dim=1)
        offset = 0.5 if self.centre == "cell" else 0.0
        return (profile.argmax(dim=1).float() + offset) / cells * 2 - 1

    def forward(
        self, feature_map: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        aggregated = self.aggregate(feature_map, class_weights)  # (4): [B, H, W]
        v_w = _minmax(aggregated.sum(dim=1))  # (5)-(6): [B, W]
        v_h = _minmax(aggregated.sum(dim=2))  # [B, H]
        x, y = self.position(v_w, self.width), self.position(v_h, self.height)  # (7)
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
    """Fig. 1: CNN_g on the image at image_size, KALM on its features, CNN_l on the box from source_size.

    Beyond the paper: the localizer's options (see KeyAreaLocalizer), `output_stride` for CNN_g
    (a finer feature map for the localizer, where timm's backbone has it), and two controls for the
    study: crop="full" feeds the whole image to CNN_l (the box (0, 0, 1, 1)), crop="fixed" a centred
    box of half-extent `fixed_box`; neither uses the localizer's box."""

    def __init__(
        self,
        backbone: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        image_size: int = 224,
        source_size: int = 448,
        centre: str = "paper",
        local_init: str = "backbone",
        aggregation: str = "sum",
        temperature: float = 10.0,
        box_init: float | None = None,
        crop: str = "kalm",
        fixed_box: float = 0.5,
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("stage.local_init", local_init, LOCAL_INITS)
        check_choice("stage.crop", crop, CROPS)
        check_number("stage.fixed_box", fixed_box, 0, 1, exclusive_minimum=True)
        self.image_size, self.source_size = image_size, source_size
        self.crop_mode, self.fixed_box = crop, float(fixed_box)
        self.global_cnn = Backbone(backbone, pretrained, checkpoint_path, output_stride)
        height, width = self.global_cnn.feature_size(image_size)
        self.localizer = KeyAreaLocalizer(
            height, width, centre, aggregation, self.global_cnn.num_features, temperature, box_init
        )
        local_weights = local_init == "backbone"
        self.local_cnn = Backbone(
            backbone, pretrained and local_weights, checkpoint_path if local_weights else None
        )
        if not local_weights:
            self.copy_global_to_local()

    def copy_global_to_local(self) -> None:
        """local_init=global: CNN_l starts as a copy of the (trained) CNN_g."""
        self.local_cnn.load_state_dict(self.global_cnn.state_dict())

    def class_weights(self) -> torch.Tensor:
        """W_fc[abnormal] - W_fc[normal] of CNN_g: what each channel says for 'abnormal' (CAM)."""
        weight = self.global_cnn.fc.weight
        return weight[1] - weight[0]

    def boxes(self, features: torch.Tensor) -> torch.Tensor:
        """The crop boxes: the localizer's (eq. 4-7), or a control's fixed box."""
        if self.crop_mode == "kalm":
            return self.localizer(features, self.class_weights())
        half = 1.0 if self.crop_mode == "full" else self.fixed_box
        box = features.new_tensor([0.0, 0.0, half, half], dtype=torch.float32)
        return box.expand(features.shape[0], 4)

    def forward(self, images: torch.Tensor) -> KALMOutput:
        features = self.global_cnn.forward_features(resize_view(images, self.image_size))
        global_logits = self.global_cnn.forward_head(features)
        boxes = self.boxes(features)
        local_logits = self.local_cnn(crop(images, boxes, self.image_size))
        prob = (global_logits.float().softmax(1)[:, 1] + local_logits.float().softmax(1)[:, 1]) / 2
        return KALMOutput(global_logits, local_logits, boxes, prob)
