"""Contracts that travel with the model: a checkpoint carries its preprocessing, and evaluate,
predict and the ONNX export read it from there; an older checkpoint is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch
from conftest import TINY_RUN, check, run_cli
from PIL import Image

from kalm_lightning.data.images import load_grayscale
from kalm_lightning.runs import Run

SYNTHETIC = [arg for arg in TINY_RUN if arg.startswith("data.synthetic.")]


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A data.resize=pad model trained stage 1 -> 2 -> evaluation in one command."""
    work = tmp_path_factory.mktemp("pad")
    check(run_cli("train", ["pipeline=true", "run_name=pad", "data.resize=pad", *TINY_RUN], work))
    run = Run(next((work / "outputs/synthetic/resnet18/pad").iterdir()))
    best = run.stage(2).read_result()["best_ckpt"]
    own = pd.read_csv(run.evaluation / "predictions_images.csv").set_index("path")
    return {"work": work, "best": best, "own": own}


def test_standalone_evaluate_reads_the_resize_from_the_checkpoint(padded: dict) -> None:
    work = padded["work"]
    # Only what locates the data: the sizes and the resize mode come from the checkpoint.
    check(run_cli("evaluate", [f"ckpt_path={padded['best']}", *SYNTHETIC], work))
    again = pd.read_csv(next((work / "outputs/synthetic/evaluate").rglob("predictions_images.csv")))
    again = again.set_index("path").loc[padded["own"].index]
    for column in ("prob_global", "prob_local", "prob_kalm"):
        np.testing.assert_allclose(again[column], padded["own"][column], atol=1e-5, rtol=0)


def test_predict_and_onnx_give_the_training_runs_probabilities(padded: dict, tmp_path) -> None:
    work, best, own = padded["work"], padded["best"], padded["own"]
    root = work / "data/synthetic"
    out = tmp_path / "predict"
    args = [f"ckpt_path={best}", f"images={root}", f"output={out}", "num_workers=0"]
    check(run_cli("predict", args, work))
    predicted = pd.read_csv(out / "predictions_images.csv")
    predicted["path"] = [str(root / p) for p in predicted["path"]]
    predicted = predicted.set_index("path").loc[own.index]
    np.testing.assert_allclose(predicted["prob"], own["prob_kalm"], atol=1e-5, rtol=0)

    model = tmp_path / "model.onnx"
    check(run_cli("export", [f"ckpt_path={best}", "format=onnx", f"output={model}"], work))
    meta = json.loads(model.with_suffix(".onnx.json").read_text())
    assert meta["resize"] == "pad" and any("padded with black" in s for s in meta["steps"])
    # The input made as model.onnx.json says, independently of the project's loader.
    size, mean, std = meta["source_size"], np.array(meta["mean"]), np.array(meta["std"])
    batch = []
    for path in own.index[:6]:
        grey = Image.fromarray(load_grayscale(path))
        scale = size / max(grey.size)  # the longer side to the source size, centred on black
        shape = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        offset = (round((size - grey.width * scale) / 2), round((size - grey.height * scale) / 2))
        square = Image.new("L", (size, size), 0)
        square.paste(grey.resize(shape, Image.BILINEAR), offset)
        pixels = np.asarray(square, np.float32) / 255.0
        batch.append((np.repeat(pixels[None], 3, 0) - mean[:, None, None]) / std[:, None, None])
    session = onnxruntime.InferenceSession(str(model))
    prob = session.run(["prob"], {"images": np.stack(batch).astype(np.float32)})[0]
    np.testing.assert_allclose(prob, own["prob_kalm"].to_numpy()[:6], atol=1e-4, rtol=0)


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
