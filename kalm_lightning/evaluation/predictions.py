"""The prediction table, one owner: the files evaluate and predict both write, one meaning per
column whichever command wrote them.

`predictions_images.csv`, one row per image:

| column | meaning |
|---|---|
| `path` | the image as MURA's image CSV lists it (a MURA root or a CSV of paths), else its absolute path |
| `study` | the study key: MURA's study path, or the folder holding the image |
| `body_part` | `XR_...` where the path names one |
| `label` | the truth, 1 = abnormal; only where it is known (evaluate) |
| `prob` | the model's decision score, the abnormal probability it decides by: KALM's fused score (CNN_g's for a stage-1 model), calibrated by the model's temperature where it has one |
| `prob_raw` | the same score before calibration (equal to `prob` at temperature 1) |
| `call` | 1 (abnormal) where `prob` >= the model's threshold, else 0 |
| `prob_global`, `prob_local`, `prob_kalm` | CNN_g's, CNN_l's and the fused abnormal probability, uncalibrated: the paper's Table 1 |
| `box_x0`, `box_y0`, `box_x1`, `box_y1` | the KALM box in the original image's pixels (stage 2) |
| `box_area` | the box's share of the image (stage 2) |
| `crop1_x0` ... `cropK_y1`, `cropK_weight` | every window and its attention weight, best first by the scout, where CNN_l reads K windows together (`localizer=multicrop`); the `box_*` columns are then the window weighed most |
| `crops_area` | the K windows' total share of the image (`localizer=multicrop`) |
| `error` | why a file was not scored (predict; empty for the scored ones) |
| `overlay`, `heatmap` | the files predict drew for it (`overlays=true`, `heatmaps=true`) |

`predictions_studies.csv`, one row per study: `study`, `images` (how many were scored), `prob`
(its images' `prob`, by their mean or max: `study_aggregation`), `call` (at the threshold), and
`label` (the truth, evaluate). `submission.csv`: MURA's submission file, `study,call` without a
header: the same file from evaluate and predict for the same checkpoint and images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kalm_lightning.data.dataset import MURADataset
from kalm_lightning.data.geometry import (
    PIXEL_BOX,
    box_to_pixels,
    crop_box,
    crop_weight,
    to_original_pixels,
)
from kalm_lightning.evaluation.operating import calibrate
from kalm_lightning.evaluation.studies import (
    SCORES,
    THRESHOLD,
    abnormal,
    prob_column,
    study_table,
)
from kalm_lightning.runs import write_atomic

IMAGES, STUDIES, SUBMISSION = "predictions_images.csv", "predictions_studies.csv", "submission.csv"
DECISION = ["prob", "prob_raw", "call"]
BOX = [*PIXEL_BOX, "box_area"]


def image_table(
    dataset: MURADataset,
    outputs: dict[str, torch.Tensor],
    decision: str,
    operating: dict,
) -> pd.DataFrame:
    """One row per scored image of the dataset (its index's `image` column is what `path`
    shows): the columns above. outputs: `predict_step`'s, joined and in image-id order."""
    if decision not in outputs:  # no image could be scored
        return pd.DataFrame(columns=["file", "path", "study", "body_part", *DECISION])
    ids = outputs["image_id"].numpy()
    rows = dataset.index.iloc[ids].reset_index(drop=True)
    frame = pd.DataFrame({"path": rows["image"], "study": rows["study"]})
    frame["body_part"] = rows["body_part"]
    if (rows["label"] >= 0).all():
        frame["label"] = rows["label"]
    for column, values in decided(outputs, decision, operating).items():
        frame[column] = values
    if "boxes" in outputs:
        sizes = [dataset.original_size(i) for i in ids]
        frame[PIXEL_BOX] = original_boxes(
            outputs["boxes"], sizes, dataset.source_size, dataset.resize
        )
        frame["box_area"] = (outputs["boxes"][:, 2] * outputs["boxes"][:, 3]).numpy()
    if "crops" in outputs:
        for k in range(outputs["crops"].shape[1]):
            frame[crop_box(k + 1)] = original_boxes(
                outputs["crops"][:, k], sizes, dataset.source_size, dataset.resize
            )
            frame[crop_weight(k + 1)] = outputs["attention"][:, k].numpy()
        frame["crops_area"] = (outputs["crops"][..., 2] * outputs["crops"][..., 3]).sum(1).numpy()
    frame.insert(0, "file", rows["path"])  # what was read: the key of a run's own bookkeeping
    return frame


def decided(
    outputs: dict[str, torch.Tensor], decision: str, operating: dict
) -> dict[str, np.ndarray]:
    """The decision columns (prob, prob_raw, call) and each score's, from `predict_step`'s
    outputs and the model's operating point (threshold, temperature)."""
    raw = outputs[decision].float()
    prob = calibrate(raw.double(), float(operating["temperature"])).float().numpy()
    columns = {"prob": prob, "prob_raw": raw.numpy()}
    columns["call"] = abnormal(prob, float(operating["threshold"]))
    for name in SCORES:
        if name in outputs:
            columns[prob_column(name)] = outputs[name].numpy()
    return columns


def original_boxes(
    boxes: torch.Tensor, sizes: list[tuple[int, int]], source_size: int, resize: str
) -> np.ndarray:
    """[N, 4] boxes ([-1, 1] units on the source image) as x0, y0, x1, y1 in each image's own
    pixels ((height, width) in sizes), to a tenth of a pixel."""
    pixels = box_to_pixels(boxes, source_size).tolist()
    original = [
        to_original_pixels(box, *size, source_size, resize)
        for box, size in zip(pixels, sizes, strict=True)
    ]
    return np.round(np.array(original, dtype=float).reshape(-1, 4), 1)


def given_table(rows: pd.DataFrame, prob: np.ndarray) -> pd.DataFrame:
    """The table of a predictions CSV given to evaluate (`path,prob` of a split's images): its
    `prob` is the decision score as given, called at the paper's 0.5 (no model to say more)."""
    rows = rows.reset_index(drop=True)
    frame = pd.DataFrame({"file": rows["path"], "path": rows["image"], "study": rows["study"]})
    frame["body_part"], frame["label"] = rows["body_part"], rows["label"]
    frame["prob"] = frame["prob_raw"] = prob
    frame["call"] = abnormal(frame["prob"], THRESHOLD)
    return frame


def studies_of(frame: pd.DataFrame, threshold: float, aggregation: str) -> pd.DataFrame:
    """predictions_studies.csv's rows: each study's `prob` from its scored images, and its call."""
    studies = study_table(frame, "prob", aggregation)
    studies["call"] = np.where(studies["prob"].notna(), abnormal(studies["prob"], threshold), -1)
    columns = ["study", "images", "prob", "call"] + (["label"] if "label" in frame else [])
    return studies[columns]


def write_predictions(
    frame: pd.DataFrame, out: Path, threshold: float, aggregation: str
) -> pd.DataFrame:
    """predictions_images.csv, predictions_studies.csv and submission.csv into out; the studies."""
    studies = studies_of(frame, threshold, aggregation)
    write_atomic(out / IMAGES, frame.drop(columns=["file"]).to_csv(index=False))
    write_atomic(out / STUDIES, studies.to_csv(index=False))
    scored = studies[studies["prob"].notna()]
    write_atomic(out / SUBMISSION, scored[["study", "call"]].to_csv(index=False, header=False))
    return studies
