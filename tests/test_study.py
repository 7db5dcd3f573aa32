"""The localizer study at tiny sizes, through the same runner as `make study`, and its resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "experiments" / "synthetic" / "study.py"


def run_study(out: Path, work: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(STUDY),
            "--quick",
            "--seeds",
            "0",
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=work.parent,
    )


@pytest.mark.slow
def test_study_runs_every_row_then_reads_them_back(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    first = run_study(out, work)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "12 runs trained" in first.stdout  # 3 stage-1 runs, 9 stage-2 runs shared across rows

    summary = json.loads((out / "summary.json").read_text())
    rows = [s["row"] for s in summary]
    text = (out / "RESULTS.md").read_text()
    for name in rows:
        assert f"| {name} |" in text
    assert len(rows) == 13 and rows[-1].startswith("best combination")
    kalm_rows = [s for s in summary if s["score"] != "global"]
    assert all(0 <= s["hit_rate"] <= 1 and 0 <= s["mean_iou"] <= 1 for s in kalm_rows)
    full = next(s for s in summary if s["row"] == "control: whole image to CNN_l")
    assert full["hit_rate"] == 1.0  # the whole image holds every lesion centre
    costs = {s["row"]: s["cost"] for s in summary}
    assert costs["global CNN @ input size"] == 1.0
    assert costs["global CNN @ source size"] == pytest.approx(4.0, rel=0.05)
    assert 1.5 < costs["KALM (paper)"] < 2.5
    for name in ("auroc.png", "auroc_cost.png", "boxes.png"):
        with Image.open(out / name) as image:
            assert image.width > 100

    records = sorted((out / "results").glob("*.json"))
    before = {p.name: p.read_text() for p in records}
    second = run_study(out, work)  # resumable: finished runs are read back, not trained again
    assert second.returncode == 0, second.stderr[-4000:]
    assert "0 runs trained" in second.stdout
    assert {p.name: p.read_text() for p in sorted((out / "results").glob("*.json"))} == before
