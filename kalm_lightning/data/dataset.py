"""The MURA Dataset: radiographs as normalised tensors with their ids and labels, and bad images
skipped into the run's skipped_images.csv."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, DistributedSampler
from torch.utils.data._utils.collate import default_collate
from torchvision.transforms.v2 import functional as TF

from kalm_lightning.data.cache import ImageCache
from kalm_lightning.data.features import GLOBAL_FEATURES, FeatureCache
from kalm_lightning.data.images import BadImageError, image_size, load_grayscale, resize_square
from kalm_lightning.settings import check

log = logging.getLogger(__name__)
AUGMENTATIONS = ("hflip", "rotate_degrees")  # data.augment: probability, maximum angle


def record_skip(log_file: Path | None, path: str, reason: str) -> None:
    """Append an image skipped as bad to the run's skipped_images.csv: nothing is lost silently."""
    log.warning("skipped %s: %s", path, reason)
    if log_file is None:
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    new = not log_file.exists()
    with log_file.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["path", "reason"])
        writer.writerow([path, reason])


class MURADataset(Dataset):
    """Radiographs as normalised [3, source_size, source_size] tensors with their ids and labels.

    pixels=True (what MURADataModule uses): `image` is the uint8 [1, source_size, source_size]
    greyscale instead, with the augmentation drawn for it (`hflip`, `angle`) beside it;
    `data.transfer.model_input` turns a batch of these into the documented output on the device.
    `features`: CNN_g's cached feature maps (stage.cache_global), set by stage 2 once built; each
    item then carries its image's beside the pixels, as `GLOBAL_FEATURES`."""

    def __init__(
        self,
        index: pd.DataFrame,
        source_size: int = 448,
        train: bool = False,
        resize: str = "stretch",
        augment: Mapping[str, float] | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        cache: ImageCache | None = None,
        on_bad_image: str = "error",
        skipped_log: str | Path | None = None,
        seed: int = 0,
        pixels: bool = False,
    ) -> None:
        check("data.on_bad_image", on_bad_image)
        check("data.resize", resize)
        self.index = index.reset_index(drop=True)
        self.paths = self.index["path"].tolist()
        self.labels = self.index["label"].to_numpy()
        # Studies as integer codes: metric states must be tensors; index["study"] has the paths.
        self.study_codes = pd.factorize(self.index["study"])[0]
        self.body_parts = self.index["body_part"].tolist()
        self.source_size, self.train, self.resize = source_size, train, resize
        self.augment = dict(augment or {}) if train else {}
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.cache, self.on_bad_image = cache, on_bad_image
        self.skipped_log = Path(skipped_log) if skipped_log else None
        self.seed, self.pixels = seed, pixels
        self.features: FeatureCache | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _pixels(self, i: int) -> tuple[torch.Tensor | None, str]:
        """uint8 [source_size, source_size] pixels, or None and why for an image skipped as bad."""
        if self.cache is not None:
            return self.cache.get(i)[0], "skipped while building the cache"
        try:
            decoded = load_grayscale(self.paths[i])
        except BadImageError as error:
            if self.on_bad_image != "skip":
                raise
            return None, str(error)
        return torch.from_numpy(resize_square(decoded, self.source_size, self.resize)), ""

    def original_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image i before resizing, read from the cache or the PNG header."""
        if self.cache is not None:
            return self.cache.original_size(i)
        return image_size(self.paths[i])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        """Image `key`, or `(index, epoch)` from `EpochSampler`: augmentation is then drawn from a
        generator seeded by (seed, epoch, index), so a resumed run sees exactly the same images."""
        i, epoch = key if isinstance(key, tuple) else (key, None)
        pixels, reason = self._pixels(i)
        if pixels is None:
            record_skip(self.skipped_log, self.paths[i], reason)
            return None
        item = {
            "label": int(self.labels[i]),
            "image_id": i,
            "study_id": int(self.study_codes[i]),
            "body_part": self.body_parts[i],
        }
        if self.features is not None:
            item[GLOBAL_FEATURES] = self.features.get(i)
        drawn = self._draw(self._generator(i, epoch)) if self.augment else {}
        if self.pixels:  # augmented and normalised later, batched on the device
            return {"image": pixels.unsqueeze(0), **item, **drawn}
        image = pixels.unsqueeze(0).float().div_(255.0)
        if drawn.get("hflip"):
            image = TF.horizontal_flip(image)
        if "angle" in drawn:
            image = TF.rotate(image, drawn["angle"], interpolation=TF.InterpolationMode.BILINEAR)
        return {"image": (image.expand(3, -1, -1) - self.mean) / self.std, **item}

    def _generator(self, i: int, epoch: int | None) -> torch.Generator | None:
        if epoch is None:
            return None  # the process's own random state (a DataLoader without EpochSampler)
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)

    def _draw(self, generator: torch.Generator | None) -> dict[str, bool | float]:
        """This image's augmentation: a horizontal flip (data.augment.hflip = its probability)
        and a rotation angle in degrees (uniform within +-data.augment.rotate_degrees)."""
        drawn: dict[str, bool | float] = {}
        if self.augment.get("hflip", 0):
            drawn["hflip"] = bool(torch.rand((), generator=generator) < self.augment["hflip"])
        degrees = self.augment.get("rotate_degrees", 0)
        if degrees:
            drawn["angle"] = float(torch.empty(()).uniform_(-degrees, degrees, generator=generator))
        return drawn


class EpochSampler(DistributedSampler):
    """DistributedSampler's shuffle (seeded by seed + epoch, sharded by rank) yielding
    (index, epoch): the order and the augmentation of every epoch follow from the seed alone, so
    a resumed run goes on exactly as the uninterrupted run.

    `resume_at(epoch, skip)`: in that epoch, leave out the first `skip` indices of this rank's
    shard (the batches a run interrupted mid-epoch had already trained on). The length stays the
    whole epoch's, which is what Lightning counts batches against."""

    resume_epoch: int | None = None
    resume_skip: int = 0

    def resume_at(self, epoch: int, skip: int) -> None:
        self.resume_epoch, self.resume_skip = epoch, skip

    def __iter__(self):
        indices = super().__iter__()
        if self.epoch == self.resume_epoch:
            indices = islice(indices, self.resume_skip, None)
        return ((i, self.epoch) for i in indices)


def collate_skipping_bad(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Default collation minus the images skipped as bad; None when the whole batch was bad."""
    kept = [item for item in items if item is not None]
    return default_collate(kept) if kept else None
