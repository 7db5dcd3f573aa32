"""stage.cache_global: CNN_g's feature maps cached once, through the real command line. The same
training as without the cache; refused with augmentation on; a cache of another CNN_g never read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RUNS, TINY_RUN, check, run_cli

# Stage 2 without augmentation (the paper names none), more than one epoch: the cache is read
# again in the second.
STAGE2 = [
    "stage=2",
    *TINY_RUN,
    "trainer.max_epochs=2",
    "data.augment.hflip=0",
    "data.augment.rotate_degrees=0",
    "seed=5",
]


def final_weights(work: Path, name: str) -> dict[str, torch.Tensor]:
    (run,) = (work / RUNS / name).iterdir()
    return torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]


def train(work: Path, name: str, stage1: str, cache: Path | None) -> str:
    args = [*STAGE2, f"stage.global_ckpt={stage1}", f"run_name={name}"]
    if cache is not None:
        args += ["stage.cache_global=true", f"data.cache_dir={cache}"]
    result = check(run_cli("train", args, work))
    return result.stdout + result.stderr


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())
    assert worst <= 1e-6, worst


def stage1_of(trained: dict[str, Path]) -> str:
    return json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]


def test_the_cache_trains_as_cnn_g_does(trained: dict[str, Path], tmp_path: Path) -> None:
    """Two epochs with the cache end with the weights of two epochs without it (CPU, one seed,
    within 1e-6); the cache is built once, beside the decode cache, and said where."""
    stage1, cache = stage1_of(trained), tmp_path / "cache"
    train(tmp_path, "plain", stage1, None)
    printed = train(tmp_path, "cached", stage1, cache)
    assert_same(final_weights(tmp_path, "plain"), final_weights(tmp_path, "cached"))
    (entries,) = cache.glob("global-*.npy")
    record = json.loads(entries.with_suffix(".json").read_text())
    stored = np.load(entries, mmap_mode="r")
    assert record["images"] == len(stored) > 0 and record["bytes"] == stored.nbytes
    assert stored.std() > 0  # feature maps, not the zeros of an entry never written
    assert f"training images read from {entries}" in printed


def test_the_cache_is_refused_with_augmentation_in_one_line(tmp_path: Path) -> None:
    result = run_cli("train", ["stage=2", *TINY_RUN, "stage.cache_global=true"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kalm-train: stage.cache_global=true computes CNN_g's outputs once per image, but "
        "data.augment.hflip=0.5 and data.augment.rotate_degrees=10 change CNN_g's input in every "
        "epoch: set data.augment.hflip=0 data.augment.rotate_degrees=0, or "
        "stage.cache_global=false"
    ]
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_a_cache_of_another_stage1_checkpoint_is_never_read(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """A second CNN_g (stage 1's weights, one changed) beside a cache of the first: its run
    builds a cache of its own and trains as it does without any cache."""
    first, cache = stage1_of(trained), tmp_path / "cache"
    train(tmp_path, "first", first, cache)
    checkpoint = torch.load(first, weights_only=True)
    weights = checkpoint["state_dict"]
    conv = next(k for k, v in weights.items() if k.endswith("weight") and v.dim() == 4)
    weights[conv] = weights[conv] * 1.5
    second = tmp_path / "second-stage1.ckpt"
    torch.save(checkpoint, second)
    train(tmp_path, "second-cached", str(second), cache)
    train(tmp_path, "second-plain", str(second), None)
    assert len(list(cache.glob("global-*.npy"))) == 2
    assert_same(final_weights(tmp_path, "second-plain"), final_weights(tmp_path, "second-cached"))
