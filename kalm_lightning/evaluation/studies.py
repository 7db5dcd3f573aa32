"""How images become studies, one home: the score names, the decision threshold and the study
average (MURA's submission file is written with the prediction table: `evaluation/predictions.py`).

MURA is judged per study: a study's probability is the mean of its images' abnormal probabilities
(the paper's; `max`, the most abnormal image, is the other aggregation offered), and the study is
called abnormal when it is >= THRESHOLD.
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch

THRESHOLD = 0.5
SCORES = ("global", "local", "kalm")  # CNN_g, CNN_l and their average (the paper's S_g, S_l, KALM)
GLOBAL, LOCAL, KALM = SCORES
PREDICTIONS = "predictions"  # the score of a predictions CSV given to evaluate
SCORE_LABELS = {"global": "g", "local": "l", "kalm": "KALM", PREDICTIONS: PREDICTIONS}


def abnormal(prob, threshold: float = THRESHOLD):
    """The predicted class of probabilities (tensor, array or Series): 1 when prob >= threshold."""
    return (prob >= threshold) * 1


def prob_column(score: str) -> str:
    """The image-table column holding a score: prob_global, prob_local, prob_kalm, or prob."""
    return "prob" if score == PREDICTIONS else f"prob_{score}"


class Studies(NamedTuple):
    ids: torch.Tensor  # sorted study ids
    prob: torch.Tensor  # each study's abnormal probability: its images' mean or max (float64)
    label: torch.Tensor  # the label of each study's first image
    first: torch.Tensor  # index of each study's first image
    count: torch.Tensor  # images per study


def study_means(
    prob: torch.Tensor, label: torch.Tensor, study: torch.Tensor, aggregation: str = "mean"
) -> Studies:
    """Per study (sorted by id): probability (its images' mean, or with aggregation="max" their
    maximum; settings.AGGREGATIONS), label, first image and image count."""
    ids, inverse = torch.unique(study, return_inverse=True)
    count = torch.zeros(len(ids), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(prob, dtype=torch.float64)
    )
    if aggregation == "max":
        study_prob = torch.zeros(len(ids), dtype=torch.float64).scatter_reduce_(
            0, inverse, prob.double(), reduce="amax", include_self=False
        )
    else:
        total = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, prob.double())
        study_prob = total / count
    first = torch.full((len(ids),), len(prob), dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(len(prob)), reduce="amin"
    )
    return Studies(ids, study_prob, label[first], first, count.long())


def study_table(
    frame: pd.DataFrame, column: str = "prob", aggregation: str = "mean"
) -> pd.DataFrame:
    """One row per study of an image table (in order of first appearance): study, images, label, prob.

    Images without a probability (NaN: unreadable files) are left out of their study's mean; a
    study with none of its images scored gets NaN."""
    scored = frame[frame[column].notna()]
    codes, names = pd.factorize(scored["study"])
    labels = scored["label"] if "label" in scored else pd.Series(-1, index=scored.index)
    studies = study_means(
        torch.tensor(scored[column].to_numpy(float)),
        torch.tensor(labels.to_numpy(int)),
        torch.from_numpy(codes),
        aggregation,
    )
    table = pd.DataFrame(
        {
            "study": names,
            "images": studies.count.numpy(),
            "label": studies.label.numpy(),
            "prob": studies.prob.numpy(),
        }
    )
    missing = pd.unique(frame.loc[~frame["study"].isin(names), "study"])
    if len(missing):
        table = pd.concat(
            [
                table,
                pd.DataFrame({"study": missing, "images": 0, "label": -1, "prob": float("nan")}),
            ],
            ignore_index=True,
        )
    return table
