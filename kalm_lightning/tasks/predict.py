"""Predictions of a trained model on new radiographs, in the CSV shape `evaluate predictions=` reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from rich.console import Console

from kalm_lightning.data.dataset import MURADataset
from kalm_lightning.data.index import BODY_PARTS, MURA_DIR, read_mura_index
from kalm_lightning.errors import UserError
from kalm_lightning.inference import score_dataset
from kalm_lightning.models.backbone import backbone_normalization
from kalm_lightning.stages import load_stage
from kalm_lightning.studies import abnormal, study_table, write_submission


def image_index(images: str, split: str) -> pd.DataFrame:
    """The images to score: a MURA root's split, a folder of PNGs (recursively) or one PNG."""
    path = Path(images).expanduser()
    if (path / MURA_DIR).is_dir() or path.name == MURA_DIR:
        index = read_mura_index(path, split)
        return index.assign(label=-1)  # the model must not see the labels; evaluate scores them
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".png")
    else:
        raise UserError(f"images={images} does not exist")
    if not files:
        raise UserError(f"images={images} holds no .png files")
    absolute = [str(f.resolve()) for f in files]
    parts = [next((p for p in f.parts if p in BODY_PARTS), "unknown") for f in files]
    return pd.DataFrame(
        {
            "path": absolute,
            "image": absolute,
            "study": [str(Path(a).parent) + "/" for a in absolute],
            "patient": [f.parent.parent.name for f in files],
            "body_part": parts,
            "label": -1,
        }
    )


def run_prediction(cfg: DictConfig) -> pd.DataFrame:
    """Score every image; write predictions.csv and submission.csv into the run directory."""
    module = load_stage(cfg.ckpt_path)
    hp = module.hparams
    mean, std = backbone_normalization(hp.backbone)
    index = image_index(cfg.images, cfg.split)
    out = Path(cfg.paths.run_dir)
    dataset = MURADataset(
        index,
        hp.source_size,
        resize=cfg.resize,
        mean=mean,
        std=std,
        on_bad_image="skip",
        skipped_log=out / "skipped_images.csv",
    )
    frame = score_dataset(
        module, dataset, cfg.batch_size, cfg.num_workers, cfg.device, cfg.precision
    )
    # path as MURA's CSV writes it (relative) for a MURA root, else absolute
    frame = frame.drop(columns=["label"]).assign(path=frame["image"])
    out.mkdir(parents=True, exist_ok=True)
    frame.drop(columns=["image"]).to_csv(out / "predictions.csv", index=False)
    studies = study_table(frame)
    write_submission(studies, out / "submission.csv")
    Console().print(
        f"{len(frame)} images, {len(studies)} studies scored by {hp.backbone} (stage {hp.stage}); "
        f"{int(abnormal(studies['prob']).sum())} studies abnormal. Predictions in {out}"
    )
    return frame
