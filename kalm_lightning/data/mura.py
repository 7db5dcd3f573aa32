"""MURA v1.1 for Lightning: the DataModule; the index and the Dataset are re-exported from here."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from kalm_lightning.data.cache import ImageCache
from kalm_lightning.data.dataset import (
    AUGMENTATIONS,
    EpochSampler,
    MURADataset,
    collate_skipping_bad,
    record_skip,
)
from kalm_lightning.data.index import (
    BODY_PARTS,
    MURA_DIR,
    patient_holdout,
    patient_split,
    read_lesion_boxes,
    read_mura_index,
)
from kalm_lightning.data.synthetic import ensure_synthetic_mura
from kalm_lightning.data.transfer import model_input
from kalm_lightning.errors import UserError, check_choice, check_number
from kalm_lightning.runs import HOLDOUT_FILE, write_atomic
from kalm_lightning.settings import check

__all__ = [
    "BODY_PARTS",
    "MURA_DIR",
    "MURADataModule",
    "MURADataset",
    "collate_skipping_bad",
    "read_lesion_boxes",
    "read_mura_index",
]

log = logging.getLogger(__name__)


class MURADataModule(pl.LightningDataModule):
    """Train on MURA train; validate and test on MURA valid (the paper), or hold out patients.

    The hold-out: `val_from_train` of train's patients drawn with `seed` (a training run's own
    seed), or exactly the patients `held_out` names (what a checkpoint recorded it validated on:
    `holdout`, read back by `evaluate split=holdout`)."""

    def __init__(
        self,
        root: str,
        name: str = "mura",
        image_size: int = 224,
        source_size: int = 448,
        resize: str = "stretch",
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_from_train: float = 0.0,
        on_missing: str = "error",
        on_bad_image: str = "error",
        cache: bool = False,
        cache_dir: str | None = None,
        augment: Mapping[str, float] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        run_dir: str | None = None,
        seed: int = 0,
        device_transforms: bool = True,
        held_out: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        for setting, value in (
            ("data.resize", resize),
            ("data.on_missing", on_missing),
            ("data.on_bad_image", on_bad_image),
            ("data.image_size", image_size),
            ("data.source_size", source_size),
            ("data.batch_size", batch_size),
            ("data.num_workers", num_workers),
        ):
            check(setting, value)
        for key, value in (augment or {}).items():
            check_choice("data.augment key", key, AUGMENTATIONS)
            upper = 1 if key == "hflip" else 180
            check_number(f"data.augment.{key}", value, 0, upper)
        if image_size > source_size:
            raise UserError(
                f"data.image_size={image_size} exceeds data.source_size={source_size}: "
                "the local crop samples from the larger source image"
            )
        if not 0.0 <= val_from_train < 1.0:
            raise UserError(f"data.val_from_train={val_from_train} must be in [0, 1)")
        self.root, self.name = Path(root).expanduser(), name
        self.image_size, self.source_size, self.resize = image_size, source_size, resize
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.val_from_train = pin_memory, val_from_train
        self.persistent_workers = persistent_workers and num_workers > 0
        self.on_missing, self.on_bad_image = on_missing, on_bad_image
        self.use_cache, self.augment = cache, dict(augment or {})
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".kalm_cache"
        self.synthetic = dict(synthetic) if synthetic else None
        self.mean, self.std, self.seed = tuple(mean), tuple(std), seed
        self.held_out = None if held_out is None else sorted(map(str, held_out))
        self.device_transforms = device_transforms
        self.run_dir = Path(run_dir) if run_dir else None
        self.skipped_log = self.run_dir / "skipped_images.csv" if self.run_dir else None
        self.indexes: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, MURADataset] = {}
        self.caches: dict[str, ImageCache] = {}
        self.resume_position: tuple[int, int] | None = None
        self.predicting: MURADataset | None = None

    def _split_indexes(self) -> dict[str, pd.DataFrame]:
        if not self.indexes:
            train = read_mura_index(self.root, "train", self.on_missing)
            valid = read_mura_index(self.root, "valid", self.on_missing)
            if self.held_out is not None:
                train, held = patient_split(train, self.held_out)
                missing = set(self.held_out) - set(held["patient"])
                if missing:
                    raise UserError(
                        f"{len(missing)} of the {len(self.held_out)} held-out patients the "
                        f"checkpoint records (e.g. {sorted(missing)[0]}) are not in the train "
                        f"split under data.root={self.root}: give the data it trained on"
                    )
                self.indexes = {"train": train, "val": held, "test": valid}
            elif self.val_from_train > 0:
                train, held = patient_holdout(train, self.val_from_train, self.seed)
                self.indexes = {"train": train, "val": held, "test": valid}
            else:
                self.indexes = {"train": train, "val": valid, "test": valid}
        return self.indexes

    @property
    def holdout(self) -> dict[str, Any] | None:
        """The hold-out of train that validates (None when MURA valid does): how it was drawn and
        its patients, which every checkpoint records so that evaluate scores exactly these."""
        if self.held_out is None and not self.val_from_train > 0:
            return None
        patients = sorted(self._split_indexes()["val"]["patient"].unique().tolist())
        return {"fraction": self.val_from_train, "seed": self.seed, "patients": patients}

    def _cache(self, part: str) -> ImageCache | None:
        """One cache per split, made once: its key stats every image file."""
        if not self.use_cache:
            return None
        if part not in self.caches:
            paths = self._split_indexes()[part]["path"].tolist()
            self.caches[part] = ImageCache(self.cache_dir, paths, self.source_size, self.resize)
        return self.caches[part]

    def prepare_data(self) -> None:
        """Generate synthetic data and build caches once per node, before any process reads them."""
        if self.synthetic is not None:
            ensure_synthetic_mura(self.root, **self.synthetic)
        for part in ("train", "val", "test"):
            cache = self._cache(part)
            if cache is not None and not cache.ready:
                log.info("Caching %s images of %s under %s", part, self.root, self.cache_dir)
                for path, reason in cache.build(self.num_workers, self.on_bad_image):
                    record_skip(self.skipped_log, path, reason)

    def dataset(self, part: str) -> MURADataset:
        """The Dataset of 'train', 'val' or 'test' (val and test are MURA valid unless held out)."""
        if part not in self.datasets:
            self.datasets[part] = MURADataset(
                self._split_indexes()[part],
                source_size=self.source_size,
                train=part == "train",
                resize=self.resize,
                augment=self.augment,
                mean=self.mean,
                std=self.std,
                cache=self._cache(part),
                on_bad_image=self.on_bad_image,
                skipped_log=self.skipped_log,
                seed=self.seed,
                pixels=self.device_transforms,
            )
        return self.datasets[part]

    def predict_on(
        self, images: str | pd.DataFrame = "test", on_bad_image: str | None = None
    ) -> MURADataset:
        """What `predict_dataloader` scores (evaluate and predict, through `Trainer.predict`): a
        part of the splits ('train', 'val', 'test'), as it is, never augmented; or an index of
        any files (predict's: `path`, `study`, `body_part`, `label`), decoded as the parts are."""
        if isinstance(images, str):
            index, cache = self._split_indexes()[images], self._cache(images)
        else:
            index, cache = images, None
        self.predicting = MURADataset(
            index,
            source_size=self.source_size,
            resize=self.resize,
            mean=self.mean,
            std=self.std,
            cache=cache,
            on_bad_image=on_bad_image or self.on_bad_image,
            skipped_log=self.skipped_log,
            pixels=self.device_transforms,
        )
        return self.predicting

    def setup(self, stage: str | None = None) -> None:
        parts = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (),  # predict_on chooses what is scored
        }
        for part in parts.get(stage or "fit", ("train", "val", "test")):
            self.dataset(part)
        main = self.trainer is None or self.trainer.is_global_zero
        if stage == "fit" and self.run_dir is not None and self.holdout is not None and main:
            columns = ["image", "patient", "study", "body_part", "label"]  # as MURA lists them
            self.run_dir.mkdir(parents=True, exist_ok=True)
            held = self._split_indexes()["val"][columns].rename(columns={"image": "path"})
            held = held.to_csv(index=False)
            write_atomic(self.run_dir / HOLDOUT_FILE, held)

    @staticmethod
    def _world() -> tuple[int, int]:
        """(world size, rank) of the running process group, whatever launched it."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(self, part: str | MURADataset, shuffle: bool, whole: bool = False) -> DataLoader:
        dataset = self.dataset(part) if isinstance(part, str) else part
        world_size, rank = self._world()
        sampler = None
        if shuffle:  # also on one process: the epoch's order and augmentation follow from the seed
            sampler = EpochSampler(dataset, world_size, rank, shuffle=True, seed=self.seed)
            if self.resume_position is not None:
                epoch, batches = self.resume_position
                sampler.resume_at(epoch, batches * self.batch_size)
        elif world_size > 1 and not whole:
            # Lightning's default sampler pads shards, counting images twice; this one does not.
            sampler = UnrepeatedDistributedSampler(dataset, world_size, rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_skipping_bad,
            drop_last=False,
            generator=torch.Generator() if whole else None,  # whole: the global state untouched
        )

    def every_image(self, part: str) -> DataLoader:
        """Every image of a part in order, on this process whatever the world size, drawing
        nothing from the global random state: what stage.cache_global computes CNN_g's maps of."""
        return self._loader(part, shuffle=False, whole=True)

    def on_after_batch_transfer(self, batch: dict | None, dataloader_idx: int) -> dict | None:
        """data.device_transforms: augment, normalise and expand the uint8 pixels on the device."""
        return None if batch is None else model_input(batch, self.mean, self.std)

    def state_dict(self) -> dict[str, int]:
        """Where the train loader stands, saved in every checkpoint: the epoch and how many of its
        batches were trained on (all of them at an epoch's end, fewer when preempted mid-epoch)."""
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """A resumed run's train loader skips the batches its checkpoint had trained on."""
        if "epoch" in state_dict:
            self.resume_position = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predicting or self.predict_on("test"), shuffle=False)
