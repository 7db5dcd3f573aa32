"""The predict command: a trained model on new radiographs, every file accounted for.

Outputs: the prediction table evaluate writes too, one meaning per column
(`evaluation/predictions.py`: predictions_images.csv, predictions_studies.csv, submission.csv;
`evaluate predictions=` reads the first), and with overlays=true / heatmaps=true the drawings.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.console import Console

from kalm_lightning.data.dataset import MURADataset
from kalm_lightning.data.dicom import DICOM_SUFFIXES
from kalm_lightning.data.geometry import (
    PIXEL_BOX,
    crop_box,
    crop_weight,
    to_original_map,
    windows_in,
)
from kalm_lightning.data.images import load_grayscale
from kalm_lightning.data.index import BODY_PARTS, MURA_DIR, read_mura_index
from kalm_lightning.data.mura import MURADataModule
from kalm_lightning.errors import UserError, check_number
from kalm_lightning.evaluation.figures import overlay_image
from kalm_lightning.evaluation.predictions import (
    IMAGES,
    STUDIES,
    SUBMISSION,
    image_table,
    write_predictions,
)
from kalm_lightning.evaluation.studies import abnormal
from kalm_lightning.runs import writing
from kalm_lightning.stages import load_stage
from kalm_lightning.tasks.inference import heatmap_batches, predict_outputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)  # what a header-less CSV lists
OUTPUTS = (IMAGES, STUDIES, SUBMISSION, "skipped_images.csv", "overlays", "heatmaps")
VISUALS = {"overlay": "overlays", "heatmap": "heatmaps"}  # column -> folder
SUFFIX = {"overlay": ".png", "heatmap": ".npy"}


def _rows(files: list[Path], shown: list[str], studies: list[str]) -> pd.DataFrame:
    """The index predict scores: file (what is read), path (what is reported), study, body part."""
    return pd.DataFrame(
        {
            "path": [str(f) for f in files],
            "image": shown,
            "study": studies,
            "patient": [f.parent.parent.name for f in files],
            "body_part": [next((p for p in f.parts if p in BODY_PARTS), "unknown") for f in files],
            "label": -1,  # the model never sees labels; evaluate scores them
        }
    )


def _from_csv(path: Path) -> pd.DataFrame:
    """A CSV with a `path` column, or MURA's header-less image CSV; relative paths are resolved
    against the CSV's folder, then the folder above it (where MURA's paths start)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "path" not in table.columns:
        first = str(table.columns[0])
        if len(table.columns) != 1 or Path(first).suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(
                f"images={path}: a CSV needs a `path` column (or MURA's header-less image list)"
            )
        table = pd.read_csv(path, header=None, names=["path"], dtype=str, keep_default_na=False)
    files = []
    for given in table["path"].str.strip():
        candidates = (
            [Path(given)]
            if Path(given).is_absolute()
            else [path.parent / given, path.parent.parent / given]
        )
        files.append(next((c for c in candidates if c.exists()), candidates[0]).resolve())
    given = table["path"].str.strip().tolist()
    return _rows(files, given, [str(Path(g).parent) + "/" for g in given])


def collect_images(images: str, split: str) -> pd.DataFrame:
    """One row per file to score: a MURA root's split, a CSV, one file, or a folder tree."""
    path = Path(images).expanduser()
    if (path / MURA_DIR).is_dir() or path.name == MURA_DIR:
        index = read_mura_index(path, split)
        return index.assign(label=-1)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_csv(path.resolve())
    if path.is_file():
        files = [path.resolve()]
    elif path.is_dir():
        files = sorted(
            f.resolve() for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")
        )
    else:
        raise UserError(f"images={images} does not exist")
    if not files:
        raise UserError(f"images={images} holds no files")
    return _rows(files, [str(f) for f in files], [str(f.parent) + "/" for f in files])


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds files, unless overwrite=true (then ours are replaced)."""
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise UserError(
            f"output={out} already holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}: "
            "choose another folder, or pass overwrite=true to replace the predictions there"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def windows_of(row: pd.Series) -> list[tuple[list[float], float]]:
    """Every window of a row of the prediction table with its attention weight (none for a
    model that reads one crop)."""
    windows = range(1, windows_in(row.index) + 1)
    return [
        ([row[c] for c in crop_box(k)], float(row[crop_weight(k)]))
        for k in windows
        if not np.isnan(row[crop_weight(k)])
    ]


def overlay_name(path: str, taken: set[str]) -> str:
    """A file name for an image's overlay, unique in the run."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/")).strip("_") or "image"
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return name


def write_visuals(
    frame: pd.DataFrame,
    out: Path,
    threshold: float,
    batches: Iterable[tuple[list[int], dict[str, np.ndarray]]],
    dataset: MURADataset,
    overlays: bool,
    arrays: bool,
) -> None:
    """Per scored image, from its class activation maps (one batch at a time): the file named in
    its `overlay` column (maps under the box, colour scale) and/or in its `heatmap` column
    ([maps, H, W] float16 over the original image: CNN_g's CAM, then for a stage-2 model CNN_l's
    in its box)."""
    rows = frame.drop_duplicates("file").set_index("file")
    for column, wanted in (("overlay", overlays), ("heatmap", arrays)):
        if wanted:
            (out / VISUALS[column]).mkdir()
    for ids, maps in batches:
        for j, image_id in enumerate(ids):
            file = dataset.paths[image_id]
            row = rows.loc[file]
            geometry = (*dataset.original_size(image_id), dataset.source_size, dataset.resize)
            heat = {name: to_original_map(m[j], *geometry) for name, m in maps.items()}
            if arrays:
                stack = np.stack([heat[k] for k in maps]).astype(np.float16)
                np.save(out / row["heatmap"], stack)
            if overlays:
                box = None if np.isnan(row["box_x0"]) else [row[c] for c in PIXEL_BOX]
                verdict = "abnormal" if abnormal(row["prob"], threshold) else "normal"
                caption = f"p={row['prob']:.3f} {verdict}"
                image = overlay_image(
                    load_grayscale(file), box, caption, heatmaps=heat, windows=windows_of(row)
                )
                image.save(out / row["overlay"])


def run_prediction(cfg: DictConfig) -> pd.DataFrame:
    """Score every file; write the prediction table (and overlays); exit non-zero when any file
    failed."""
    if cfg.threshold is not None:
        check_number("threshold", cfg.threshold, 0, 1)
    check_number("batch_size", cfg.batch_size, 1, integer=True)
    out = Path(cfg.paths.run_dir)
    module = load_stage(cfg.ckpt_path)
    module.tta = cfg.tta
    operating = dict(module.operating)  # the threshold and temperature chosen on the hold-out
    if cfg.threshold is not None:
        operating["threshold"] = float(cfg.threshold)
    threshold, temperature = float(operating["threshold"]), float(operating["temperature"])
    carried = module.preprocessing
    carried.refuse_contradictions(cfg.data, cfg.ckpt_path)
    index = collect_images(cfg.images, cfg.split)
    prepare_output(out, cfg.overwrite)

    exists = index["path"].map(lambda p: Path(p).is_file())
    datamodule = MURADataModule(
        root=str(out),  # no splits are read: predict_on names the files
        image_size=carried.image_size,
        source_size=carried.source_size,
        resize=carried.resize,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=False,
        mean=carried.mean,
        std=carried.std,
        run_dir=str(out),
    )
    dataset = datamodule.predict_on(index[exists], on_bad_image="skip")
    if len(dataset):
        outputs = predict_outputs(module, datamodule, cfg.device, cfg.precision, what="predict")
    else:
        outputs = {"image_id": torch.zeros(0, dtype=torch.long)}
    scored = image_table(dataset, outputs, module.selection_score, operating)
    skipped_log = out / "skipped_images.csv"
    reasons = pd.read_csv(skipped_log).set_index("path")["reason"] if skipped_log.is_file() else {}
    shown = index[["path", "image", "study", "body_part"]].rename(columns={"path": "file"})
    frame = shown.merge(scored.drop(columns=["path", "study", "body_part"]), on="file", how="left")
    frame = frame.rename(columns={"image": "path"})
    frame["error"] = [
        None
        if pd.notna(prob)
        else "file does not exist"
        if not ok
        else reasons.get(file, "not scored")
        for prob, ok, file in zip(frame["prob"], exists, frame["file"], strict=True)
    ]
    for column, wanted in (("overlay", cfg.overlays), ("heatmap", cfg.heatmaps)):
        if wanted:  # the file each scored image gets, relative to the output folder
            taken: set[str] = set()
            frame[column] = [
                f"{VISUALS[column]}/{overlay_name(p, taken)[:-4]}{SUFFIX[column]}"
                if pd.notna(prob)
                else None
                for p, prob in zip(frame["path"], frame["prob"], strict=True)
            ]
    with writing(out):
        if cfg.overlays or cfg.heatmaps:
            batches = heatmap_batches(module, dataset, cfg.batch_size, cfg.num_workers, cfg.device)
            write_visuals(frame, out, threshold, batches, dataset, cfg.overlays, cfg.heatmaps)
        studies = write_predictions(frame, out, threshold, cfg.study_aggregation)

    failed = int(frame["error"].notna().sum())
    called = int((studies["call"] == 1).sum())
    chosen = "given" if cfg.threshold is not None else f"the model's, {operating['rule']}"
    Console().print(
        f"{len(frame) - failed} of {len(frame)} files scored by {module.backbone_name} (stage "
        f"{module.stage}), "
        f"{failed} failed; {len(studies)} studies, {called} abnormal at threshold {threshold:.3f} "
        f"({chosen})"
        + (
            f"; probabilities calibrated at temperature {temperature:.3f}"
            if temperature != 1
            else ""
        )
        + (
            f"; studies by their images' {cfg.study_aggregation}"
            if cfg.study_aggregation != "mean"
            else ""
        )
        + ("; scores averaged with the mirrored image" if cfg.tta == "hflip" else "")
        + ". "
        f"Predictions in {out}"
    )
    if failed:
        raise UserError(
            f"{failed} of {len(frame)} files could not be scored: see the error column of "
            f"{out / IMAGES}"
        )
    return frame
