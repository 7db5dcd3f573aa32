"""From a score to a decision: the operating point (a threshold chosen by a rule), the figures a
clinic reads at it, and calibration (expected calibration error, temperature scaling).

A stage chooses its operating point at each validation, on the patient-disjoint hold-out of train
(`data.val_from_train`), and records it in its checkpoints; evaluate and predict read it there.
Rules (`model.operating_point.rule`): `fixed=t` (the paper's is fixed=0.5), `youden` (the
threshold that maximises sensitivity + specificity - 1), `sensitivity=s` (the highest threshold
that keeps sensitivity >= s), `specificity=s` (the lowest that keeps specificity >= s). All at
study level, where MURA decides.

Temperature scaling: p_T = sigmoid(logit(p) / T), with T fitted by maximum likelihood on the
hold-out's images; T > 1 softens an over-confident model. The threshold is then chosen on the
calibrated probabilities.
"""

from __future__ import annotations

import math
import re

import torch
from torchmetrics.functional.classification import binary_calibration_error

from kalm_lightning.errors import UserError

OPERATING_NAMES = ("sensitivity", "specificity", "ppv", "npv", "f1")
RULE = re.compile(
    r"^(youden|fixed=(?P<t>[0-9.]+)|(?P<kind>sensitivity|specificity)=(?P<s>[0-9.]+))$"
)
EPSILON = 1e-6


def check_rule(rule: str) -> None:
    """Refuse a rule that is not one of the four, naming them."""
    match = RULE.match(str(rule))
    value = None if match is None else (match.group("t") or match.group("s"))
    if match is None or (value is not None and not 0 <= float(value) <= 1):
        raise UserError(
            f"model.operating_point.rule={rule!r} is not one of youden, sensitivity=S, "
            "specificity=S, fixed=T (S, T in [0, 1])"
        )


def choose_threshold(prob: torch.Tensor, label: torch.Tensor, rule: str) -> float:
    """The threshold the rule picks on these (study-level) probabilities; abnormal is >= it."""
    check_rule(rule)
    match = RULE.match(rule)
    if match.group("t") is not None:
        return float(match.group("t"))
    prob, label = prob.double(), label.long()
    candidates = torch.unique(torch.cat([prob, prob.new_tensor([1.0 + EPSILON])]))
    called = prob[None, :] >= candidates[:, None]  # [thresholds, studies]
    positives, negatives = (label == 1).sum().clamp_min(1), (label == 0).sum().clamp_min(1)
    sensitivity = (called & (label == 1)).sum(1) / positives
    specificity = (~called & (label == 0)).sum(1) / negatives
    if rule == "youden":
        return float(candidates[torch.argmax(sensitivity + specificity - 1)])
    wanted = float(match.group("s"))
    if match.group("kind") == "sensitivity":
        keeping = candidates[sensitivity >= wanted - EPSILON]
        return float(keeping.max()) if len(keeping) else float(candidates.min())
    keeping = candidates[specificity >= wanted - EPSILON]
    return float(keeping.min()) if len(keeping) else float(candidates.max())


def operating_scores(prob: torch.Tensor, label: torch.Tensor, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV and F1 of calling >= threshold abnormal (NaN where a
    denominator is empty), and n."""
    called, label = prob.double() >= threshold, label.long() == 1
    tp, fp = int((called & label).sum()), int((called & ~label).sum())
    fn, tn = int((~called & label).sum()), int((~called & ~label).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    sensitivity, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
    return {
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "threshold": float(threshold),
        "n": int(label.numel()),
    }


def logit(prob: torch.Tensor) -> torch.Tensor:
    prob = prob.double().clamp(EPSILON, 1 - EPSILON)
    return torch.log(prob) - torch.log1p(-prob)


def calibrate(prob: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_T = sigmoid(logit(p) / T); T = 1 leaves p as it is."""
    if temperature == 1.0:
        return prob
    return torch.sigmoid(logit(prob) / temperature).to(prob.dtype)


def fit_temperature(prob: torch.Tensor, label: torch.Tensor) -> float:
    """T minimising the negative log-likelihood of the labels under p_T (LBFGS on log T)."""
    z, y = logit(prob), label.double()
    if torch.unique(y).numel() < 2:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def calibration_error(prob: torch.Tensor, label: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error (torchmetrics' BinaryCalibrationError, L1, equal-width bins)."""
    if label.numel() == 0:
        return math.nan
    return float(binary_calibration_error(prob.float(), label.long(), n_bins=bins, norm="l1"))


def reliability(prob: torch.Tensor, label: torch.Tensor, bins: int = 10) -> dict[str, list]:
    """Per equal-width bin of predicted probability: its mean prediction, the observed abnormal
    rate and the count (the reliability diagram's points)."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(prob.double(), edges[1:-1], right=True)
    mean_p, observed, count = [], [], []
    for b in range(bins):
        inside = which == b
        count.append(int(inside.sum()))
        mean_p.append(float(prob[inside].double().mean()) if inside.any() else math.nan)
        observed.append(float(label[inside].double().mean()) if inside.any() else math.nan)
    return {"mean_predicted": mean_p, "observed": observed, "count": count}
