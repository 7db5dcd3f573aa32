"""StudyMetrics against scikit-learn, in shuffled batches, and under 2-process DDP (gloo)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import sklearn_scores

from kalm_lightning.data.mura import BODY_PARTS
from kalm_lightning.evaluation.metrics import StudyMetrics, bootstrap_intervals


def random_studies(seed: int, studies: int = 60) -> pd.DataFrame:
    """Studies of 1-5 images over body parts, probabilities loosely tied to the study label."""
    rng = np.random.default_rng(seed)
    rows = []
    for study in range(studies):
        label = int(rng.random() < 0.45)
        part = int(rng.integers(len(BODY_PARTS)))
        for _ in range(int(rng.integers(1, 6))):
            prob = float(np.clip(rng.normal(0.35 + 0.3 * label, 0.2), 0, 1))
            rows.append({"study": study, "part": part, "label": label, "prob": prob})
    frame = pd.DataFrame(rows)
    frame["image"] = np.arange(len(frame))
    return frame


def sklearn_figures(frame: pd.DataFrame) -> dict:
    """Image, study and body-part figures of a frame of images, by scikit-learn."""
    studies = frame.groupby("study").agg(
        prob=("prob", "mean"), label=("label", "first"), part=("part", "first")
    )
    by_part = {
        BODY_PARTS[p]: sklearn_scores(g.prob.to_numpy(), g.label.to_numpy())
        for p, g in studies.groupby("part")
        if g.label.nunique() == 2
    }
    return {
        "image": sklearn_scores(frame.prob.to_numpy(), frame.label.to_numpy()),
        "study": sklearn_scores(studies.prob.to_numpy(), studies.label.to_numpy()),
        "by_body_part": by_part,
    }


def feed(metric: StudyMetrics, frame: pd.DataFrame, batch: int) -> None:
    for start in range(0, len(frame), batch):
        part = frame.iloc[start : start + batch]
        metric.update(
            torch.tensor(part.prob.to_numpy(), dtype=torch.float32),
            torch.tensor(part.label.to_numpy()),
            torch.tensor(part.image.to_numpy()),
            torch.tensor(part.study.to_numpy()),
            [BODY_PARTS[p] for p in part.part],
        )


def assert_figures_equal(got: dict, expected: dict) -> None:
    for level in ("image", "study"):
        for name, value in expected[level].items():
            assert got[level][name] == pytest.approx(value, abs=1e-6), (level, name)
    for part, figures in expected["by_body_part"].items():
        for name, value in figures.items():
            assert got["by_body_part"][part][name] == pytest.approx(value, abs=1e-6), (part, name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_study_metrics_match_sklearn_in_shuffled_batches(seed: int) -> None:
    frame = random_studies(seed)
    metric = StudyMetrics()
    feed(metric, frame.sample(frac=1, random_state=seed), batch=7)
    assert_figures_equal(metric.compute(), sklearn_figures(frame))


def test_duplicated_images_are_counted_once() -> None:
    frame = random_studies(4)
    metric = StudyMetrics()
    feed(metric, pd.concat([frame, frame.iloc[:5]]), batch=16)  # what a padded DDP shard adds
    assert_figures_equal(metric.compute(), sklearn_figures(frame))


def test_threshold_is_inclusive_and_logits_are_refused() -> None:
    metric = StudyMetrics()
    metric.update(
        torch.tensor([0.5, 0.2]),
        torch.tensor([1, 0]),
        torch.tensor([0, 1]),
        torch.tensor([0, 1]),
        ["XR_HAND", "XR_HAND"],
    )
    assert metric.compute()["study"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="probabilities"):
        metric.update(
            torch.tensor([2.3]),
            torch.tensor([1]),
            torch.tensor([2]),
            torch.tensor([2]),
            ["XR_HAND"],
        )


def test_one_class_gives_nan_with_a_warning_not_zero() -> None:
    metric = StudyMetrics()
    metric.update(
        torch.tensor([0.7, 0.2, 0.9]),
        torch.tensor([1, 1, 1]),
        torch.arange(3),
        torch.arange(3),
        ["XR_HAND"] * 3,
    )
    with pytest.warns(UserWarning, match="one class only"):
        result = metric.compute()
    assert math.isnan(result["study"]["auroc"]) and math.isnan(result["study"]["kappa"])
    assert result["study"]["accuracy"] == pytest.approx(2 / 3)


def test_bootstrap_interval_brackets_the_estimate() -> None:
    frame = random_studies(5, studies=80)
    args = [torch.tensor(frame[c].to_numpy()) for c in ("prob", "label", "study")]
    low, high = bootstrap_intervals(*args, samples=200, seed=0)["auroc"]
    estimate = sklearn_figures(frame)["study"]["auroc"]
    assert low < estimate < high and high - low < 0.5


def _ddp_compute(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    frame = random_studies(9)
    # Uneven shards, as a non-padding sampler gives, plus one duplicate, as a padding one would.
    shard = frame.iloc[rank::world]
    if rank == 1:
        shard = pd.concat([shard, frame.iloc[:1]])
    metric = StudyMetrics()
    feed(metric, shard.sample(frac=1, random_state=rank), batch=5)
    result = metric.compute()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def test_ddp_two_processes_give_the_single_process_figures(tmp_path: Path) -> None:
    frame = random_studies(9)
    assert len(frame) % 2 == 1
    single = StudyMetrics()
    feed(single, frame, batch=5)
    out = tmp_path / "ddp.json"
    mp.spawn(
        _ddp_compute, args=(2, 29700 + (hash(str(tmp_path)) % 500), str(out)), nprocs=2, join=True
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(single.compute()))
