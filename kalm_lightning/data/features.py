"""CNN_g's feature maps of the training images, computed once for a stage 2 (`stage.cache_global`).

In stage 2, CNN_g is frozen, BatchNorm statistics included; without augmentation its input, and so
its feature map, is the same for an image in every epoch. This memory map holds one [C, h, w]
float32 entry per image of the training split, beside the decode cache. Its key is everything the
entries follow from: CNN_g's weights, the preprocessing, and every image file (path, size,
modification time). An entry of another stage-1 checkpoint, or of a changed file, is never read.
The train loader's workers read each image's entry beside its pixels (`GLOBAL_FEATURES`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kalm_lightning.data.cache import files_digest, reserve
from kalm_lightning.progress import progress
from kalm_lightning.runs import write_atomic

FEATURES_VERSION = 1
GLOBAL_FEATURES = "global_features"  # the batch key of an image's cached CNN_g feature map


def weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights and buffers, names included: another checkpoint, another key."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class FeatureCache:
    """paths: the training split's images, in the Dataset's order (an entry's index is the
    image's `image_id`); key: what else the feature maps follow from (CNN_g's weights digest, the
    preprocessing); shape: one entry's [C, h, w]."""

    def __init__(
        self,
        directory: str | Path,
        paths: Sequence[str],
        key: Mapping[str, object],
        shape: Sequence[int],
    ) -> None:
        self.count, self.shape = len(paths), tuple(int(n) for n in shape)
        digest = files_digest(FEATURES_VERSION, paths, dict(key), list(self.shape))
        self.file = Path(directory) / f"global-{digest}.npy"
        self.done = self.file.with_suffix(".json")  # written last: its presence marks a whole cache
        self._entries: np.ndarray | None = None

    @property
    def ready(self) -> bool:
        return self.done.is_file()

    @property
    def nbytes(self) -> int:
        return self.count * int(np.prod(self.shape)) * 4

    def build(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int | None = None
    ) -> None:
        """Write the entries of (image_id [B], feature maps [B, C, h, w]) batches: into a partial
        file first, renamed when whole, then the marker. Images skipped as bad leave zeros that
        nothing reads (the Dataset skips them)."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.file.with_name(self.file.stem + ".partial.npy")
        try:
            entries = np.lib.format.open_memmap(
                partial, mode="w+", dtype=np.float32, shape=(self.count, *self.shape)
            )
        except OSError as error:  # the header did not fit: no half-made file stays behind
            partial.unlink(missing_ok=True)
            raise OSError(error.errno, error.strerror, str(partial)) from error
        reserve(partial)
        try:
            for ids, features in progress(batches, "CNN_g cache", total, "batches"):
                entries[ids.cpu().numpy()] = features.detach().float().cpu().numpy()
            entries.flush()
            del entries
            partial.replace(self.file)
        finally:
            partial.unlink(missing_ok=True)
        record = {"images": self.count, "shape": list(self.shape), "bytes": self.nbytes}
        write_atomic(self.done, json.dumps(record) + "\n")

    def get(self, i: int) -> torch.Tensor:
        """Image i's feature map [C, h, w] (float32)."""
        if self._entries is None:
            self._entries = np.load(self.file, mmap_mode="r")
        return torch.from_numpy(np.array(self._entries[i]))

    def __getstate__(self) -> dict:
        # Worker processes reopen the memory map instead of pickling it.
        return {**self.__dict__, "_entries": None}
