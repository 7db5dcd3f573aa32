"""Faults through the real command line: files that are not what they claim must not run code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, run_cli


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
