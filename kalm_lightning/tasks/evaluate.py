"""The evaluate command: a checkpoint or a predictions CSV scored per study and written as reports."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig

from kalm_lightning.data.geometry import PIXEL_BOX
from kalm_lightning.data.index import BODY_PARTS, read_lesion_boxes, read_mura_index
from kalm_lightning.data.mura import MURADataModule
from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.clinical import clinical_blocks
from kalm_lightning.evaluation.localization import localization_scores
from kalm_lightning.evaluation.metrics import bootstrap_intervals, score_images
from kalm_lightning.evaluation.predictions import given_table, image_table, write_predictions
from kalm_lightning.evaluation.report import (
    FIGURES,
    TABLE_COLUMNS,
    print_summary,
    table_rows,
    write_reports,
)
from kalm_lightning.evaluation.studies import PREDICTIONS, SCORE_LABELS, THRESHOLD, prob_column
from kalm_lightning.models.preprocessing import GIVEN
from kalm_lightning.runs import METRICS_FILE
from kalm_lightning.settings import SCORED_SPLITS
from kalm_lightning.stages import load_stage
from kalm_lightning.tasks.inference import heatmaps_of, predict_outputs
from kalm_lightning.training.loggers import (
    finish_mlflow,
    finish_wandb,
    log_figures,
    log_files,
    wandb_loggers,
)

log = logging.getLogger(__name__)


def score_table(
    frame: pd.DataFrame, scores: list[str], bootstrap: int, seed: int, aggregation: str = "mean"
) -> dict[str, Any]:
    """metrics.json blocks for each score column of an image table."""
    study = torch.from_numpy(pd.factorize(frame["study"])[0])
    label = torch.tensor(frame["label"].to_numpy())
    part = torch.tensor([BODY_PARTS.index(p) for p in frame["body_part"]])
    metrics = {}
    for name in scores:
        prob = torch.tensor(frame[prob_column(name)].to_numpy())
        metrics[name] = score_images(prob, label, study, part, aggregation=aggregation)
        if bootstrap > 0:
            metrics[name]["intervals"] = bootstrap_intervals(
                prob, label, study, bootstrap, seed, aggregation=aggregation
            )
    return metrics


def holdout_patients(module, ckpt_path: str) -> list[str]:
    """The patients of the hold-out of train the checkpoint's run validated on, as it recorded
    them: split=holdout scores exactly these, whatever seed or fraction is given now."""
    if not (module.holdout or {}).get("patients"):
        raise UserError(
            f"split=holdout: {ckpt_path} records no hold-out of train (it validated on MURA "
            "valid: data.val_from_train=0, or it was saved before checkpoints recorded their "
            "hold-out); score split=valid, or train with data.val_from_train=0.1"
        )
    return list(module.holdout["patients"])


def evaluate_checkpoint(cfg: DictConfig, ckpt_path: str, out: Path) -> tuple[dict, str]:
    """Run a stage-1 or stage-2 checkpoint over the split and write every report."""
    module = load_stage(ckpt_path, inference=cfg.get("inference"))
    module.tta = cfg.tta
    carried = module.preprocessing
    carried.refuse_contradictions(cfg.data, ckpt_path)
    data_cfg = {**cfg.data, **{key: getattr(carried, key) for key in GIVEN}}
    if cfg.split == "holdout":
        data_cfg["held_out"] = holdout_patients(module, ckpt_path)
    datamodule: MURADataModule = hydra.utils.instantiate(
        data_cfg, mean=carried.mean, std=carried.std, run_dir=str(out)
    )
    datamodule.prepare_data()
    dataset = datamodule.predict_on(SCORED_SPLITS[cfg.split])
    outputs = predict_outputs(module, datamodule, cfg.device, cfg.precision, what="evaluate")
    decision, operating = module.selection_score, module.operating
    frame = image_table(dataset, outputs, decision, operating)
    scores = [name for name in module.scores if prob_column(name) in frame]
    metrics = score_table(frame, scores, cfg.bootstrap, cfg.seed, cfg.study_aggregation)
    metrics.update(
        clinical_blocks(frame, decision, operating, cfg.bootstrap, cfg.seed, cfg.study_aggregation)
    )
    metrics["inference"] = {"study_aggregation": cfg.study_aggregation, "tta": cfg.tta}
    lesions = read_lesion_boxes(datamodule.root)
    boxes = None
    if PIXEL_BOX[0] in frame:  # a stage-2 model: KALM boxes to score and draw
        if lesions is not None:
            metrics["localization"] = localization_scores(frame, lesions)
        boxes = {
            "dataset": dataset,
            "source_size": carried.source_size,
            "lesions": lesions,
            "count": cfg.box_grid,
            "heatmaps": partial(heatmaps_of, module, dataset=dataset),
        }
    threshold = float(operating["threshold"])
    write_reports(frame, metrics, out, module.backbone_name, scores, boxes, cfg.study_aggregation)
    write_predictions(frame, out, threshold, cfg.study_aggregation)
    return metrics, module.backbone_name


def evaluate_predictions(cfg: DictConfig, csv_path: str, out: Path) -> dict:
    """Score an image-level predictions CSV (path,prob) against the MURA labels of the split."""
    path = Path(csv_path)
    if not path.is_file():
        raise UserError(f"predictions={csv_path} does not exist")
    given = pd.read_csv(path)
    if not {"path", "prob"} <= set(given.columns):
        raise UserError(f"{path} needs the columns path,prob (found {','.join(given.columns)})")
    if given["prob"].isna().any() or given["prob"].min() < 0 or given["prob"].max() > 1:
        raise UserError(f"{path}: prob must be abnormal probabilities in [0, 1], not logits")
    index = read_mura_index(cfg.data.root, cfg.split)
    key = given["path"].map(lambda p: str(Path(p).resolve()) if Path(p).is_absolute() else p)
    by_path = dict(zip(index["path"], index.index, strict=True))
    by_image = dict(zip(index["image"], index.index, strict=True))
    rows = key.map(lambda p: by_path.get(p, by_image.get(p)))
    if rows.isna().any():
        first = given["path"][rows.isna()].iloc[0]
        raise UserError(
            f"{path}: {int(rows.isna().sum())} path(s) are not images of the {cfg.split} "
            f"split under {cfg.data.root}, e.g. {first}"
        )
    if rows.duplicated().any():
        raise UserError(f"{path}: {given['path'][rows.duplicated()].iloc[0]} is listed twice")
    if len(rows) < len(index):
        log.warning("%s scores %d of the %d images of the split", path, len(rows), len(index))
    frame = given_table(index.loc[rows.astype(int).to_numpy()], given["prob"].to_numpy())
    metrics = score_table(frame, [PREDICTIONS], cfg.bootstrap, cfg.seed, cfg.study_aggregation)
    write_reports(frame, metrics, out, PREDICTIONS, [PREDICTIONS], None, cfg.study_aggregation)
    write_predictions(frame, out, THRESHOLD, cfg.study_aggregation)
    return metrics


def log_to_loggers(cfg: DictConfig, out: Path, metrics: dict, model: str) -> None:
    """With logger=wandb: the table and the figures in the run as well; with logger=mlflow: the
    study-level figures as metrics, the reports and figures as artefacts."""
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    exit_code = 1
    try:
        for logger in wandb_loggers(loggers):
            logger.log_table(
                "study_table", columns=list(TABLE_COLUMNS), data=table_rows(metrics, model)
            )
            images = [str(out / n) for n in FIGURES if (out / n).exists()]
            logger.log_image("reports", images)
        log_figures(loggers, metrics, SCORE_LABELS)
        log_files(loggers, [out / name for name in (METRICS_FILE, "table.md", *FIGURES)])
        exit_code = 0
    finally:
        finish_wandb(loggers, exit_code)
        finish_mlflow(loggers, exit_code)


def run_evaluation(cfg: DictConfig, out: Path | None = None) -> dict:
    """The evaluate command: exactly one of ckpt_path and predictions."""
    out = Path(out or cfg.paths.run_dir)
    if bool(cfg.ckpt_path) == bool(cfg.predictions):
        raise UserError("give exactly one of ckpt_path=CKPT and predictions=FILE.csv")
    if cfg.ckpt_path:
        metrics, model = evaluate_checkpoint(cfg, cfg.ckpt_path, out)
    else:
        metrics = evaluate_predictions(cfg, cfg.predictions, out)
        model = PREDICTIONS
    log_to_loggers(cfg, out, metrics, model)
    print_summary(metrics, model, out)
    return metrics
