"""metrics.json's blocks for a clinic: the figures at the model's operating point, with bootstrap
intervals, overall and per body part, and its calibration before and after the model's
temperature. Both are of the model's decision score (KALM's fused score, or CNN_g's at stage 1)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import pandas as pd
import torch

from kalm_lightning.data.index import BODY_PARTS
from kalm_lightning.evaluation.metrics import bootstrap_intervals
from kalm_lightning.evaluation.operating import (
    OPERATING_NAMES,
    calibrate,
    calibration_error,
    operating_scores,
    reliability,
)
from kalm_lightning.evaluation.studies import prob_column, study_means


def clinical_blocks(
    frame: pd.DataFrame,
    score: str,
    operating: Mapping[str, Any],
    bootstrap: int,
    seed: int,
    aggregation: str = "mean",
) -> dict[str, dict]:
    """{"operating_point": ..., "calibration": ...} for the score column of an image table."""
    temperature, threshold = float(operating["temperature"]), float(operating["threshold"])
    raw = torch.tensor(frame[prob_column(score)].to_numpy(float))
    prob = calibrate(raw, temperature)
    label = torch.tensor(frame["label"].to_numpy())
    study = torch.from_numpy(pd.factorize(frame["study"])[0])
    studies = study_means(prob, label, study, aggregation)
    raw_studies = study_means(raw, label, study, aggregation)
    parts = [frame["body_part"].iloc[int(i)] for i in studies.first]
    at = partial(operating_scores, threshold=threshold)
    overall = at(studies.prob, studies.label)
    if bootstrap > 0:
        overall["intervals"] = bootstrap_intervals(
            prob, label, study, bootstrap, seed, at, OPERATING_NAMES, aggregation
        )
    by_part = {}
    for part in BODY_PARTS:
        mask = torch.tensor([p == part for p in parts], dtype=torch.bool)
        if mask.any():
            by_part[part] = at(studies.prob[mask], studies.label[mask])
    calibration = {
        "score": score,
        "temperature": temperature,
        "ece_image": calibration_error(raw, label),
        "ece_image_calibrated": calibration_error(prob, label),
        "ece_study": calibration_error(raw_studies.prob, raw_studies.label),
        "ece_study_calibrated": calibration_error(studies.prob, studies.label),
        "reliability_study": reliability(studies.prob, studies.label),
    }
    if bootstrap > 0:  # the study-level ECE at the model's temperature, studies resampled
        ece = lambda p, y: {"ece_study_calibrated": calibration_error(p, y)}  # noqa: E731
        calibration["intervals"] = bootstrap_intervals(
            prob, label, study, bootstrap, seed, ece, ["ece_study_calibrated"], aggregation
        )
    return {
        "operating_point": {
            **{k: operating[k] for k in ("rule", "threshold", "temperature") if k in operating},
            "score": score,
            "fitted_on": operating.get("fitted_on", "not fitted (the paper's fixed 0.5)"),
            "study": overall,
            "by_body_part": by_part,
        },
        "calibration": calibration,
    }
