"""KALM (section 3.2-3.4): the differentiable crop and the two-CNN network.

The paper's behaviour is the default everywhere. Its key area localizer (eq. 4-7) is
`KeyAreaLocalizer`, `localizer=kalm`, in `models/localizers/kalm.py` (re-exported here, where the
paper's contracts name it); every localizer lives in `models/localizers/`, shares the interface of
`models/localizers/base.py` and plugs into `KALMNet` through its own `conf/localizer/*.yaml`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.errors import check_choice
from kalm_lightning.models.backbone import Backbone, backbone_node
from kalm_lightning.models.localizers.base import (
    Localizer,
    LocalizerInputs,
    Scorer,
    TrainingCrops,
    box_pooling,
    build_localizer,
    node_of,
)
from kalm_lightning.models.localizers.kalm import KeyAreaLocalizer

__all__ = ["KALMNet", "KALMOutput", "KeyAreaLocalizer", "crop", "resize_view"]

LOCAL_INITS = ("backbone", "global")


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
    boxes: torch.Tensor  # [B, 4]: the box CNN_l read (of several: the one weighed most)
    prob: torch.Tensor
    crops: torch.Tensor | None = None  # [B, K, 4]: every window, where CNN_l reads K together
    attention: torch.Tensor | None = None  # [B, K]: their weights in S_l

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
    local_init: CNN_l from the backbone's weights, or a copy of CNN_g ("global"); stage 2 also
    takes a stage-2 checkpoint's path (`KALMStage.load_local`: that run's CNN_l).
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
        features: torch.Tensor | None = None,
    ) -> LocalizerInputs:
        """CNN_g's view of a batch: what the localizer reads (and, in training, the labels).
        features: CNN_g's feature maps of these images where they are known already (a frozen
        CNN_g's, cached: `stage.cache_global`); else CNN_g runs when they are first read."""
        view = resize_view(images, self.image_size)
        known = (
            features if features is not None else partial(self.global_cnn.forward_features, view)
        )
        return LocalizerInputs(known, self.class_weights(), view, images, generator, labels)

    def crops_of(
        self, images: torch.Tensor, boxes: torch.Tensor, size: int | None = None
    ) -> torch.Tensor:
        """The crops [B * M, 3, s, s] of M boxes per image [B, M, 4], image by image: eq. (8)-(9)
        (s: CNN_l's image size, or `size`)."""
        side = size or self.image_size
        return crop(images.repeat_interleave(boxes.size(1), 0), boxes.flatten(0, 1), side)

    def local_logits(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """S_l [B, M, 2] of M boxes per image [B, M, 4]: eq. (8)-(9), then CNN_l."""
        batch, many = boxes.shape[:2]
        if many == 1:
            return self.local_cnn(crop(images, boxes[:, 0], self.image_size))[:, None]
        return self.local_cnn(self.crops_of(images, boxes)).view(batch, many, -1)

    def local_readout(
        self, images: torch.Tensor, boxes: torch.Tensor, size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """S_l [B, M, 2] of M boxes per image, as `local_logits`, and CNN_l's classifier applied
        to each cell of each crop's feature map before the GAP [B, M, 2, h, w], without
        gradients: eq. (3) is linear, so their mean over a region is the score of the region's
        pooled features, and over the whole crop it is the crop's S_l."""
        batch, many = boxes.shape[:2]
        features = self.local_cnn.forward_features(self.crops_of(images, boxes, size))
        logits = self.local_cnn.forward_head(features)
        fc = self.local_cnn.fc
        with torch.no_grad():
            cells = F.conv2d(features.to(fc.weight.dtype), fc.weight[:, :, None, None])
            cells = cells + fc.bias[:, None, None]
        return logits.view(batch, many, -1), cells.view(batch, many, *cells.shape[1:])

    def crop_scores(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """p_l(abnormal) [B, K] of each box's crop, CNN_l in eval mode (its BatchNorm statistics
        are left alone)."""
        with _evaluating(self.local_cnn):
            return self.local_logits(images, boxes).float().softmax(-1)[..., 1]

    def pooled_scores(
        self, images: torch.Tensor, boxes: torch.Tensor, size: int | None = None
    ) -> torch.Tensor:
        """p_l(abnormal) [B, K] from one pass of CNN_l over the whole source image (resized to
        size x size where given), its feature map averaged inside each box (`box_pooling`) before
        its classifier: K boxes at the cost of one image. It matches the crops best where a box
        is seen at the scale of its crop: size = image_size / (2 x half-extent)."""
        with _evaluating(self.local_cnn):
            seen = images if size is None else resize_view(images, size)
            features = self.local_cnn.forward_features(seen).float()
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

    def pooled_logits(
        self, images: torch.Tensor, windows: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """S_l [B, 2] of K windows read together [B, K, 4]: each crop's pooled CNN_l features
        (eq. 8-9, then GAP), the localizer's pooling over the K (with its per-crop `scale`
        where it has one), CNN_l's classifier; and the windows' weights [B, K]."""
        batch, many = windows.shape[:2]
        features = self.local_cnn.forward_features(self.crops_of(images, windows)).mean(dim=(2, 3))
        pooled, weights = self.localizer.pool(features.view(batch, many, -1), scale)
        return self.local_cnn.fc(pooled), weights

    def forward(self, images: torch.Tensor) -> KALMOutput:
        inputs = self.inputs(images)
        if self.localizer.windowed:
            windows, scale = self.localizer.read_windows(inputs)
            logits, weights = self.pooled_logits(images, windows, scale)
            top = weights.argmax(dim=1)[:, None, None].expand(-1, 1, 4)
            out = self.fused(inputs, windows.gather(1, top)[:, 0], logits)
            out.crops, out.attention = windows, weights
            return out
        boxes = self.localizer.locate(inputs)
        return self.fused(inputs, boxes, self.local_logits(images, boxes[:, None])[:, 0])

    def mil(self, images: torch.Tensor) -> KALMOutput:
        """The MIL ceiling (`evaluate inference=mil`): CNN_l scores every candidate box of the
        localizer (K crops) and the most abnormal one stands for the image."""
        inputs = self.inputs(images)
        candidates = self.localizer.candidates(inputs)
        if candidates is None:
            raise ValueError(f"{type(self.localizer).__name__} has no candidate boxes to score")
        every = self.local_logits(images, candidates)
        best = every.float().softmax(-1)[..., 1].argmax(dim=1)
        rows = torch.arange(images.size(0), device=images.device)
        return self.fused(inputs, candidates[rows, best], every[rows, best])

    def fused(
        self, inputs: LocalizerInputs, boxes: torch.Tensor, local_logits: torch.Tensor
    ) -> KALMOutput:
        """S_g from CNN_g's features, and the fused score: the mean of the two softmax scores."""
        global_logits = self.global_cnn.forward_head(inputs.features)
        prob = (global_logits.float().softmax(1)[:, 1] + local_logits.float().softmax(1)[:, 1]) / 2
        return KALMOutput(global_logits, local_logits, boxes, prob)

    def training_outputs(
        self,
        images: torch.Tensor,
        epoch: int,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TrainingCrops]:
        """A training step's S_l [B, M, 2] on the boxes the localizer trains CNN_l on (features:
        CNN_g's, where cached)."""
        inputs = self.inputs(images, generator, labels, features)
        scorer = Scorer(self.crop_scores, self.pooled_scores, images)
        crops = self.localizer.training_crops(inputs, scorer, epoch)
        if crops.together:
            logits = self.pooled_logits(images, crops.boxes, crops.scale)[0][:, None]
        elif crops.learn is not None:  # a localizer taught by CNN_l's scores of these very crops
            logits, cells = self.local_readout(images, crops.boxes)
            scored, every_cells = logits.detach(), [cells]
            if crops.extra is not None:  # more crops, maybe at another size or only looked at
                with torch.set_grad_enabled(crops.extra_trains and torch.is_grad_enabled()):
                    more, more_cells = self.local_readout(images, crops.extra, crops.extra_size)
                logits = torch.cat([logits, more], dim=1) if crops.extra_trains else logits
                scored, every_cells = torch.cat([scored, more.detach()], 1), [cells, more_cells]
            crops.loss = crops.learn(scored, every_cells)
        else:
            logits = self.local_logits(images, crops.boxes)
        return logits, crops


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Run a module in eval mode for a block, then restore its mode."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
