"""The predict command on new radiographs, and its CSV read back by evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_RUN, check, run_cli

DATA = [arg for arg in TINY_RUN if arg.startswith("data.")]


def test_predict_then_evaluate_gives_the_checkpoint_figures(trained: dict[str, Path]) -> None:
    work = trained["work"]
    best = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
    root = work / "data/synthetic"
    check(
        run_cli(
            "predict",
            [f"ckpt_path={best}", f"images={root}", "paths.output_root=pred", "num_workers=0"],
            work,
        )
    )
    run = next((work / "pred/predict").iterdir())
    predictions = pd.read_csv(run / "predictions.csv")
    assert {"path", "prob", "prob_global", "prob_local", "box_x0"} <= set(predictions.columns)
    assert predictions["path"].str.startswith("MURA-v1.1/valid/").all()
    submission = pd.read_csv(run / "submission.csv", header=None, names=["study", "label"])
    assert submission["study"].nunique() == len(submission) and set(submission["label"]) <= {0, 1}
    check(
        run_cli(
            "evaluate",
            [
                f"predictions={run / 'predictions.csv'}",
                f"data.root={root}",
                "paths.output_root=pred_eval",
            ],
            work,
        )
    )
    check(run_cli("evaluate", [f"ckpt_path={best}", "paths.output_root=ckpt_eval", *DATA], work))
    from_csv = json.loads(next((work / "pred_eval").rglob("metrics.json")).read_text())[
        "predictions"
    ]
    from_ckpt = json.loads(next((work / "ckpt_eval").rglob("metrics.json")).read_text())["kalm"]
    for level in ("image", "study"):
        for name in ("accuracy", "auroc", "kappa", "n"):
            assert from_csv[level][name] == pytest.approx(from_ckpt[level][name], abs=1e-5), (
                level,
                name,
            )


def test_predict_on_a_folder_of_pngs(trained: dict[str, Path], tmp_path: Path) -> None:
    source = trained["work"] / "data/synthetic/MURA-v1.1/valid"
    folder = tmp_path / "new"
    for png in list(source.rglob("*.png"))[:5]:
        target = folder / png.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
    (folder / "broken.png").write_bytes(b"not a png")
    best = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    check(run_cli("predict", [f"ckpt_path={best}", f"images={folder}", "num_workers=0"], tmp_path))
    run = next((tmp_path / "outputs/predict").iterdir())
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) == 5 and predictions["prob"].between(0, 1).all()
    assert pd.read_csv(run / "skipped_images.csv")["path"].str.endswith("broken.png").all()


def test_predict_on_a_missing_folder_gives_one_line(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    best = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    result = run_cli("predict", [f"ckpt_path={best}", f"images={tmp_path / 'nowhere'}"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
        "nowhere does not exist"
    )
