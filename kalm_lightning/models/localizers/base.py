"""The one interface every localizer has, the anchors several share, and building one from its
config node (`conf/localizer/*.yaml`).

A localizer turns what the network has seen of an image into the box CNN_l looks at. It is built
with the shape of CNN_g's last feature map (`height`, `width`, `channels`) and its own options, and
it answers:

- `locate(inputs)`: the boxes [B, 4] (x, y, w, h in `affine_grid` units: the image spans [-1, 1],
  (x, y) is the centre, (w, h) the half-extent), always one per image;
- `candidates(inputs)`: the boxes [B, K, 4] it chooses among, where it has anchors (None where
  it has none): what `evaluate inference=mil` scores, keeping the one CNN_l finds most abnormal;
- `training_crops(inputs, scorer, epoch)`: the boxes [B, M, 4] CNN_l trains on in a
  training step and the localizer's own loss, if it has one. By default the located box, through
  which the bilinear crop's gradient reaches the localizer (the paper's eq. 8-9);
- `windows(inputs)` and `pool(features, scale)`, for a localizer whose CNN_l reads several crops
  at once (`MultiCrop`, `AttentionSampling`): the windows [B, K, 4], and how their K crop
  features [B, K, C] pool into the one [B, C] CNN_l's classifier scores, with each window's
  weight [B, K]; `read_windows(inputs)` gives the windows with a per-crop scale for `pool`
  where the localizer has one (attention sampling's weights); such a localizer says
  `windowed = True`. The others' CNN_l reads one crop, the box `locate` gives.

`scorer` scores boxes with CNN_l without gradients: a localizer that learns from the local branch
(`Navigator`) asks it which of its anchors looks most abnormal.

A new localizer is one class in this folder (a subclass of `Localizer`), one YAML under
`conf/localizer/` naming it in `_target_`, and one test.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kalm_lightning.errors import UserError, check_number

PACKAGE = "kalm_lightning.models."  # where a config node's _target_ may point


@dataclass
class LocalizerInputs:
    """What a localizer may read for a batch."""

    # CNN_g's last feature map F_g [B, C, H, W] (frozen in stage 2), or the function that
    # computes it on first use (`features`)
    _features: torch.Tensor | Callable[[], torch.Tensor]
    class_weights: torch.Tensor  # W_fc[abnormal] - W_fc[normal] of CNN_g [C] (for a CAM)
    view: torch.Tensor  # the global view CNN_g saw [B, 3, image_size, image_size]
    source: torch.Tensor  # the source image the crop samples from [B, 3, S, S]
    generator: torch.Generator | None = None  # for localizers that draw (random anchors)
    labels: torch.Tensor | None = None  # the images' labels [B] in training (None at inference)

    @property
    def features(self) -> torch.Tensor:
        """F_g, computed when first read: a training step whose localizer never reads it (a
        scout on the source, anchors, a fixed box) runs no CNN_g pass, as stage 2 trains CNN_l
        alone and CNN_g is frozen in eval mode."""
        if callable(self._features):
            self._features = self._features()
        return self._features


@dataclass
class TrainingCrops:
    """The boxes CNN_l trains on in one step, and the localizer's own loss."""

    boxes: torch.Tensor  # [B, M, 4]
    loss: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    together: bool = False  # True: the M crops are one input, pooled (`Localizer.pool`), one score
    scale: torch.Tensor | None = None  # [B, M]: what `pool` multiplies each crop's features by
    # the localizer's loss from CNN_l's logits of these crops [B, M, 2] and the cells of their
    # maps (a list of [B, M, 2, h, w]: `KALMNet.local_readout`), without gradients, where it learns
    # from them (set as `loss` once CNN_l has run: `KALMNet.training_outputs`)
    learn: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None
    extra: torch.Tensor | None = None  # [B, L, 4]: crops CNN_l reads after `boxes` (for `learn`)
    extra_size: int | None = None  # at this side (None: CNN_l's own)
    extra_trains: bool = False  # trained on (else scored without gradients, for `learn` alone)


class Scorer:
    """CNN_l's abnormal probability for boxes [B, K, 4] of a batch, without gradients.

    `score(images, boxes)` crops each box (as training and inference do) and runs CNN_l on it;
    `pooled(images, boxes)` runs CNN_l once, fully convolutionally, over the source image and
    averages its feature map inside each box: the cost of one pass at the source size for any K."""

    def __init__(self, crops: Callable, pooled: Callable, images: torch.Tensor) -> None:
        self._crops, self._pooled, self.images = crops, pooled, images

    def __call__(
        self,
        boxes: torch.Tensor,
        pooled: bool = False,
        size: int | None = None,
        rows: slice = slice(None),
    ) -> torch.Tensor:
        """size: the pooled pass over the source resized to size x size (None: as it is); rows:
        the images of the batch the boxes belong to (default: all)."""
        images = self.images[rows]
        with torch.no_grad():
            if pooled:
                return self._pooled(images, boxes, size)
            return self._crops(images, boxes)


class Localizer(nn.Module):
    """The shared base: the feature map's shape, and `lr`, the localizer's own learning rate
    (None: the optimiser's)."""

    windowed = False  # True: CNN_l reads `windows` together, pooled by `pool` (one score)
    # Options added since checkpoints were first written, at the value those checkpoints ran with:
    # a recorded node without one means that value, not today's default (`recorded`).
    recorded_before: Mapping[str, Any] = {}

    def __init__(self, height: int, width: int, channels: int, lr: float | None = None) -> None:
        super().__init__()
        if lr is not None:
            check_number("localizer.lr", lr, 0, exclusive_minimum=True)
        self.height, self.width, self.channels, self.lr = height, width, channels, lr

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        """The box [B, 4] CNN_l looks at."""
        raise NotImplementedError

    def candidates(self, inputs: LocalizerInputs) -> torch.Tensor | None:
        """The boxes [B, K, 4] `locate` chooses among, or None where there are none (a box
        computed, not chosen)."""
        return None

    def training_crops(self, inputs: LocalizerInputs, scorer: Scorer, epoch: int) -> TrainingCrops:
        return TrainingCrops(self.locate(inputs)[:, None])

    def windows(self, inputs: LocalizerInputs) -> torch.Tensor:
        """`windowed` localizers: the windows [B, K, 4] CNN_l reads together."""
        raise NotImplementedError(f"{type(self).__name__} reads one crop, the box `locate` gives")

    def read_windows(self, inputs: LocalizerInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`windowed` localizers at inference: the windows [B, K, 4] and the scale [B, K] `pool`
        gives each crop's features (None: the pooling's own weights alone)."""
        return self.windows(inputs), None

    def pool(
        self, features: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`windowed` localizers: K crop features [B, K, C] as one [B, C], and each crop's
        weight [B, K]; `scale` [B, K] as `read_windows` or `TrainingCrops.scale` give it."""
        raise NotImplementedError(f"{type(self).__name__} reads one crop: it has nothing to pool")


class Anchored(Localizer):
    """A localizer that picks one of fixed anchors (`anchor_grid`: `grid` x `grid` centres per
    half-extent `half`, as the navigator's): `candidates` are the anchors."""

    def __init__(
        self,
        height: int,
        width: int,
        channels: int,
        grid: int | Sequence[int] = 5,
        half: float | Sequence[float] = 0.5,
        lr: float | None = None,
    ) -> None:
        super().__init__(height, width, channels, lr)
        self.register_buffer("anchors", anchor_grid(grid, half), persistent=False)
        self._pooling: dict = {}  # `anchor_means`' matrices, per map size and device

    def candidates(self, inputs: LocalizerInputs) -> torch.Tensor:
        return self.anchors.expand(inputs.source.size(0), -1, -1)


def centred(batch: int, half: float, reference: torch.Tensor) -> torch.Tensor:
    """[batch, 4] copies of the centred box of half-extent `half` (1: the whole image)."""
    box = reference.new_tensor([0.0, 0.0, half, half], dtype=torch.float32)
    return box.expand(batch, 4)


def anchor_grid(grid: int | Sequence[int], half: float | Sequence[float]) -> torch.Tensor:
    """Anchor boxes [K, 4]: for each half-extent h, a grid x grid of centres evenly spaced from
    -1 + h to 1 - h, so the boxes of each size cover the whole image (several sizes: lists)."""
    grids = [grid] if isinstance(grid, int) else list(grid)
    halves = [half] if isinstance(half, (int, float)) else list(half)
    if len(grids) == 1 and len(halves) > 1:
        grids = grids * len(halves)
    if len(grids) != len(halves):
        raise UserError(
            f"localizer.grid={grids} and localizer.half={halves}: give one grid per anchor size"
        )
    boxes = []
    for n, h in zip(grids, halves, strict=True):
        check_number("localizer.grid", n, 1, integer=True)
        check_number("localizer.half", h, 0, 1, exclusive_minimum=True)
        centres = torch.linspace(-1 + h, 1 - h, n) if n > 1 else torch.zeros(1)
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        size = torch.full_like(x, h)
        boxes.append(torch.stack([x, y, size, size], dim=-1).reshape(-1, 4))
    return torch.cat(boxes)


def box_pooling(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[K, height * width]: the share of each box's area that each cell of a height x width map
    covers. `map.flatten(1) @ pooling.T` is then the exact average of a cell-wise constant map
    inside each box: a GAP restricted to the box, exportable as one matrix product."""

    def overlap(low: torch.Tensor, high: torch.Tensor, cells: int) -> torch.Tensor:
        edges = torch.linspace(-1, 1, cells + 1, dtype=torch.float64, device=low.device)
        inside = (
            torch.minimum(high[:, None], edges[None, 1:])
            - torch.maximum(low[:, None], edges[None, :-1])
        ).clamp_min(0)
        return inside / (high - low).clamp_min(1e-12)[:, None]  # [K, cells], rows sum to <= 1

    b = boxes.double()
    across = overlap(b[:, 0] - b[:, 2], b[:, 0] + b[:, 2], width)
    down = overlap(b[:, 1] - b[:, 3], b[:, 1] + b[:, 3], height)
    return (down[:, :, None] * across[:, None, :]).reshape(len(boxes), -1).float()


def crop_pooling(boxes: torch.Tensor, crops: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, M, K, height * width]: the share of each box [K, 4] that each cell of each crop's
    height x width map covers, crops [B, M, 4] (`box_pooling` of the box in the crop's own frame,
    where the crop spans [-1, 1]). A box's row sums to the share of it that the crop sees."""
    frame = crops[:, :, None, :]
    framed = torch.cat(
        [(boxes[..., :2] - frame[..., :2]) / frame[..., 2:], boxes[..., 2:] / frame[..., 2:]], -1
    )
    return box_pooling(framed.reshape(-1, 4), height, width).view(*framed.shape[:3], -1)


def anchor_means(anchors: torch.Tensor, maps: torch.Tensor, cache: dict) -> torch.Tensor:
    """[B, K]: each one-channel map [B, h, w] (or [B, 1, h, w]) averaged inside each anchor
    [K, 4] (`box_pooling`), the pooling matrix kept in `cache` per map size and device."""
    height, width = maps.shape[-2:]
    key = (height, width, maps.device)
    if key not in cache:
        cache[key] = box_pooling(anchors.cpu(), height, width).to(maps.device)
    return maps.flatten(1) @ cache[key].T


def _resolve(target: str) -> type[Localizer]:
    """The class a config node names: a Localizer subclass already imported, or one that a module
    of this package defines or re-exports; never anything else, so that a node read back from a
    checkpoint cannot name a function to call."""
    for cls in _subclasses(Localizer):
        if f"{cls.__module__}.{cls.__qualname__}" == target:
            return cls
    found = None
    if target.startswith(PACKAGE):
        module, _, name = target.rpartition(".")
        with contextlib.suppress(ImportError):
            found = getattr(importlib.import_module(module), name, None)
    if isinstance(found, type) and issubclass(found, Localizer):
        return found
    raise UserError(
        f"localizer._target_={target} is not a localizer: name a subclass of "
        "kalm_lightning.models.localizers.base.Localizer (see conf/localizer/)"
    )


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def build_localizer(
    node: Mapping[str, Any] | Callable[..., Localizer],
    height: int,
    width: int,
    channels: int,
) -> Localizer:
    """A localizer from its config node ({"_target_": class path, **options}) or a factory."""
    if not isinstance(node, Mapping):
        return node(height=height, width=width, channels=channels)
    options = {k: v for k, v in node.items() if not k.startswith("_")}
    if "_target_" not in node:
        raise UserError("a localizer config node needs _target_ (see conf/localizer/)")
    cls = _resolve(str(node["_target_"]))
    try:
        return cls(height=height, width=width, channels=channels, **options)
    except TypeError as error:
        raise UserError(f"localizer {node['_target_']}: {error}") from error


def recorded(node: Mapping[str, Any]) -> dict[str, Any]:
    """A localizer's node as a checkpoint recorded it, each option added since at the value that
    checkpoint ran with (its class's `recorded_before`)."""
    return {**_resolve(str(node["_target_"])).recorded_before, **node}


def node_of(cls: type[Localizer], **options: Any) -> dict[str, Any]:
    """The config node of a localizer class with options (what a checkpoint stores)."""
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **options}
