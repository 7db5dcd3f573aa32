"""Study-level evaluation of a checkpoint or a predictions CSV, written as the reports users read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from kalm_lightning.data.mura import (
    BODY_PARTS,
    MURADataModule,
    collate_skipping_bad,
    read_lesion_boxes,
    read_mura_index,
)
from kalm_lightning.errors import UserError
from kalm_lightning.metrics import bootstrap_intervals, score_images
from kalm_lightning.models.backbone import backbone_normalization
from kalm_lightning.report import (
    box_to_pixels,
    boxes_figure,
    roc_figure,
    table_markdown,
    table_rows,
    to_original_pixels,
    write_json,
)
from kalm_lightning.stages import StageModule, load_stage

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible: use device=cpu")
    return torch.device(name)


@torch.no_grad()
def predict_images(
    module: StageModule, loader: DataLoader, device: torch.device, precision: str
) -> dict:
    """Every score of every image in the loader, plus KALM boxes (stage 2), ordered by image id."""
    module.to(device).eval()
    autocast = "bf16" in precision and device.type == "cuda"
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        if batch is None:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = module.score(module.prepare_images(batch["image"].to(device)))
        outputs["image_id"] = batch["image_id"]
        for key, value in outputs.items():
            parts.setdefault(key, []).append(value.float().cpu() if key != "image_id" else value)
    joined = {key: torch.cat(values) for key, values in parts.items()}
    order = torch.argsort(joined["image_id"])
    return {key: value[order] for key, value in joined.items()}


def score_dataset(
    module: StageModule, dataset, batch_size: int, num_workers: int, device: str, precision: str
) -> pd.DataFrame:
    """Run a trained stage over a dataset: one row per image with its scores and KALM box."""
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_bad
    )
    outputs = predict_images(module, loader, pick_device(device), precision)
    return image_table(dataset, outputs, module.hparams.source_size, dataset.resize)


def image_table(dataset, outputs: dict, source_size: int, resize: str) -> pd.DataFrame:
    """One row per image: its index columns, each score, and the KALM box in original pixels."""
    ids = outputs["image_id"].numpy()
    frame = dataset.index.iloc[ids][["path", "image", "study", "body_part", "label"]].reset_index(
        drop=True
    )
    for name in ("global", "local", "kalm"):
        if name in outputs:
            frame[f"prob_{name}"] = outputs[name].numpy()
    frame["prob"] = frame["prob_kalm"] if "prob_kalm" in frame else frame["prob_global"]
    if "boxes" in outputs:
        pixels = box_to_pixels(outputs["boxes"], source_size).tolist()
        original = [
            to_original_pixels(box, *dataset.original_size(i), source_size, resize)
            for box, i in zip(pixels, ids, strict=True)
        ]
        frame[["box_x0", "box_y0", "box_x1", "box_y1"]] = np.round(np.array(original), 1)
    return frame


def localization_scores(frame: pd.DataFrame, lesions: pd.DataFrame) -> dict[str, float]:
    """Hit rate (lesion centre inside the KALM box) and mean IoU over images with a lesion box."""
    merged = frame.merge(lesions[["path", "x0", "y0", "x1", "y1"]], on="path")
    if merged.empty:
        return {"hit_rate": float("nan"), "mean_iou": float("nan"), "n": 0}
    cx, cy = (merged.x0 + merged.x1) / 2, (merged.y0 + merged.y1) / 2
    hit = (
        (cx >= merged.box_x0)
        & (cx <= merged.box_x1)
        & (cy >= merged.box_y0)
        & (cy <= merged.box_y1)
    )
    iw = (np.minimum(merged.x1, merged.box_x1) - np.maximum(merged.x0, merged.box_x0)).clip(lower=0)
    ih = (np.minimum(merged.y1, merged.box_y1) - np.maximum(merged.y0, merged.box_y0)).clip(lower=0)
    inter = iw * ih
    union = (
        (merged.x1 - merged.x0) * (merged.y1 - merged.y0)
        + (merged.box_x1 - merged.box_x0) * (merged.box_y1 - merged.box_y0)
        - inter
    )
    return {
        "hit_rate": float(hit.mean()),
        "mean_iou": float((inter / union).mean()),
        "n": len(merged),
    }


def score_table(
    frame: pd.DataFrame, scores: list[str], bootstrap: int, seed: int
) -> dict[str, Any]:
    """metrics.json blocks for each score column of an image table."""
    study = torch.from_numpy(pd.factorize(frame["study"])[0])
    label = torch.tensor(frame["label"].to_numpy())
    part = torch.tensor([BODY_PARTS.index(p) for p in frame["body_part"]])
    metrics = {}
    for name in scores:
        prob = torch.tensor(frame[f"prob_{name}" if name != "predictions" else "prob"].to_numpy())
        metrics[name] = score_images(prob, label, study, part)
        if bootstrap > 0:
            metrics[name]["intervals"] = bootstrap_intervals(prob, label, study, bootstrap, seed)
    return metrics


def study_table(frame: pd.DataFrame) -> pd.DataFrame:
    return (
        frame.groupby("study", sort=False)
        .agg(label=("label", "first"), prob=("prob", "mean"))
        .reset_index()
    )


def write_reports(
    frame: pd.DataFrame,
    metrics: dict,
    out: Path,
    model: str,
    boxes_png: bool,
    dataset=None,
    source_size: int = 0,
    lesions: pd.DataFrame | None = None,
    grid_size: int = 16,
) -> None:
    """metrics.json, table.md, predictions CSVs, roc.png and (with boxes) boxes.png."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out / "metrics.json")
    (out / "table.md").write_text(table_markdown(metrics, model))
    frame.drop(columns=["image"]).to_csv(out / "predictions_images.csv", index=False)
    studies = study_table(frame)
    studies.to_csv(out / "predictions_studies.csv", index=False)
    # MURA's own submission shape: study,label with label the predicted class, no header.
    submission = pd.DataFrame(
        {"study": studies["study"], "label": (studies["prob"] >= 0.5).astype(int)}
    )
    submission.to_csv(out / "submission.csv", index=False, header=False)
    curves = {}
    study_codes = pd.factorize(frame["study"])[0]
    for column in [c for c in frame.columns if c.startswith("prob_")] or ["prob"]:
        per_study = frame.groupby(study_codes).agg(label=("label", "first"), prob=(column, "mean"))
        name = column.removeprefix("prob_") if column != "prob" else "predictions"
        curves[name] = (
            torch.tensor(per_study["prob"].to_numpy()),
            torch.tensor(per_study["label"].to_numpy()),
        )
    roc_figure(curves, out / "roc.png", f"{model}: study-level ROC")
    if boxes_png and dataset is not None:
        boxes_figure(frame, dataset, source_size, lesions, grid_size).save(out / "boxes.png")


def print_summary(metrics: dict, model: str, out: Path) -> None:
    table = Table(title=f"{model}: study level")
    for column in ("model", "accuracy", "AUROC", "kappa", "studies"):
        table.add_column(column)
    for row in table_rows(metrics, model):
        table.add_row(*row)
    console = Console()
    console.print(table)
    if "localization" in metrics:
        loc = metrics["localization"]
        console.print(
            f"localization: lesion centre inside the KALM box {loc['hit_rate']:.1%}, "
            f"mean IoU {loc['mean_iou']:.3f} over {loc['n']} images"
        )
    console.print(f"reports in {out}")


def evaluate_checkpoint(cfg: DictConfig, ckpt_path: str, out: Path) -> tuple[dict, str]:
    """Run a stage-1 or stage-2 checkpoint over the split and write every report."""
    module = load_stage(ckpt_path)
    hp = module.hparams
    mean, std = backbone_normalization(hp.backbone)
    data_cfg = {**cfg.data, "image_size": hp.image_size, "source_size": hp.source_size}
    datamodule: MURADataModule = hydra.utils.instantiate(
        data_cfg, mean=mean, std=std, run_dir=str(out)
    )
    datamodule.prepare_data()
    part = "test" if cfg.split == "valid" else "train"
    dataset = datamodule.dataset(part)
    dataset.train = False
    dataset.augment = {}
    frame = score_dataset(
        module, dataset, datamodule.batch_size, datamodule.num_workers, cfg.device, cfg.precision
    )
    scores = [name for name in ("global", "local", "kalm") if f"prob_{name}" in frame]
    metrics = score_table(frame, scores, cfg.bootstrap, cfg.seed)
    has_boxes = "box_x0" in frame
    lesions = read_lesion_boxes(datamodule.root)
    if lesions is not None and has_boxes:
        metrics["localization"] = localization_scores(frame, lesions)
    write_reports(
        frame,
        metrics,
        out,
        hp.backbone,
        has_boxes,
        dataset,
        hp.source_size,
        lesions,
        cfg.box_grid,
    )
    return metrics, hp.backbone


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
    frame = index.loc[rows.astype(int).to_numpy()].reset_index(drop=True)
    frame["prob"] = given["prob"].to_numpy()
    metrics = score_table(frame, ["predictions"], cfg.bootstrap, cfg.seed)
    write_reports(frame, metrics, out, "predictions", boxes_png=False)
    return metrics


def log_to_loggers(cfg: DictConfig, out: Path, metrics: dict, model: str) -> None:
    """With logger=wandb: the table and the figures in the run as well."""
    for logger_cfg in (cfg.get("logger") or {}).values():
        logger = hydra.utils.instantiate(logger_cfg)
        if type(logger).__name__ == "WandbLogger":
            rows = table_rows(metrics, model)
            logger.log_table(
                "study_table", columns=["model", "accuracy", "AUROC", "kappa", "studies"], data=rows
            )
            images = [str(out / name) for name in ("roc.png", "boxes.png") if (out / name).exists()]
            logger.log_image("reports", images)
            logger.experiment.finish()


def run_evaluation(cfg: DictConfig, out: Path | None = None) -> dict:
    """The evaluate command: exactly one of ckpt_path and predictions."""
    out = Path(out or cfg.paths.run_dir)
    if bool(cfg.ckpt_path) == bool(cfg.predictions):
        raise UserError("give exactly one of ckpt_path=CKPT and predictions=FILE.csv")
    if cfg.ckpt_path:
        metrics, model = evaluate_checkpoint(cfg, cfg.ckpt_path, out)
    else:
        metrics = evaluate_predictions(cfg, cfg.predictions, out)
        model = "predictions"
    log_to_loggers(cfg, out, metrics, model)
    print_summary(metrics, model, out)
    return metrics
