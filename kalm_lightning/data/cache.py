"""A uint8 memory map of decoded, resized images, so epochs after the first skip PNG decoding."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kalm_lightning.data.images import BadImageError, load_grayscale, resize_square
from kalm_lightning.progress import progress

CACHE_VERSION = 1


def files_digest(version: int, paths: Sequence[str], *key: object) -> str:
    """A cache's key: its format's version, every file's path, size and modification time, and
    what else it follows from; any change, and the key is another (a stale cache is never read)."""
    stats = [(st.st_size, st.st_mtime_ns) for st in map(os.stat, paths)]
    return hashlib.sha1(json.dumps([version, list(paths), stats, *key]).encode()).hexdigest()[:16]


def reserve(path: Path) -> None:
    """Claim a file's blocks before writing it through a memory map: a disk too small fails here,
    with its errno and the file's name, not with a SIGBUS when a page of the map is written."""
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return  # a file system without fallocate: written as it goes
        path.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from error


class _DecodeOnce(Dataset):
    def __init__(self, paths: Sequence[str], size: int, resize: str) -> None:
        self.paths, self.size, self.resize = paths, size, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, tuple[int, int], str]:
        try:
            pixels = load_grayscale(self.paths[i])
        except BadImageError as error:
            return i, None, (0, 0), str(error)
        return i, resize_square(pixels, self.size, self.resize), pixels.shape, ""


class ImageCache:
    """Images of one index at one size and resize mode; the key changes when any of them changes."""

    def __init__(self, directory: str | Path, paths: Sequence[str], size: int, resize: str) -> None:
        self.paths, self.size, self.resize = list(paths), size, resize
        digest = files_digest(CACHE_VERSION, self.paths, size, resize)
        self.pixels_file = Path(directory) / f"{digest}-{size}-{resize}.u8"
        self.meta_file = self.pixels_file.with_suffix(".npz")
        self._pixels: np.memmap | None = None
        self._meta: dict[str, np.ndarray] | None = None

    @property
    def ready(self) -> bool:
        return self.meta_file.is_file()

    def build(self, num_workers: int = 0, on_bad_image: str = "error") -> list[tuple[str, str]]:
        """Decode every image once; returns (path, reason) for images skipped as bad."""
        self.pixels_file.parent.mkdir(parents=True, exist_ok=True)
        n, size = len(self.paths), self.size
        try:
            pixels = np.lib.format.open_memmap(
                self.pixels_file, mode="w+", dtype=np.uint8, shape=(n, size, size)
            )
        except OSError as error:  # the header did not fit: no half-made file stays behind
            self.pixels_file.unlink(missing_ok=True)
            raise OSError(error.errno, error.strerror, str(self.pixels_file)) from error
        self.reserve()
        sizes, valid, skipped = np.zeros((n, 2), np.int32), np.zeros(n, bool), []
        loader = DataLoader(
            _DecodeOnce(self.paths, size, self.resize),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=lambda item: item,
        )
        for i, image, shape, reason in progress(loader, "decode cache", n, "images"):
            if image is None:
                if on_bad_image != "skip":
                    self.pixels_file.unlink(missing_ok=True)
                    raise BadImageError(reason)
                skipped.append((self.paths[i], reason))
                continue
            pixels[i], sizes[i], valid[i] = image, shape, True
        pixels.flush()
        del pixels
        partial = self.meta_file.with_name(self.meta_file.stem + ".partial.npz")
        np.savez(partial, sizes=sizes, valid=valid)
        partial.replace(self.meta_file)  # written last: its presence marks a complete cache
        return skipped

    def reserve(self) -> None:
        reserve(self.pixels_file)

    def _load(self) -> tuple[np.memmap, dict[str, np.ndarray]]:
        if self._pixels is None:
            self._pixels = np.load(self.pixels_file, mmap_mode="r")
            with np.load(self.meta_file) as meta:
                self._meta = {key: meta[key] for key in meta.files}
        return self._pixels, self._meta

    def original_size(self, i: int) -> tuple[int, int]:
        """The (H, W) image i had before resizing; (0, 0) for an image skipped as bad."""
        height, width = self._load()[1]["sizes"][i]
        return int(height), int(width)

    def get(self, i: int) -> tuple[torch.Tensor | None, tuple[int, int]]:
        """uint8 [size, size] pixels and the original (H, W), or None for an image skipped as bad."""
        pixels, meta = self._load()
        if not meta["valid"][i]:
            return None, (0, 0)
        return torch.from_numpy(np.array(pixels[i])), self.original_size(i)

    def __getstate__(self) -> dict:
        # Worker processes reopen the memory map instead of pickling it.
        return {**self.__dict__, "_pixels": None, "_meta": None}
