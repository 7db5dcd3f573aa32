"""Contracts that travel with the model: a checkpoint carries its preprocessing and its operating
point (threshold, temperature), and evaluate, predict and the ONNX export read them from there;
an older checkpoint is refused in one line. The model is trained as a clinic would: a
patient-disjoint hold-out of train chooses the threshold (Youden) and the temperature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch
from conftest import RUNS, TINY_RUN, check, paths, run_cli, shared
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score

from kalm_lightning.data.images import load_grayscale
from kalm_lightning.data.mura import MURADataModule
from kalm_lightning.evaluation.predictions import BOX
from kalm_lightning.runs import HOLDOUT_FILE, Run

SYNTHETIC = [arg for arg in TINY_RUN if arg.startswith("data.synthetic.")]


def train_padded(work: Path) -> dict[str, Path]:
    clinic = [
        "data.val_from_train=0.3",
        "seed=7",  # the hold-out is drawn with the run's seed; evaluate must not draw its own
        "model.operating_point.rule=youden",
        "model.operating_point.temperature=true",
        "evaluate.bootstrap=50",
    ]
    args = ["pipeline=true", "run_name=pad", "data.resize=pad", *clinic, *TINY_RUN]
    check(run_cli("train", args, work))
    return {"work": work, "run": next((work / RUNS / "pad").iterdir())}


@pytest.fixture(scope="session")
def padded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A data.resize=pad model trained stage 1 -> 2 -> evaluation in one command, its operating
    point and temperature chosen on a hold-out of train."""
    built = paths(shared(tmp_path_factory, "pad", train_padded))
    work, run = built["work"], Run(built["run"])
    best = run.stage(2).read_result()["best_ckpt"]
    own = pd.read_csv(run.evaluation / "predictions_images.csv").set_index("path")
    metrics = json.loads((run.evaluation / "metrics.json").read_text())
    return {"work": work, "best": best, "own": own, "metrics": metrics, "run": run}


def test_standalone_evaluate_reads_the_resize_from_the_checkpoint(padded: dict) -> None:
    work = padded["work"]
    # Only what locates the data: the sizes and the resize mode come from the checkpoint.
    check(run_cli("evaluate", [f"ckpt_path={padded['best']}", *SYNTHETIC], work))
    again = pd.read_csv(next((work / "outputs/synthetic/evaluate").rglob("predictions_images.csv")))
    again = again.set_index("path").loc[padded["own"].index]
    for column in ("prob_global", "prob_local", "prob_kalm"):
        np.testing.assert_allclose(again[column], padded["own"][column], atol=1e-5, rtol=0)


def test_evaluate_scores_the_hold_out_the_run_selected_on(padded: dict, tmp_path: Path) -> None:
    """The run trained with seed 7: its hold-out is the one seed 7 drew, which the checkpoint
    records, not the one evaluate's own seed or seed 0 would draw."""
    work, root, stage2 = padded["work"], padded["work"] / "data/synthetic", padded["run"].stage(2)
    holdout = ["split=holdout", f"paths.output_root={tmp_path}", *SYNTHETIC]
    check(run_cli("evaluate", [f"ckpt_path={padded['best']}", *holdout], work))
    scored = pd.read_csv(next(tmp_path.rglob("predictions_images.csv")))
    validated = pd.read_csv(stage2.path / HOLDOUT_FILE)  # what training's val loader read
    assert sorted(scored["path"]) == sorted(validated["path"])
    # training's own figure of its best epoch on that hold-out, scored again by evaluate
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    best = stage2.read_result()["best_val_score"]
    assert metrics["kalm"]["image"]["accuracy"] == pytest.approx(best, abs=1e-6)
    assert "localization" in metrics
    split = MURADataModule(str(root), val_from_train=0.3, num_workers=0, seed=7)
    held, trained = (set(split.dataset(part).index["image"]) for part in ("val", "train"))
    assert set(scored["path"]) == held and not held & trained  # the patients training never saw
    seed0 = MURADataModule(str(root), val_from_train=0.3, num_workers=0, seed=0)
    assert set(seed0.dataset("val").index["image"]) != held  # what evaluate once drew instead


def test_split_holdout_of_a_model_that_held_nothing_out_is_refused(trained: dict) -> None:
    best = Run(trained["stage1"]).read_result()["best_ckpt"]
    refused = run_cli(
        "evaluate", [f"ckpt_path={best}", "split=holdout", *SYNTHETIC], trained["work"]
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"kalm-evaluate: split=holdout: {best} records no hold-out of train (it validated on "
        "MURA valid: data.val_from_train=0, or it was saved before checkpoints recorded their "
        "hold-out); score split=valid, or train with data.val_from_train=0.1"
    )


def test_predict_and_onnx_give_the_training_runs_probabilities(padded: dict, tmp_path) -> None:
    work, best, own = padded["work"], padded["best"], padded["own"]
    root = work / "data/synthetic"
    out = tmp_path / "predict"
    args = [f"ckpt_path={best}", f"images={root}", f"output={out}", "num_workers=0"]
    check(run_cli("predict", args, work))
    # One prediction table: evaluate's and predict's columns mean the same, their values agree
    predicted = pd.read_csv(out / "predictions_images.csv").set_index("path").loc[own.index]
    shared = sorted(set(predicted.columns) & set(own.columns))
    assert set(shared) >= {"study", "body_part", "prob", "prob_raw", "call", "prob_kalm", "box_x0"}
    assert "label" not in predicted and "error" not in own  # the truth only where it is known
    probs = [c for c in shared if c.startswith("prob")]
    np.testing.assert_allclose(predicted[probs], own[probs], atol=1e-6, rtol=0)
    np.testing.assert_allclose(predicted[BOX], own[BOX], atol=0.1, rtol=0)
    rest = [c for c in shared if c not in probs and c not in BOX]
    pd.testing.assert_frame_equal(predicted[rest], own[rest])
    assert padded["metrics"]["operating_point"]["temperature"] != 1.0  # so prob != prob_raw
    assert (own["prob"] - own["prob_raw"]).abs().max() > 1e-3
    run = padded["run"]
    assert (out / "submission.csv").read_bytes() == (run.evaluation / "submission.csv").read_bytes()

    model = tmp_path / "model.onnx"
    check(run_cli("export", [f"ckpt_path={best}", "format=onnx", f"output={model}"], work))
    meta = json.loads(model.with_suffix(".onnx.json").read_text())
    assert meta["resize"] == "pad" and any("padded with black" in s for s in meta["steps"])
    # The input made as model.onnx.json says, independently of the project's loader.
    size, mean, std = meta["source_size"], np.array(meta["mean"]), np.array(meta["std"])
    batch = []
    for path in own.index[:6]:
        grey = Image.fromarray(load_grayscale(root / path))
        scale = size / max(grey.size)  # the longer side to the source size, centred on black
        shape = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        offset = (round((size - grey.width * scale) / 2), round((size - grey.height * scale) / 2))
        square = Image.new("L", (size, size), 0)
        square.paste(grey.resize(shape, Image.BILINEAR), offset)
        pixels = np.asarray(square, np.float32) / 255.0
        batch.append((np.repeat(pixels[None], 3, 0) - mean[:, None, None]) / std[:, None, None])
    session = onnxruntime.InferenceSession(str(model))
    prob = session.run(["prob"], {"images": np.stack(batch).astype(np.float32)})[0]
    np.testing.assert_allclose(prob, own["prob"].to_numpy()[:6], atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    point = torch.load(best, weights_only=True, mmap=True)["operating_point"]
    assert float(props["kalm.threshold"]) == point["threshold"] == meta["threshold"]
    assert float(props["kalm.temperature"]) == point["temperature"] != 1.0
    assert json.loads(props["kalm.preprocessing"])["resize"] == "pad"
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert "not for diagnosis" in card["not_for"].lower()
    assert card["operating_point"]["threshold"] == point["threshold"]
    assert card["metrics"]["operating_point"]["study"]["intervals"]["sensitivity"]
    assert card["training_data"]["resize"] == "pad" and card["software"]["torch"]
    text = (tmp_path / "model_card.md").read_text()
    assert "## Intended use" in text and "## Known limitations" in text


@pytest.mark.slow
def test_a_contradicting_resize_is_refused_in_one_line(padded: dict, tmp_path: Path) -> None:
    best = padded["best"]
    result = run_cli(
        "predict",
        [f"ckpt_path={best}", f"images={padded['work'] / 'data/synthetic'}", "data.resize=stretch"],
        tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kalm-predict: data.resize=stretch contradicts {best}, which was trained with "
        "data.resize=pad; leave data.resize out: the checkpoint carries its preprocessing"
    ]


@pytest.mark.slow
def test_a_checkpoint_from_before_the_format_is_refused_in_one_line(
    padded: dict, tmp_path: Path
) -> None:
    old = torch.load(padded["best"], map_location="cpu", weights_only=True)
    hparams = old["hyper_parameters"]
    # What a checkpoint of the earlier layout held: flat settings, no net node, no preprocessing.
    old["hyper_parameters"] = {
        "backbone": "resnet18",
        "image_size": 64,
        "source_size": 128,
        "centre": "paper",
        "crop": "kalm",
        "stage": hparams["stage"],
    }
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    result = run_cli("evaluate", [f"ckpt_path={path}", *SYNTHETIC], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kalm-evaluate: ckpt_path={path} was written by an older kalm-lightning (checkpoint "
        "format 1, this version reads 2): it does not record its preprocessing or its "
        "localizer's config node; train it again with this version"
    ]


def test_the_operating_point_comes_from_the_hold_out_and_its_figures_match_sklearn(
    padded: dict,
) -> None:
    """metrics.json's operating point and calibration, recomputed here from the evaluation's own
    per-image probabilities with scikit-learn; the threshold is the checkpoint's, chosen on the
    hold-out of train (not on the valid split it is reported on)."""
    metrics, own = padded["metrics"], padded["own"]
    point = torch.load(padded["best"], weights_only=True, mmap=True)["operating_point"]
    assert point["rule"] == "youden" and "hold-out" in point["fitted_on"]
    block = metrics["operating_point"]
    assert block["threshold"] == point["threshold"] and block["temperature"] == point["temperature"]
    studies = own.groupby("study").agg(prob=("prob", "mean"), label=("label", "first"))
    pred = (studies["prob"] >= point["threshold"]).astype(int)
    tn, fp, fn, tp = confusion_matrix(studies["label"], pred, labels=[0, 1]).ravel()
    at = block["study"]
    for name, value in {
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "ppv": tp / (tp + fp) if tp + fp else float("nan"),
        "npv": tn / (tn + fn) if tn + fn else float("nan"),
        "f1": f1_score(studies["label"], pred, zero_division=np.nan),
    }.items():
        assert at[name] == pytest.approx(value, nan_ok=True), name
        low, high = at["intervals"][name]  # 95% over 50 study resamples
        assert low <= high or np.isnan(low)
    assert set(block["by_body_part"]) == set(own["body_part"])
    calibration = metrics["calibration"]
    bins = np.minimum((studies["prob"].to_numpy() * 10).astype(int), 9)
    ece = sum(
        (bins == b).mean()
        * abs(
            studies["prob"].to_numpy()[bins == b].mean()
            - studies["label"].to_numpy()[bins == b].mean()
        )
        for b in range(10)
        if (bins == b).any()
    )
    assert calibration["ece_study_calibrated"] == pytest.approx(ece, abs=1e-5)
    low, high = calibration["intervals"]["ece_study_calibrated"]
    assert 0 <= low <= high <= 1
    assert (padded["run"].evaluation / "reliability.png").is_file()
