"""Operating points, calibration and class weights against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, roc_curve

from kalm_lightning.data import read_mura_index
from kalm_lightning.data.index import BODY_PARTS
from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.operating import (
    calibrate,
    calibration_error,
    choose_threshold,
    fit_temperature,
    operating_scores,
)
from kalm_lightning.stages.loss import class_weights


def sample(seed: int, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    prob = np.clip(rng.normal(0.35 + 0.3 * label, 0.2), 0.001, 0.999)
    return torch.tensor(prob), torch.tensor(label)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_figures_at_a_threshold_match_sklearn(threshold: float) -> None:
    prob, label = sample(1)
    got = operating_scores(prob, label, threshold)
    pred = (prob.numpy() >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(label.numpy(), pred).ravel()
    assert got["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert got["specificity"] == pytest.approx(tn / (tn + fp))
    assert got["ppv"] == pytest.approx(tp / (tp + fp))
    assert got["npv"] == pytest.approx(tn / (tn + fn))
    assert got["f1"] == pytest.approx(f1_score(label.numpy(), pred))


def test_each_rule_picks_the_threshold_it_names() -> None:
    prob, label = sample(2)
    fpr, tpr, thresholds = roc_curve(label.numpy(), prob.numpy())
    youden = choose_threshold(prob, label, "youden")
    assert youden == pytest.approx(thresholds[np.argmax(tpr - fpr)])
    sens = choose_threshold(prob, label, "sensitivity=0.95")
    at = operating_scores(prob, label, sens)
    assert at["sensitivity"] >= 0.95  # kept, and any higher threshold would lose it
    above = prob[prob > sens].min()
    assert operating_scores(prob, label, float(above))["sensitivity"] < 0.95
    spec = choose_threshold(prob, label, "specificity=0.9")
    assert operating_scores(prob, label, spec)["specificity"] >= 0.9
    below = prob[prob < spec].max()
    assert operating_scores(prob, label, float(below))["specificity"] < 0.9
    assert choose_threshold(prob, label, "fixed=0.5") == 0.5
    with pytest.raises(UserError, match=r"^model\.operating_point\.rule='median' is not one of"):
        choose_threshold(prob, label, "median")


def test_calibration_error_is_the_binned_gap() -> None:
    prob, label = sample(3)
    p, y = prob.numpy(), label.numpy()
    bins = np.minimum((p * 10).astype(int), 9)  # equal-width bins, the last closed
    expected = sum(
        (bins == b).mean() * abs(p[bins == b].mean() - y[bins == b].mean())
        for b in range(10)
        if (bins == b).any()
    )
    assert calibration_error(prob, label) == pytest.approx(expected, abs=1e-6)


def test_temperature_scaling_lowers_the_calibration_error_of_an_over_confident_model() -> None:
    rng = np.random.default_rng(4)
    truth = rng.uniform(0.02, 0.98, 4000)
    label = torch.tensor((rng.random(4000) < truth).astype(int))
    logit = np.log(truth / (1 - truth))
    over = torch.tensor(1 / (1 + np.exp(-3 * logit)))  # three times too sure of itself
    held, test = slice(0, 2000), slice(2000, None)
    temperature = fit_temperature(over[held], label[held])
    assert temperature == pytest.approx(3.0, rel=0.15)
    before = calibration_error(over[test], label[test])
    after = calibration_error(calibrate(over[test], temperature), label[test])
    assert after < before / 2


def test_mura_baseline_class_weights_are_n_over_a_plus_n_per_body_part(mura_root) -> None:
    index = read_mura_index(mura_root, "train")
    table = class_weights(index, "body_part")
    for code, part in enumerate(BODY_PARTS):
        rows = index[index["body_part"] == part]
        if rows.empty:
            continue
        abnormal, normal = (rows["label"] == 1).sum(), (rows["label"] == 0).sum()
        assert table[code, 1].item() == pytest.approx(normal / (abnormal + normal))  # abnormal
        assert table[code, 0].item() == pytest.approx(abnormal / (abnormal + normal))  # normal
    overall = class_weights(index, "balanced")
    abnormal, normal = (index["label"] == 1).sum(), (index["label"] == 0).sum()
    assert torch.allclose(overall[:, 1], torch.tensor(normal / (abnormal + normal)).float())
