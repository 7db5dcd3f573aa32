"""Class activation maps: exact for the paper's GAP + linear CNN, put back where the crop came
from, and on the lesion once a CNN has learned it (predict heatmaps=true on synthetic data with
lesion boxes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import check, run_cli

from kalm_lightning.data.index import read_lesion_boxes, read_mura_index
from kalm_lightning.models import Backbone, KALMNet
from kalm_lightning.models.cam import evidence_map, local_heatmap


def test_the_map_averages_to_the_logit_difference() -> None:
    """mean(M) + b_abnormal - b_normal = logit_abnormal - logit_normal: the map is exact."""
    torch.manual_seed(0)
    cnn = Backbone("resnet18").eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits = cnn(images)
        cam = evidence_map(cnn, images)
    bias = cnn.fc.bias[1] - cnn.fc.bias[0]
    torch.testing.assert_close(cam.mean(dim=(1, 2)) + bias, logits[:, 1] - logits[:, 0])


def test_the_local_map_lies_inside_its_box() -> None:
    torch.manual_seed(0)
    net = KALMNet(backbone="resnet18", image_size=64, source_size=128).eval()
    images = torch.randn(2, 3, 128, 128)
    boxes = torch.tensor([[-0.5, -0.5, 0.25, 0.25], [0.25, 0.5, 0.5, 0.25]])  # x, y, w, h
    with torch.no_grad():
        heat = local_heatmap(net, images, boxes)
    centres = (torch.arange(128) * 2 + 1) / 128 - 1
    for heat_i, (x, y, w, h) in zip(heat, boxes, strict=True):
        inside_x = (centres - x).abs() < w
        inside_y = (centres - y).abs() < h
        inside = inside_y[:, None] & inside_x[None, :]
        assert heat_i[~inside].abs().max() < 1e-6  # nothing outside the box
        assert heat_i[inside].max() > 0.9  # the map's peak (1 after normalising) is in it


@pytest.mark.slow
def test_predict_heatmaps_peak_on_the_lesion_a_trained_cnn_learned(tmp_path: Path) -> None:
    """Stage 1 trained as the localizer study's preset does (its lesion: a fine texture the CNN
    resolves at 160 px; no blob), then predict heatmaps=true over the valid split: the CAM's peak
    falls in the lesion's box far more often than the box's share of the image."""
    args = [
        "experiment=localizer",
        "data.image_size=160",
        "data.synthetic.cue=0",
        "data.synthetic.valid_studies=30",
        "data.num_workers=0",
        "data.cache=false",
        "paths.data_root=generated",
        "~callbacks.progress_bar",
    ]
    check(run_cli("train", ["stage=1", *args], tmp_path))
    best = json.loads(next(tmp_path.rglob("result.json")).read_text())["best_ckpt"]
    root = tmp_path / "generated" / "synthetic-localizer"
    out = tmp_path / "pred"
    check(
        run_cli(
            "predict",
            [f"ckpt_path={best}", f"images={root}", f"output={out}", "heatmaps=true"],
            tmp_path,
        )
    )
    lesions = read_lesion_boxes(root).set_index("path")
    index = read_mura_index(root, "valid")
    rows = pd.read_csv(out / "predictions_images.csv")
    assert len(list((out / "heatmaps").glob("*.npy"))) == rows["heatmap"].nunique() == len(index)
    files = dict(zip(rows["path"], rows["heatmap"], strict=True))  # as MURA's CSV names images
    hits, chance = [], []
    for path, image in zip(index["path"], index["image"], strict=True):
        if path not in lesions.index:
            continue
        (heat,) = np.load(out / files[image])
        x0, y0, x1, y1 = lesions.loc[path, ["x0", "y0", "x1", "y1"]]
        row, col = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(x0 <= col <= x1 and y0 <= row <= y1)
        chance.append((x1 - x0) * (y1 - y0) / heat.size)
    assert len(hits) >= 5
    assert np.mean(hits) >= 0.5 and np.mean(hits) > 3 * np.mean(chance), (hits, chance)
