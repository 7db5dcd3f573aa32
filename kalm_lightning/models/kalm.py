"""KALM (section 3.2-3.4): key area localizer, differentiable crop, and the two-CNN network.

The paper's behaviour is the default everywhere. `KeyAreaLocalizer` is `localizer=kalm`; its
options beyond the paper (`aggregation`, `centre`, `temperature`, `box_init`, for the localizer
study in `experiments/localizers/`) are named in config and each one's formula is in its docstring.
Other localizers (the controls and the navigators in `models/localizers/`) share its interface
(`models/localizer.py`) and plug into `KALMNet` through their own `conf/localizer/*.yaml`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.errors import check_choice, check_number
from kalm_lightning.models.backbone import Backbone, backbone_node
from kalm_lightning.models.localizer import (
    Localizer,
    LocalizerInputs,
    Scorer,
    TrainingCrops,
    box_pooling,
    build_localizer,
    node_of,
)

CENTRES = ("paper", "cell", "soft")
AGGREGATIONS = ("sum", "cam", "learned")
LOCAL_INITS = ("backbone", "global")


def _minmax(vector: torch.Tensor) -> torch.Tensor:
    low = vector.amin(dim=1, keepdim=True)
    span = vector.amax(dim=1, keepdim=True) - low
    # A constant vector scales to zeros instead of 0/0.
    return (vector - low) / span.clamp_min(torch.finfo(vector.dtype).tiny)


class KeyAreaLocalizer(Localizer):
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
    - lr: the localizer's own learning rate (fc_w, fc_h and learned channel weights).
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
        lr: float | None = None,
    ) -> None:
        super().__init__(height, width, channels or 0, lr)
        check_choice("localizer.centre", centre, CENTRES)
        check_choice("localizer.aggregation", aggregation, AGGREGATIONS)
        check_number("localizer.temperature", temperature, 0, exclusive_minimum=True)
        self.centre = centre
        self.aggregation, self.temperature = aggregation, float(temperature)
        self.fc_w = nn.Linear(width, 1)
        self.fc_h = nn.Linear(height, 1)
        if aggregation == "learned":
            if not channels:
                raise ValueError("aggregation='learned' needs the number of channels")
            self.channel_weights = nn.Parameter(torch.ones(channels))
        if box_init is not None:
            check_number("localizer.box_init", box_init, 0.001, 0.999)
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

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        """The Localizer interface: eq. (4)-(7) on CNN_g's map (its class weights for a CAM)."""
        return self(inputs.features, inputs.class_weights)


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


LocalizerSpec = Mapping[str, Any] | Callable[..., Localizer] | None


class KALMNet(nn.Module):
    """Fig. 1: CNN_g on the image at image_size, a localizer on its features, CNN_l on the box
    cropped from source_size, and the two softmax scores averaged.

    backbone: a timm name, or the backbone's config node (name, pretrained, checkpoint_path,
    output_stride: a finer feature map for the localizer, where timm's backbone has it).
    localizer: its config node (`conf/localizer/*.yaml`: `_target_` and options), a factory called
    with the feature map's height, width and channels, or None for the paper's KeyAreaLocalizer.
    local_init: CNN_l from the backbone's weights, or a copy of CNN_g ("global").
    global_cnn: a built CNN_g to use (stage 2 passes the one it loads from stage 1)."""

    def __init__(
        self,
        backbone: str | Mapping[str, Any],
        image_size: int = 224,
        source_size: int = 448,
        localizer: LocalizerSpec = None,
        local_init: str = "backbone",
        global_cnn: Backbone | None = None,
        pretrained: bool | None = None,
        checkpoint_path: str | None = None,
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("stage.local_init", local_init, LOCAL_INITS)
        settings = backbone_node(
            backbone,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            output_stride=output_stride,
        )
        name = settings["name"]
        weights = settings.get("pretrained", False), settings.get("checkpoint_path")
        self.image_size, self.source_size = image_size, source_size
        self.global_cnn = global_cnn or Backbone(name, *weights, settings.get("output_stride"))
        height, width = self.global_cnn.feature_size(image_size)
        node = localizer if localizer is not None else node_of(KeyAreaLocalizer)
        self.localizer = build_localizer(node, height, width, self.global_cnn.num_features)
        local_weights = local_init == "backbone"
        self.local_cnn = Backbone(
            name, bool(weights[0]) and local_weights, weights[1] if local_weights else None
        )
        if not local_weights:
            self.copy_global_to_local()

    def copy_global_to_local(self) -> None:
        """local_init=global: CNN_l starts as a copy of the (trained) CNN_g."""
        self.local_cnn.load_state_dict(self.global_cnn.state_dict())

    def class_weights(self) -> torch.Tensor:
        """W_fc[abnormal] - W_fc[normal] of CNN_g: what each channel says for 'abnormal' (CAM)."""
        return self.global_cnn.fc.weight[1] - self.global_cnn.fc.weight[0]

    def inputs(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
    ) -> LocalizerInputs:
        """CNN_g's view of a batch: what the localizer reads (and, in training, the labels)."""
        view = resize_view(images, self.image_size)
        features = self.global_cnn.forward_features(view)
        return LocalizerInputs(features, self.class_weights(), view, images, generator, labels)

    def local_logits(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """S_l [B, M, 2] of M boxes per image [B, M, 4]: eq. (8)-(9), then CNN_l."""
        batch, many = boxes.shape[:2]
        if many == 1:
            return self.local_cnn(crop(images, boxes[:, 0], self.image_size))[:, None]
        crops = crop(images.repeat_interleave(many, 0), boxes.flatten(0, 1), self.image_size)
        return self.local_cnn(crops).view(batch, many, -1)

    def crop_scores(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """p_l(abnormal) [B, K] of each box's crop, CNN_l in eval mode (its BatchNorm statistics
        are left alone)."""
        with _evaluating(self.local_cnn):
            return self.local_logits(images, boxes).float().softmax(-1)[..., 1]

    def pooled_scores(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """p_l(abnormal) [B, K] from one pass of CNN_l over the whole source image, its feature
        map averaged inside each box (`box_pooling`) before its classifier: K boxes at the cost of
        one image at the source size. It matches the crops best where a box's crop keeps the
        source's resolution (half-extent = image_size / source_size)."""
        with _evaluating(self.local_cnn):
            features = self.local_cnn.forward_features(images).float()
            batch, _, height, width = features.shape
            pooling = box_pooling(boxes.flatten(0, 1), height, width).to(features.device)
            pooled = torch.einsum(
                "bkn,bcn->bkc", pooling.view(batch, -1, height * width), features.flatten(2)
            )
            return (
                self.local_cnn.fc(pooled.to(self.local_cnn.fc.weight.dtype))
                .float()
                .softmax(-1)[..., 1]
            )

    def forward(self, images: torch.Tensor) -> KALMOutput:
        inputs = self.inputs(images)
        global_logits = self.global_cnn.forward_head(inputs.features)
        boxes = self.localizer.locate(inputs)
        if boxes.dim() == 2:
            local_logits = self.local_logits(images, boxes[:, None])[:, 0]
        else:  # candidates: CNN_l scores each, the most abnormal one stands for the image (MIL)
            every = self.local_logits(images, boxes)
            best = every.float().softmax(-1)[..., 1].argmax(dim=1)
            rows = torch.arange(images.size(0), device=images.device)
            local_logits, boxes = every[rows, best], boxes[rows, best]
        prob = (global_logits.float().softmax(1)[:, 1] + local_logits.float().softmax(1)[:, 1]) / 2
        return KALMOutput(global_logits, local_logits, boxes, prob)

    def training_outputs(
        self,
        images: torch.Tensor,
        epoch: int,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TrainingCrops]:
        """A training step's S_l [B, M, 2] on the boxes the localizer trains CNN_l on."""
        inputs = self.inputs(images, generator, labels)
        scorer = Scorer(self.crop_scores, self.pooled_scores, images)
        crops = self.localizer.training_crops(inputs, scorer, epoch)
        return self.local_logits(images, crops.boxes), crops


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Run a module in eval mode for a block, then restore its mode."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
