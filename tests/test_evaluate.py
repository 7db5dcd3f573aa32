"""The evaluate command: predictions CSVs scored like scikit-learn, checkpoints written as reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_NET, TINY_RUN, check, run_cli, shared, sklearn_scores
from PIL import Image

from kalm_lightning.data.mura import read_mura_index
from kalm_lightning.evaluation.studies import SCORES
from kalm_lightning.runs import Run

DATA = [arg for arg in TINY_RUN if arg.startswith("data.")]


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_predictions_csv_is_scored_like_sklearn(
    mura_root: Path, tmp_path: Path, aggregation: str
) -> None:
    """Image and study figures against scikit-learn; a study's probability is its images' mean
    (the paper's) or, with study_aggregation=max, their maximum."""
    index = read_mura_index(mura_root, "valid")
    rng = np.random.default_rng(0)
    prob = np.clip(0.3 + 0.35 * index["label"].to_numpy() + rng.normal(0, 0.25, len(index)), 0, 1)
    # Paths as MURA's CSV writes them for half the rows, absolute for the rest.
    paths = [
        img if i % 2 else p
        for i, (img, p) in enumerate(zip(index["image"], index["path"], strict=True))
    ]
    csv = tmp_path / "preds.csv"
    pd.DataFrame({"path": paths, "prob": prob}).sample(frac=1, random_state=1).to_csv(
        csv, index=False
    )
    check(
        run_cli(
            "evaluate",
            [
                f"predictions={csv}",
                f"data.root={mura_root}",
                "paths.output_root=out",
                f"study_aggregation={aggregation}",
            ],
            tmp_path,
        )
    )
    run = next((tmp_path / "out/synthetic/evaluate").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())["predictions"]
    studies = (
        pd.DataFrame({"study": index["study"], "label": index["label"], "prob": prob})
        .groupby("study")
        .agg(label=("label", "first"), prob=("prob", aggregation))
    )
    expected = {
        "image": sklearn_scores(prob, index["label"].to_numpy()),
        "study": sklearn_scores(studies["prob"].to_numpy(), studies["label"].to_numpy()),
    }
    for level, block in expected.items():
        for name, value in block.items():
            assert metrics[level][name] == pytest.approx(value, abs=1e-6), (level, name)
    submission = pd.read_csv(run / "submission.csv", header=None, names=["study", "label"])
    assert len(submission) == len(studies) and set(submission["label"]) <= {0, 1}
    assert submission["study"].iloc[0].startswith("MURA-v1.1/valid/")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"path": ["x.png"], "prob": [0.3]}, "1 path(s) are not images of the valid split"),
        pytest.param(
            {"path": ["x.png"], "prob": [3.2]},
            "prob must be abnormal probabilities in [0, 1], not logits",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            {"image": ["x.png"], "score": [0.2]},
            "needs the columns path,prob",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_predictions_give_one_line(
    mura_root: Path, tmp_path: Path, rows: dict, message: str
) -> None:
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    result = run_cli(
        "evaluate", [f"predictions={tmp_path / 'p.csv'}", f"data.root={mura_root}"], tmp_path
    )
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def stage2_report(
    trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """Evaluate of the stage-2 checkpoint with bootstrap intervals, logged to MLflow: its folder
    and what it printed."""

    def evaluate(_: Path) -> dict[str, str]:
        best = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
        args = [f"ckpt_path={best}", "bootstrap=20", "paths.output_root=eval2", "logger=mlflow"]
        result = check(run_cli("evaluate", [*args, *DATA], trained["work"]))
        run = next((trained["work"] / "eval2/synthetic/evaluate").iterdir())
        return {"run": run, "stdout": result.stdout}

    built = shared(tmp_path_factory, "stage2_report", evaluate)
    return Path(built["run"]), built["stdout"]


def test_stage2_checkpoint_writes_every_report(
    stage2_report: tuple[Path, str],
) -> None:
    run, printed = stage2_report
    for name in (
        "metrics.json",
        "table.md",
        "predictions_images.csv",
        "predictions_studies.csv",
        "submission.csv",
        "roc.png",
        "boxes.png",
    ):
        assert (run / name).is_file(), name
    for name in ("roc.png", "boxes.png"):
        with Image.open(run / name) as image:
            image.load()
            assert image.width > 100 and image.height > 100
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"global", "local", "kalm", "localization"} <= set(metrics)
    for score in ("global", "local", "kalm"):
        assert set(metrics[score]["study"]) == {"accuracy", "auroc", "kappa", "n"}
        assert set(metrics[score]["by_body_part"]) <= {
            p for p in pd.read_csv(run / "predictions_images.csv")["body_part"]
        }
        assert len(metrics[score]["intervals"]["auroc"]) == 2
    assert 0 <= metrics["localization"]["hit_rate"] <= 1 and metrics["localization"]["n"] > 0
    images = pd.read_csv(run / "predictions_images.csv")
    assert {"path", "label", "prob", "prob_raw", "call", "prob_global", "prob_local"} <= set(
        images.columns
    )
    assert {"box_x0", "box_y1", "box_area"} <= set(images.columns)
    assert images["path"].str.startswith("MURA-v1.1/valid/").all()  # as MURA's CSV lists it
    np.testing.assert_allclose(
        images["prob"], (images["prob_global"] + images["prob_local"]) / 2, atol=1e-6
    )
    studies = pd.read_csv(run / "predictions_studies.csv")
    assert (
        list(studies.columns) == ["study", "images", "prob", "call", "label"]
        and len(studies) == metrics["kalm"]["study"]["n"]
    )
    table = (run / "table.md").read_text()
    assert all(f"{TINY_NET}_{score}" in table for score in ("g", "l", "KALM"))
    assert "study level" in printed and "KALM" in printed  # the table (names wrap at 80 columns)


def test_stage1_checkpoint_reports_the_global_score_only(trained: dict[str, Path]) -> None:
    best = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    check(
        run_cli(
            "evaluate", [f"ckpt_path={best}", "paths.output_root=eval1", *DATA], trained["work"]
        )
    )
    run = next((trained["work"] / "eval1/synthetic/evaluate").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) & set(SCORES) == {"global"}
    assert metrics["operating_point"]["score"] == "global"
    assert (run / "roc.png").is_file() and not (run / "boxes.png").exists()


def test_evaluate_needs_exactly_one_input(tmp_path: Path) -> None:
    result = run_cli("evaluate", [], tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "kalm-evaluate: give exactly one of ckpt_path=CKPT and predictions=FILE.csv"
    )


@pytest.mark.slow
def test_evaluate_logs_table_and_figures_to_wandb(mura_root: Path, tmp_path: Path) -> None:
    index = read_mura_index(mura_root, "valid")
    csv = tmp_path / "preds.csv"
    pd.DataFrame({"path": index["image"], "prob": np.linspace(0, 1, len(index))}).to_csv(
        csv, index=False
    )
    check(
        run_cli(
            "evaluate", [f"predictions={csv}", f"data.root={mura_root}", "logger=wandb"], tmp_path
        )
    )
    records = next(
        tmp_path.glob("outputs/synthetic/evaluate/*/wandb/offline-run-*/run-*.wandb")
    ).read_bytes()
    assert b"study_table" in records and b"reports" in records and b"predictions" in records


@pytest.mark.slow
def test_table1_aggregation_of_a_paper_pipeline_run(
    navigator_pipeline: Path, tmp_path: Path
) -> None:
    """`make table1`'s code path at tiny sizes: experiment=paper as a multirun with a navigator
    (a localizer beyond the paper's, as make table1's variant row), then aggregate.py."""
    sweep = navigator_pipeline
    # Evaluation after training read the run's own data, not conf/evaluate.yaml's default root.
    work = sweep.parents[1]
    assert (work / "generated").is_dir() and not (work / "data").exists()
    script = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "aggregate.py"
    out = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, str(script), str(sweep), "--out", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for score in ("g", "l", "KALM"):
        # the variant, as config.variant names it; no paper figure beside it
        assert f"| {TINY_NET}_{score} (localizer=navigator grid=3 warmup_epochs=0) |" in text
    metrics = json.loads(next(sweep.rglob("evaluate/metrics.json")).read_text())
    auroc = metrics["kalm"]["study"]["auroc"]
    low, high = metrics["kalm"]["intervals"]["auroc"]
    assert f"{auroc:.3f} [{low:.3f}, {high:.3f}]" in text
    assert "## Per body part" in text and "### XR_" in text


def test_mlflow_store_holds_the_training_and_the_evaluation(
    trained: dict[str, Path], stage2_report: tuple[Path, str]
) -> None:
    """logger=mlflow, read back with MLflow's own client from the SQLite stores it wrote: stage 2's
    training run (params, per-epoch metrics, config, checkpoints and box grids) and evaluate's run
    (the study-level figures of metrics.json, the reports and figures)."""
    from mlflow import MlflowClient

    def only_run(store: Path):
        client = MlflowClient(f"sqlite:///{store}")
        (run,) = client.search_runs([client.get_experiment_by_name("kalm-lightning").experiment_id])
        files = []
        pending = [""]
        while pending:
            for item in client.list_artifacts(run.info.run_id, pending.pop() or None):
                (pending if item.is_dir else files).append(item.path)
        return client, run, files

    client, training, files = only_run(trained["work"] / "outputs" / "mlflow.db")
    assert training.info.status == "FINISHED"
    assert training.data.params["stage/number"] == "2"
    assert training.data.params["model/optimizer/lr"] == "0.0003"
    history = client.get_metric_history(training.info.run_id, "val/selection")
    logs = Run(trained["stage2"]).read_logs()["val/selection"].dropna()
    assert [m.value for m in history] == pytest.approx(logs.tolist(), abs=1e-6)
    assert "config.yaml" in files
    assert any(f.endswith(".ckpt") for f in files), files
    assert any(f.startswith("val/kalm_boxes/") and f.endswith(".png") for f in files), files

    report, _ = stage2_report
    client, evaluation, files = only_run(trained["work"] / "eval2" / "mlflow.db")
    metrics = json.loads((report / "metrics.json").read_text())
    assert evaluation.info.status == "FINISHED"
    for score in ("global", "local", "kalm"):
        for name in ("accuracy", "auroc", "kappa"):
            got = evaluation.data.metrics[f"{score}/study_{name}"]
            assert got == pytest.approx(metrics[score]["study"][name], abs=1e-6)
    assert {"metrics.json", "table.md", "roc.png", "boxes.png"} <= set(files)
