"""Localizer study 3 at tiny sizes, through the same runner as its real parts, and its resume."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import run_module
from PIL import Image

from experiments.localizers.runner import run_name
from experiments.localizers.study3 import MULTICROP, REGIMES, ROWS, SAMPLING, plan

STUDY3 = "experiments.localizers.study3"
PROBE3 = "experiments.localizers.probe3"
REPORT3 = "experiments.localizers.report3"


@pytest.mark.slow
def test_study3_runs_every_row_then_reads_them_back(tmp_path: Path) -> None:
    """Every row of the quick plan trains once and leaves a record with the figures the report
    needs (accuracy and kappa at the hold-out's Youden point, the K windows' hits, the images
    trained on, selection by the hold-out's log-loss); a second invocation trains nothing and
    leaves every record as it was."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--quick", "--out", str(out), "--work", str(work)]
    first = run_module(STUDY3, args, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    runs = plan(quick=True)
    assert f"study3: {len(runs)} runs trained; done" in first.stdout
    records = {p.name: json.loads(p.read_text()) for p in (out / "results").rglob("*.json")}
    assert len(records) == len(runs) == len(ROWS)
    for record in records.values():
        assert record["selection_metric"] == "study_log_loss" and record["heldout"] < 0
        assert record["at_operating_point"]["threshold_rule"] == "youden"
        assert 0 <= record["at_operating_point"]["accuracy"] <= 1
        assert record["images_trained"] > 0
        assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert all(Path(r["ckpt"]).is_file() for r in records.values())
    assert not list(work.rglob("last.ckpt"))  # a recorded run keeps its selected checkpoint alone
    for record in records.values():  # ... and of that, the weights: no optimiser's state
        kept = torch.load(record["ckpt"], map_location="cpu", weights_only=True, mmap=True)
        assert "state_dict" in kept and "optimizer_states" not in kept
    k4 = records["s2-localizer-multicrop-localizer.k-4-seed0.json"]
    assert k4["localization"]["windows"] == 4
    assert k4["localization"]["hit_rate"] >= k4["localization"]["hit_rate_top"]
    text = (out / "RESULTS.md").read_text()
    assert all(f"| {row.name} | [0] |" in text for row in ROWS)
    assert f"Goal, {MULTICROP.name}:" in text and "inference FLOPs" in text
    for name in ("cost.png", "hits.png"):
        with Image.open(out / name) as image:
            assert image.width > 100
    epochs = run_module(PROBE3, ["--row", "sampling", "--epochs", "--work", str(work)], tmp_path)
    assert epochs.returncode == 0, epochs.stderr[-4000:]
    sampling = [line for line in epochs.stdout.splitlines() if run_name(SAMPLING) in line]
    assert len(sampling) == 1  # the run's attention entropy per epoch, at most log(anchors)
    entropy = [float(v) for v in sampling[0].split(" | ")[3].split(", ")]
    assert entropy and all(0 <= v <= math.log(49) + 0.01 for v in entropy)
    where = ["--regime", REGIMES[0].name, "--seed", "0", "--work", str(work)]
    signal = run_module(PROBE3, ["--row", "sampling", "--signal", *where], tmp_path)
    assert signal.returncode == 0, signal.stderr[-4000:]
    figures = json.loads(signal.stdout.strip().splitlines()[-1])
    assert figures["views"] > 0 and 0 < figures["their share of the anchors"] < 1
    assert 0 <= figures["attention on the lesion's anchors"] <= 1
    (out / "RESULTS.md").unlink()
    report = run_module(REPORT3, ["--quick", "--out", str(out)], tmp_path)
    assert report.returncode == 0, report.stderr[-4000:]
    assert all(f"| {row.name} | [0] |" in (out / "RESULTS.md").read_text() for row in ROWS)
    before = {p: p.read_text() for p in (out / "results").rglob("*.json")}
    second = run_module(STUDY3, args, tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "study3: 0 runs trained; done" in second.stdout
    assert {p: p.read_text() for p in before} == before


def test_study3_refuses_to_add_to_records_made_with_another_thread_count(tmp_path: Path) -> None:
    """A record made with another number of torch threads (CPU sums in another order: stage 1
    trained again would not reproduce it) stops the study with one line, before anything runs."""
    out = tmp_path / "out"
    record = out / "results" / "c0-d0" / "s1-seed0.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"torch_threads": 999}))  # no machine here has 999 cores
    args = ["--quick", "--out", str(out), "--work", str(tmp_path / "work")]
    result = run_module(STUDY3, args, tmp_path)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"study3: {re.escape(str(record))}: made with 999 torch threads, this process has "
        r"\d+: run with the same \(OMP_NUM_THREADS=999, or unset it\)",
        line,
    ), line
    assert not (tmp_path / "work").exists()
