"""Reports of an evaluation: metrics.json, the paper's Table 1 (markdown and on the console) and
the figures (the prediction table and MURA's submission file: `evaluation/predictions.py`)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from kalm_lightning.evaluation.figures import boxes_figure, reliability_figure, roc_figure
from kalm_lightning.evaluation.studies import (
    PREDICTIONS,
    SCORE_LABELS,
    prob_column,
    study_table,
)
from kalm_lightning.runs import METRICS_FILE, write_atomic, writing

TABLE_COLUMNS = ("model", "accuracy", "AUROC", "kappa", "studies")
ROC, RELIABILITY, BOXES = FIGURES = ("roc.png", "reliability.png", "boxes.png")


def _cell(value: float, interval: Sequence[float] | None, percent: bool) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:.1%}" if percent else f"{value:.3f}"
    if interval and not math.isnan(interval[0]):
        low, high = (f"{v:.1%}" if percent else f"{v:.3f}" for v in interval)
        text += f" [{low}, {high}]"
    return text


def table_rows(metrics: Mapping[str, Mapping], model: str, level: str = "study") -> list[list[str]]:
    """Rows of the paper's Table 1 for one model: score, accuracy, AUROC, kappa, studies."""
    rows = []
    for name, block in metrics.items():
        if name not in SCORE_LABELS:
            continue
        m, ci = block[level], block.get("intervals", {})
        label = f"{model}_{SCORE_LABELS[name]}" if name != PREDICTIONS else model
        rows.append(
            [
                label,
                _cell(m["accuracy"], ci.get("accuracy"), True),
                _cell(m["auroc"], ci.get("auroc"), False),
                _cell(m["kappa"], ci.get("kappa"), False),
                str(m["n"]),
            ]
        )
    return rows


def table_markdown(metrics: Mapping[str, Mapping], model: str) -> str:
    """Table 1 at study level, then the same figures per body part."""
    head = f"| {' | '.join(TABLE_COLUMNS)} |\n" + "|---" * len(TABLE_COLUMNS) + "|\n"
    lines = [f"## {model}: study level (as the paper's Table 1)\n", head]
    lines += ["| " + " | ".join(row) + " |\n" for row in table_rows(metrics, model)]
    parts = sorted({part for block in metrics.values() for part in block.get("by_body_part", {})})
    for part in parts:
        lines += [f"\n### {part}\n\n", head]
        for name, block in metrics.items():
            if name in SCORE_LABELS and part in block["by_body_part"]:
                per_part = {name: {"study": block["by_body_part"][part]}}
                lines += ["| " + " | ".join(row) + " |\n" for row in table_rows(per_part, model)]
    return "".join(lines)


def write_json(data: Mapping, path: Path) -> None:
    write_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def write_reports(
    frame: pd.DataFrame,
    metrics: dict,
    out: Path,
    model: str,
    scores: Sequence[str],
    boxes: dict | None = None,
    aggregation: str = "mean",
) -> None:
    """metrics.json, table.md, roc.png, reliability.png and (with boxes) boxes.png.

    boxes: the keyword arguments of `boxes_figure` besides the frame (dataset, source_size, lesions,
    count), for an image table that holds KALM boxes."""
    with writing(out):
        _write_reports(frame, metrics, out, model, scores, boxes, aggregation)


def _write_reports(
    frame: pd.DataFrame,
    metrics: dict,
    out: Path,
    model: str,
    scores: Sequence[str],
    boxes: dict | None,
    aggregation: str,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out / METRICS_FILE)
    write_atomic(out / "table.md", table_markdown(metrics, model))
    curves = {}
    for score in scores:
        per_study = study_table(frame, prob_column(score), aggregation)
        curves[score] = (
            torch.tensor(per_study["prob"].to_numpy()),
            torch.tensor(per_study["label"].to_numpy()),
        )
    roc_figure(curves, out / ROC, f"{model}: study-level ROC")
    if "calibration" in metrics:
        reliability_figure(metrics["calibration"], out / RELIABILITY, f"{model}: reliability")
    if boxes is not None:
        buffer = io.BytesIO()
        boxes_figure(frame, **boxes).save(buffer, format="png")
        write_atomic(out / BOXES, buffer.getvalue())


def print_summary(metrics: dict, model: str, out: Path) -> None:
    """The study-level table, the localization figures where known, and where the reports are."""
    table = Table(title=f"{model}: study level")
    for column in TABLE_COLUMNS:
        table.add_column(column)
    for row in table_rows(metrics, model):
        table.add_row(*row)
    console = Console()
    console.print(table)
    if "localization" in metrics:
        loc = metrics["localization"]
        if "windows" in loc:
            console.print(
                f"localization: lesion centre inside any of the {loc['windows']} windows "
                f"{loc['hit_rate']:.1%}, inside the one weighed most {loc['hit_rate_top']:.1%}; "
                f"best window's mean IoU {loc['mean_best_iou']:.3f}, windows' total area "
                f"{loc['mean_total_area']:.1%} of the image, over {loc['n']} images"
            )
        else:
            console.print(
                f"localization: lesion centre inside the KALM box {loc['hit_rate']:.1%}, "
                f"mean IoU {loc['mean_iou']:.3f}, mean box area {loc['mean_area']:.1%} of the "
                f"image, over {loc['n']} images"
            )
    if "operating_point" in metrics:
        point, calibration = metrics["operating_point"], metrics["calibration"]
        at = point["study"]
        console.print(
            f"operating point ({point['rule']}, threshold {point['threshold']:.3f}): sensitivity "
            f"{at['sensitivity']:.1%}, specificity {at['specificity']:.1%}, PPV {at['ppv']:.1%}, "
            f"NPV {at['npv']:.1%}; study ECE {calibration['ece_study_calibrated']:.3f}"
            + (
                f" at temperature {calibration['temperature']:.2f}"
                if calibration["temperature"] != 1
                else ""
            )
        )
    console.print(f"reports in {out}")
