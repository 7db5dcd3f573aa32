"""What a record of the localizer study holds of an evaluation, and whether a run trained again
reproduced its record."""

from __future__ import annotations

import json
from pathlib import Path

from kalm_lightning.tasks.evaluate import run_evaluation

# How a record's hold-out figures were scored: on the patients its checkpoint records it held out.
HELDOUT_FROM = "the checkpoint's recorded hold-out"


def study_blocks(metrics: dict) -> dict:
    """The study-level figures of each score (global, local, fused) of one evaluation."""
    return {k: v["study"] for k, v in metrics.items() if "study" in v}


def holdout_figures(evaluation, out: Path) -> dict:
    """The run's study figures and localization on the hold-out of train that it selected on
    (`split=holdout`): what the study may choose by; valid is only reported."""
    evaluation = evaluation.copy()
    evaluation.split, evaluation.bootstrap = "holdout", 0
    metrics = run_evaluation(evaluation, out)
    return {
        "heldout_study": study_blocks(metrics),
        "heldout_localization": metrics.get("localization"),
        "heldout_from": HELDOUT_FROM,
    }


def reproduced(old: dict, new: dict) -> bool:
    """Whether a run trained again reproduced its record's figures: the study-level figures of
    each score on valid, the localization and the selection figure (what an older record holds
    of them: a record of an earlier version lacks blocks added since)."""

    def figures(record: dict) -> str:
        study = {
            score: {m: block.get(m) for m in ("accuracy", "auroc", "kappa", "n")}
            for score, block in (record.get("study") or {}).items()
            if score in ("global", "local", "kalm")
        }
        shown = {"study": study, "heldout": record.get("heldout")}
        shown["localization"] = record.get("localization")
        return json.dumps(shown, sort_keys=True)  # as JSON text: NaN is NaN

    return figures(old) == figures(new)
