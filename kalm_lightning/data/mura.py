"""MURA v1.1: the index of images and studies, the Dataset, and the LightningDataModule."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from PIL import Image
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data._utils.collate import default_collate
from torchvision.transforms.v2 import functional as TF

from kalm_lightning.data.cache import ImageCache
from kalm_lightning.data.images import BadImageError, load_grayscale, resize_square
from kalm_lightning.errors import UserError

log = logging.getLogger(__name__)

MURA_DIR = "MURA-v1.1"
SPLITS = ("train", "valid")
BODY_PARTS = (
    "XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def mura_base(root: str | Path) -> Path:
    """The folder above MURA-v1.1/, whether root names that folder or MURA-v1.1/ itself."""
    root = Path(root).expanduser().resolve()
    if (root / MURA_DIR).is_dir():
        return root
    if root.name == MURA_DIR and root.is_dir():
        return root.parent
    raise UserError(
        f"data.root={root} holds no {MURA_DIR}/ folder: point data.root at the folder that "
        f"contains {MURA_DIR}/ (or at {MURA_DIR}/ itself)"
    )


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path} is missing: is data.root the MURA v1.1 folder?")
    # MURA's CSVs have no header: reading one would silently drop the first row.
    frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    if frame.shape[1] != len(columns):
        raise UserError(f"{path}: expected {len(columns)} column(s) without a header, "
                        f"found {frame.shape[1]}")
    frame.columns = columns
    return frame


def _first_bad(csv_path: Path, frame: pd.DataFrame, bad: pd.Series, why: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{csv_path} row {row + 1}: {why}: {frame.iloc[row].tolist()[0]!r}")


def read_mura_index(root: str | Path, split: str, on_missing: str = "error") -> pd.DataFrame:
    """One row per image of a split: absolute path, study key, patient, body part, label (1 = abnormal)."""
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if on_missing not in ("error", "skip"):
        raise UserError(f"data.on_missing={on_missing!r} is not one of error, skip")
    base = mura_base(root)
    images_csv = base / MURA_DIR / f"{split}_image_paths.csv"
    studies_csv = base / MURA_DIR / f"{split}_labeled_studies.csv"
    images = _read_csv(images_csv, ["image"])
    studies = _read_csv(studies_csv, ["study", "label"])

    prefix = f"{MURA_DIR}/{split}/"
    for csv_path, frame, column in ((images_csv, images, "image"), (studies_csv, studies, "study")):
        paths = frame[column].str.strip()
        frame[column] = paths
        escapes = paths.map(lambda p: p.startswith(("/", "\\")) or ".." in PurePosixPath(p).parts)
        _first_bad(csv_path, frame, escapes, "path escapes the dataset root")
        _first_bad(csv_path, frame, ~paths.str.startswith(prefix), f"path does not start with {prefix}")

    studies["study"] = studies["study"].map(lambda s: s if s.endswith("/") else s + "/")
    _first_bad(studies_csv, studies, ~studies["label"].isin(["0", "1"]), "label is not 0 or 1")
    studies["label"] = studies["label"].astype(int)
    folder = studies["study"].str.rstrip("/").str.rsplit("/", n=1).str[-1]
    from_name = folder.map(lambda f: 1 if f.endswith("_positive") else 0 if f.endswith("_negative") else -1)
    _first_bad(studies_csv, studies, (from_name >= 0) & (from_name != studies["label"]),
               "label contradicts the study folder name")
    _first_bad(studies_csv, studies, studies["study"].duplicated(), "study listed twice")

    parts = images["image"].str.split("/")
    _first_bad(images_csv, images, parts.str.len() != 6,
               "expected MURA-v1.1/<split>/<body part>/<patient>/<study>/<image>")
    index = pd.DataFrame({
        "path": [str(base / p) for p in images["image"]],
        "image": images["image"],
        "study": parts.str[:5].str.join("/") + "/",
        "patient": parts.str[3],
        "body_part": parts.str[2],
    })
    labels = dict(zip(studies["study"], studies["label"], strict=True))
    index["label"] = index["study"].map(labels)
    _first_bad(images_csv, images, index["label"].isna(), f"image's study is not in {studies_csv.name}")
    index["label"] = index["label"].astype(int)

    missing = ~index["path"].map(os.path.isfile)
    if missing.any():
        shown = ", ".join(index.loc[missing, "image"].head(3))
        message = f"{int(missing.sum())} image(s) listed in {images_csv} are missing on disk: {shown}"
        if on_missing == "error":
            raise UserError(f"{message}; restore them, or set data.on_missing=skip")
        log.warning("%s; skipped (data.on_missing=skip)", message)
        index = index[~missing].reset_index(drop=True)
    return index


def read_lesion_boxes(root: str | Path) -> pd.DataFrame | None:
    """Ground-truth lesion boxes (synthetic data only; real MURA has none): path -> x0, y0, x1, y1."""
    path = mura_base(root) / MURA_DIR / "lesion_boxes.csv"
    if not path.is_file():
        return None
    boxes = pd.read_csv(path)
    boxes["path"] = [str(mura_base(root) / p) for p in boxes["image"]]
    return boxes


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


def patient_holdout(index: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split an index so that no patient has images on both sides."""
    patients = index["patient"].unique()
    rng = np.random.default_rng(seed)
    held = set(rng.choice(patients, size=max(1, round(fraction * len(patients))), replace=False))
    mask = index["patient"].isin(held)
    return index[~mask].reset_index(drop=True), index[mask].reset_index(drop=True)


class MURADataset(Dataset):
    """Radiographs as normalised [3, source_size, source_size] tensors with their ids and labels."""

    def __init__(
        self,
        index: pd.DataFrame,
        source_size: int = 448,
        train: bool = False,
        resize: str = "stretch",
        augment: Mapping[str, float] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        cache: ImageCache | None = None,
        on_bad_image: str = "error",
        skipped_log: str | Path | None = None,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise UserError(f"data.on_bad_image={on_bad_image!r} is not one of error, skip")
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
        with Image.open(self.paths[i]) as image:
            return image.height, image.width

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        pixels, reason = self._pixels(i)
        if pixels is None:
            record_skip(self.skipped_log, self.paths[i], reason)
            return None
        image = pixels.unsqueeze(0).float().div_(255.0)
        if self.augment.get("hflip", 0) and torch.rand(()) < self.augment["hflip"]:
            image = TF.horizontal_flip(image)
        degrees = self.augment.get("rotate_degrees", 0)
        if degrees:
            angle = float(torch.empty(()).uniform_(-degrees, degrees))
            image = TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR)
        image = (image.expand(3, -1, -1) - self.mean) / self.std
        return {
            "image": image,
            "label": int(self.labels[i]),
            "image_id": i,
            "study_id": int(self.study_codes[i]),
            "body_part": self.body_parts[i],
        }


def collate_skipping_bad(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Default collation minus the images skipped as bad; None when the whole batch was bad."""
    kept = [item for item in items if item is not None]
    return default_collate(kept) if kept else None


class MURADataModule(pl.LightningDataModule):
    """Train on MURA train; validate and test on MURA valid (the paper), or hold out patients."""

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
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        run_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size > source_size:
            raise UserError(f"data.image_size={image_size} exceeds data.source_size={source_size}: "
                            "the local crop samples from the larger source image")
        if not 0.0 <= val_from_train < 1.0:
            raise UserError(f"data.val_from_train={val_from_train} must be in [0, 1)")
        self.root, self.name = Path(root).expanduser(), name
        self.image_size, self.source_size, self.resize = image_size, source_size, resize
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers and num_workers > 0
        self.val_from_train, self.on_missing, self.on_bad_image = val_from_train, on_missing, on_bad_image
        self.use_cache, self.augment = cache, dict(augment or {})
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".kalm_cache"
        self.synthetic = dict(synthetic) if synthetic else None
        self.mean, self.std, self.seed = tuple(mean), tuple(std), seed
        self.skipped_log = Path(run_dir) / "skipped_images.csv" if run_dir else None
        self.indexes: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, MURADataset] = {}
        self.caches: dict[str, ImageCache] = {}

    def _split_indexes(self) -> dict[str, pd.DataFrame]:
        if not self.indexes:
            train = read_mura_index(self.root, "train", self.on_missing)
            valid = read_mura_index(self.root, "valid", self.on_missing)
            if self.val_from_train > 0:
                train, held = patient_holdout(train, self.val_from_train, self.seed)
                self.indexes = {"train": train, "val": held, "test": valid}
            else:
                self.indexes = {"train": train, "val": valid, "test": valid}
        return self.indexes

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
            from kalm_lightning.data.synthetic import ensure_synthetic_mura

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
            )
        return self.datasets[part]

    def setup(self, stage: str | None = None) -> None:
        parts = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for part in parts.get(stage or "fit", ("train", "val", "test")):
            self.dataset(part)

    @staticmethod
    def _world() -> tuple[int, int]:
        """(world size, rank) of the running process group, whatever launched it."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(self, part: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(part)
        world_size, rank = self._world()
        sampler = None
        if world_size > 1 and shuffle:
            sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=self.seed)
        elif world_size > 1:
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
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
