"""Faults through the real command line: files that are not what they claim must not run code."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN, check, run_cli

from kalm_lightning.config import compose_config, newest_run_dir
from kalm_lightning.errors import UserError
from kalm_lightning.tasks.train import find_stage1_checkpoint


class RunsCode:
    """A pickle that calls os.system when loaded: what a malicious .ckpt holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"stage": 2}, "x": RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("evaluate", ["ckpt_path={ckpt}", *TINY_RUN[:3]]),
        ("predict", ["ckpt_path={ckpt}", "images={tmp}"]),
        ("train", ["stage=2", "stage.global_ckpt={ckpt}", *TINY_RUN]),
        ("train", ["stage=1", "ckpt_path={ckpt}", *TINY_RUN]),
    ],
    ids=["evaluate", "predict", "stage2-global-ckpt", "resume"],
)
def test_a_checkpoint_that_runs_code_is_refused_before_it_runs(
    tmp_path: Path, evil_checkpoint: tuple[Path, Path], module: str, args: list[str]
) -> None:
    ckpt, marker = evil_checkpoint
    filled = [a.format(ckpt=ckpt, tmp=tmp_path) for a in args]
    result = run_cli(module, filled, tmp_path)
    assert not marker.exists(), "the checkpoint's code ran"
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"kalm-{module}: checkpoint {ckpt} is refused: it asks to load ")
    assert "posix.system" in line or "os.system" in line
    assert "Traceback" not in result.stderr


def test_a_non_finite_loss_stops_training_naming_the_step_and_the_images(tmp_path: Path) -> None:
    result = run_cli("train", ["stage=1", *TINY_RUN, "model.optimizer.lr=1e30"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("kalm-train: training loss is nan at step 1 (epoch 0); the batch held ")
    assert "MURA-v1.1/train/" in line and "Traceback" not in result.stderr


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    first = newest_run_dir(tmp_path, None)
    second = newest_run_dir(tmp_path, None)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name.startswith(first.name)


def test_auto_never_picks_a_half_written_stage1_result(tmp_path: Path) -> None:
    """A result.json being written by another process is skipped, not read half-way."""
    run = tmp_path / "outputs" / "synthetic" / "resnet18" / "stage1" / "x"
    run.mkdir(parents=True)
    (run / "result.json").write_text('{"stage": 1, "backbone": "resn')  # cut off mid-write
    cfg = compose_config("train", ["stage=2", f"paths.output_root={tmp_path / 'outputs'}"])
    with pytest.raises(UserError, match="no finished stage-1 run"):
        find_stage1_checkpoint(cfg)


def final_state(work: Path) -> tuple[dict, pd.DataFrame]:
    run = next((work / "outputs/synthetic/resnet18/stage1").iterdir())
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    logs = pd.concat(pd.read_csv(f) for f in sorted(run.glob("csv/version_*/metrics.csv")))
    return state, logs.dropna(subset=["val/image_acc"]).set_index("epoch")


def test_resuming_after_an_interruption_ends_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed with ckpt_path=last (as after SIGKILL): the same weights
    and the same logged figures, bit for bit, as the run that was never stopped."""
    base = [a for a in TINY_RUN if not a.startswith("trainer.max_epochs")]
    base += ["stage=1", "data.augment.rotate_degrees=10", "data.augment.hflip=0.5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    check(run_cli("train", [*base, "trainer.max_epochs=2"], straight))
    check(run_cli("train", [*base, "trainer.max_epochs=1"], resumed))
    check(run_cli("train", [*base, "trainer.max_epochs=2", "ckpt_path=last"], resumed))
    (a, a_logs), (b, b_logs) = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a_logs.loc[1, "val/image_acc"] == b_logs.loc[1, "val/image_acc"]
