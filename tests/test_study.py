"""The localizer study at tiny sizes, through the same runner as `make study`, and its resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_module
from PIL import Image

from experiments.localizers.navigator_variants import FROM_CROPS, FROM_CROPS_LONG
from experiments.localizers.plan import NAVIGATORS, everything, main_regime, sweep_regime
from experiments.localizers.runner import Study

STUDY = "experiments.localizers.study"


def records_of(out: Path) -> dict[str, dict]:
    """The study's records by path under out (regimes share file names)."""
    return {
        str(p.relative_to(out)): json.loads(p.read_text())
        for p in sorted((out / "results").rglob("*.json"))
    }


def run_study(out: Path, work: Path):
    return run_module(STUDY, ["--quick", "--out", str(out), "--work", str(work)], work.parent)


@pytest.mark.slow
def test_study_runs_every_row_then_reads_them_back(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    first = run_study(out, work)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    best = next(row for row in NAVIGATORS if row.name == summary["best"]["row"])
    plan = everything(best, quick=True)
    # every planned run trained once (the MIL ceiling re-scores a trained run: no training), and
    # each has its record; every row of a regime is in its table
    trained = [run for run in plan if run[1].inference is None]
    assert f"{len(trained)} runs trained; done" in first.stdout
    assert len(records_of(out)) == len(plan)
    main = {s["row"]: s for s in summary["c0.5"]}
    text = (out / "RESULTS.md").read_text()
    assert set(main) == {row.name for row in main_regime().rows(best)}
    assert all(f"| {name} | 1 |" in text for name in main)
    assert {s["row"] for s in summary["sweep-c1"]} == {r.name for r in sweep_regime(1.0).rows(best)}
    # what the generator leaves of the texture, under the main regime and each point of c
    assert len(re.findall(r"texture keeps \d+% of its amplitude", text)) == 3
    boxed = [s for s in main.values() if s["score"] == "kalm"]
    assert all(0 <= s["hit_rate"] <= 1 and 0 <= s["mean_iou"] <= 1 for s in boxed)
    assert main["control: whole image"]["hit_rate"] == 1.0  # the whole image holds every centre
    assert main["control: whole image"]["mean_area"] == pytest.approx(1.0)
    assert main["control: fixed centred box"]["mean_area"] == pytest.approx(0.25)
    assert main["global CNN @ input (80 px)"]["inference_cost"] == 1.0
    assert main["global CNN @ source (160 px)"]["inference_cost"] == pytest.approx(4.0, rel=0.05)
    assert 1.5 < main["KALM (paper)"]["inference_cost"] < 2.5
    # one crop at inference for the navigators, every anchor (25) for the MIL ceiling
    assert main["navigator on CNN_g's map"]["inference_cost"] < 2.2
    mil = next(name for name in main if name.startswith("MIL ceiling"))  # the best navigator's
    assert main[mil]["inference_cost"] > 20
    assert (
        main["navigator, scout on the view"]["training_cost"]
        > main["KALM (paper)"]["training_cost"]
    )
    for name in ("boxes.png", "cost-c0.5.png", "sweep.png"):
        with Image.open(out / name) as image:
            assert image.width > 100

    records = sorted((out / "results").rglob("*.json"))
    for record in map(json.loads, (p.read_text() for p in records)):
        # every run also scored on the hold-out of train it selected on (what the study chooses by)
        assert set(record["heldout_study"]) == set(record["study"])
        if record["stage"] == 2:
            assert 0 <= record["heldout_localization"]["hit_rate"] <= 1
    assert "| hold-out AUROC, hit |" in text
    before = {str(p.relative_to(out)): p.read_text() for p in records}  # regimes share names
    # records made before records held the hold-out's figures get them from their checkpoints
    older = [p for p in records if p.name.startswith(("s1-data.image_size", "s2-localizer-kalm"))]
    for path in older:
        record = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in record.items() if "heldout_" not in k}))
    second = run_study(out, work)  # resumable: finished runs are read back, not trained again
    assert second.returncode == 0, second.stderr[-4000:]
    assert "0 runs trained; done" in second.stdout
    after = records_of(out)
    assert after == {name: json.loads(text) for name, text in before.items()}

    # a probe: one more stage-2 run on the study's stage-1 run, scored on the hold-out, in its own
    # folder: the study's runs and records are left as they were
    runs = sorted(str(p) for p in (work / "runs").rglob("*"))
    args = ["--quick", "--work", str(work), "--results", str(out), "--out", str(work / "probes")]
    probe = run_module(
        "experiments.localizers.probe",
        [*args, "localizer=navigator", "localizer.teacher_score=abnormal"],
        work.parent,
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    figures = json.loads(probe.stdout.strip().splitlines()[-1])
    assert 0 <= figures["heldout_hit_rate"] <= 1 and 0 <= figures["heldout_auroc"] <= 1
    assert "teacher_score-abnormal" in figures["record"]
    assert sorted(str(p) for p in (work / "runs").rglob("*")) == runs
    assert records_of(out) == after

    # where the boxes sit in views without a lesion: the blobs found by drawing the seed's data
    # again without them; its hit rates are the records'
    args = ["--quick", "--work", str(work), "--out", str(out), "--regime", "c1", "--seed", "0"]
    views = run_module("experiments.localizers.views", args, work.parent)
    assert views.returncode == 0, views.stderr[-4000:]
    table = [line.split(" | ") for line in views.stdout.splitlines() if line.startswith("| ")]
    hits = {s["row"]: s["hit_rate"] for s in summary["sweep-c1"] if s["hit_rate"] is not None}
    assert {cells[0].lstrip("| ") for cells in table[1:]} == set(hits)
    for cells in table[1:]:
        assert cells[3] == f"{hits[cells[0].lstrip('| ')]:.1%}", cells
        assert 0 <= float(cells[1].rstrip("%")) <= 100

    # a part on another machine: the records are here, the runs' checkpoints are not. A stage-2
    # run still to do trains its seed's stage 1 again; on this machine it gives the recorded
    # figures, and the stage-2 run its recorded ones
    shutil.rmtree(work / "runs")
    fixed = out / "results" / "c0.5" / "s2-localizer-fixed-seed0.json"
    fixed.unlink()
    # c = 1 as if its stage 1 had run on a machine whose floating point differs: its record is
    # replaced, and the stage-2 runs made from the old checkpoint are trained again from the new
    c1 = out / "results" / "c1"
    (c1 / "s2-localizer-fixed-seed0.json").unlink()
    stage1 = json.loads((c1 / "s1-seed0.json").read_text())
    (c1 / "s1-seed0.json").write_text(json.dumps({**stage1, "heldout": -1.0}))
    made_from_old = sorted(p.stem for p in c1.glob("s2-*.json"))
    assert made_from_old
    third = run_study(out, work)
    assert third.returncode == 0, third.stderr[-4000:]
    assert "c0.5 s1 seed 0: checkpoint not on this machine, trained again: the same figures\n" in (
        third.stdout
    )
    assert (
        "c1 s1 seed 0: checkpoint not on this machine, trained again: figures differ (record "
        f"replaced); stage-2 runs to train again from it: {', '.join(made_from_old)}\n"
    ) in third.stdout
    # c0.5: its stage 1 and the fixed box; c1: its stage 1, the fixed box and those made from it
    assert f"{4 + len(made_from_old)} runs trained; done" in third.stdout
    for path in [fixed, c1 / "s1-seed0.json", *c1.glob("s2-*.json")]:
        again = json.loads(path.read_text())
        for key in ("study", "localization", "heldout", "heldout_study", "heldout_localization"):
            assert again.get(key) == after[str(path.relative_to(out))].get(key), (path, key)
    assert "(boxes.png)" in (out / "RESULTS.md").read_text()
    with Image.open(out / "boxes.png") as image:  # the committed box grid is kept
        assert image.width > 100


def test_a_row_may_override_the_stage2_schedule(tmp_path: Path) -> None:
    """The runner's stage-2 overrides put the schedule first: a row that trains longer does."""
    study = Study(tmp_path / "out", tmp_path / "work", False, None, pin=False)
    composed = {
        row: study.config(main_regime(), 0, 2, study.stage2_overrides(row))
        for row in (FROM_CROPS, FROM_CROPS_LONG)
    }
    assert composed[FROM_CROPS].trainer.max_epochs == 5
    assert composed[FROM_CROPS_LONG].trainer.max_epochs == 10
    assert list(composed[FROM_CROPS_LONG].model.scheduler.milestones) == [6]
