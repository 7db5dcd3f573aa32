"""MURA's judgement per study: a study's probability is the mean over its images, abnormal at >= 0.5.

StudyMetrics keeps every image's (id, study, body part, probability, label), gathers them across
processes, drops images seen twice (padded DDP shards) and scores images, studies and body parts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_cohen_kappa,
)

from kalm_lightning.data.index import BODY_PARTS
from kalm_lightning.evaluation.studies import abnormal, study_means
from kalm_lightning.progress import progress

NAMES = ("accuracy", "auroc", "kappa")


def binary_scores(prob: torch.Tensor, label: torch.Tensor, what: str = "") -> dict[str, float]:
    """Accuracy, AUROC and Cohen's kappa of probabilities; NaN (with a warning) where undefined."""
    n = int(label.numel())
    if n == 0:
        return {"accuracy": math.nan, "auroc": math.nan, "kappa": math.nan, "n": 0}
    prob, label = prob.double(), label.long()
    pred = abnormal(prob).long()  # integer predictions: torchmetrics thresholds with '>'
    scores = {"accuracy": binary_accuracy(pred, label).item(), "auroc": math.nan, "kappa": math.nan}
    if torch.unique(label).numel() < 2:
        warnings.warn(
            f"{what or 'scores'}: {n} sample(s) of one class only; AUROC and kappa are "
            "undefined and reported as NaN",
            stacklevel=2,
        )
    else:
        # Probabilities in [0, 1]: torchmetrics applies no sigmoid to them.
        scores["auroc"] = binary_auroc(prob, label).item()
        scores["kappa"] = binary_cohen_kappa(pred, label).item()
    return {**scores, "n": n}


def score_images(
    prob: torch.Tensor,
    label: torch.Tensor,
    study: torch.Tensor,
    body_part: torch.Tensor,
    body_part_names: Sequence[str] = BODY_PARTS,
    aggregation: str = "mean",
) -> dict:
    """{"image": M, "study": M, "by_body_part": {name: M}}, M = accuracy, auroc, kappa, n (studies)."""
    studies = study_means(prob, label, study, aggregation)
    study_prob, study_label, study_part = studies.prob, studies.label, body_part[studies.first]
    by_part = {}
    for code, name in enumerate(body_part_names):
        mask = study_part == code
        if mask.any():
            by_part[name] = binary_scores(study_prob[mask], study_label[mask], f"{name} studies")
    return {
        "image": binary_scores(prob, label, "images"),
        "study": binary_scores(study_prob, study_label, "studies"),
        "by_body_part": by_part,
    }


def bootstrap_intervals(
    prob: torch.Tensor,
    label: torch.Tensor,
    study: torch.Tensor,
    samples: int,
    seed: int = 0,
    scores: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
    names: Sequence[str] = NAMES,
    aggregation: str = "mean",
) -> dict[str, list[float]]:
    """95% percentile intervals of study-level figures (`scores` of study probabilities and
    labels; accuracy, AUROC and kappa by default), resampling studies with replacement."""
    studies = study_means(prob, label, study, aggregation)
    study_prob, study_label = studies.prob, studies.label
    scores = scores or binary_scores
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in progress(range(samples), "bootstrap", samples, "resamples"):
            pick = torch.from_numpy(rng.integers(0, len(study_prob), len(study_prob)))
            for name, value in scores(study_prob[pick], study_label[pick]).items():
                if name in draws and not math.isnan(value):
                    draws[name].append(value)
    return {
        name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else [math.nan] * 2
        for name, v in draws.items()
    }


class StudyMetrics(Metric):
    """Image-, study- and body-part-level accuracy, AUROC and kappa, exact under DDP."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, body_parts: Sequence[str] = BODY_PARTS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.body_parts = list(body_parts)
        for name in ("image_id", "study_id", "body_part", "prob", "label"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        prob: torch.Tensor,
        label: torch.Tensor,
        image_id: torch.Tensor,
        study_id: torch.Tensor,
        body_part: torch.Tensor | Sequence[str],
    ) -> None:
        """prob: abnormal probabilities in [0, 1] (never logits); body_part: codes or names."""
        if not isinstance(body_part, torch.Tensor):
            body_part = torch.tensor(
                [self.body_parts.index(p) for p in body_part], device=self.device
            )
        prob = prob.detach().float()
        if prob.numel() and (prob.min() < 0 or prob.max() > 1):
            raise ValueError("StudyMetrics takes probabilities in [0, 1], not logits")
        self.prob.append(prob)
        self.label.append(label.detach().long())
        self.image_id.append(image_id.detach().long())
        self.study_id.append(study_id.detach().long())
        self.body_part.append(body_part.long())

    def gathered(self) -> dict[str, torch.Tensor]:
        """Every image once (duplicates from padded shards dropped), ordered by image id."""
        state = {}
        for name in ("image_id", "study_id", "body_part", "prob", "label"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = torch.cat(value) if value else torch.zeros(0, device=self.device)
            state[name] = value.cpu()
        _, first = np.unique(state["image_id"].numpy(), return_index=True)
        keep = torch.from_numpy(first)
        return {name: value[keep] for name, value in state.items()}

    def gathered_everywhere(self) -> dict[str, torch.Tensor]:
        """`gathered`, with the states of every process (what compute sees under DDP)."""
        with self.sync_context(should_sync=True, should_unsync=True):
            return self.gathered()

    def log_loss(self, level: str) -> float:
        """The mean binary cross-entropy of the images' (level "image") or the studies'
        probabilities (level "study", as `score_images` forms them), over every process."""
        state = self.gathered_everywhere()
        prob, label = state["prob"].double(), state["label"]
        if level == "study":
            studies = study_means(prob, label, state["study_id"])
            prob, label = studies.prob, studies.label
        return F.binary_cross_entropy(prob.clamp(1e-7, 1 - 1e-7), label.double()).item()

    def compute(self) -> dict:
        state = self.gathered()
        return score_images(
            state["prob"], state["label"], state["study_id"], state["body_part"], self.body_parts
        )
