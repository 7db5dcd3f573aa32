"""MURA v1.1's layout and index: the folders, the header-less CSVs, and one row per image."""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from kalm_lightning.errors import UserError, check_choice
from kalm_lightning.settings import check

log = logging.getLogger(__name__)

MURA_DIR = "MURA-v1.1"
SPLITS = ("train", "valid")
BODY_PARTS = (
    "XR_ELBOW",
    "XR_FINGER",
    "XR_FOREARM",
    "XR_HAND",
    "XR_HUMERUS",
    "XR_SHOULDER",
    "XR_WRIST",
)


def mura_base(root: str | Path) -> Path:
    """The folder above MURA-v1.1/, whether root names that folder or MURA-v1.1/ itself."""
    root = Path(root).expanduser().resolve()
    if (root / MURA_DIR).is_dir():
        return root
    if root.name == MURA_DIR and root.is_dir():
        return root.parent
    raise UserError(
        f"data.root={root} holds no {MURA_DIR}/ folder: point data.root at the folder that "
        f"contains {MURA_DIR}/ (or at {MURA_DIR}/ itself)"
    )


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path} is missing: is data.root the MURA v1.1 folder?")
    # MURA's CSVs have no header: reading one would silently drop the first row.
    frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    if frame.shape[1] != len(columns):
        raise UserError(
            f"{path}: expected {len(columns)} column(s) without a header, found {frame.shape[1]}"
        )
    frame.columns = columns
    return frame


def _first_bad(csv_path: Path, frame: pd.DataFrame, bad: pd.Series, why: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{csv_path} row {row + 1}: {why}: {frame.iloc[row].tolist()[0]!r}")


def read_mura_index(root: str | Path, split: str, on_missing: str = "error") -> pd.DataFrame:
    """One row per image of a split: absolute path, study key, patient, body part, label (1 = abnormal)."""
    check_choice("split", split, SPLITS)
    check("data.on_missing", on_missing)
    base = mura_base(root)
    images_csv = base / MURA_DIR / f"{split}_image_paths.csv"
    studies_csv = base / MURA_DIR / f"{split}_labeled_studies.csv"
    images = _read_csv(images_csv, ["image"])
    studies = _read_csv(studies_csv, ["study", "label"])

    prefix = f"{MURA_DIR}/{split}/"
    for csv_path, frame, column in ((images_csv, images, "image"), (studies_csv, studies, "study")):
        paths = frame[column].str.strip()
        frame[column] = paths
        escapes = paths.map(lambda p: p.startswith(("/", "\\")) or ".." in PurePosixPath(p).parts)
        _first_bad(csv_path, frame, escapes, "path escapes the dataset root")
        _first_bad(
            csv_path, frame, ~paths.str.startswith(prefix), f"path does not start with {prefix}"
        )

    studies["study"] = studies["study"].map(lambda s: s if s.endswith("/") else s + "/")
    _first_bad(studies_csv, studies, ~studies["label"].isin(["0", "1"]), "label is not 0 or 1")
    studies["label"] = studies["label"].astype(int)
    folder = studies["study"].str.rstrip("/").str.rsplit("/", n=1).str[-1]
    from_name = folder.map(
        lambda f: 1 if f.endswith("_positive") else 0 if f.endswith("_negative") else -1
    )
    _first_bad(
        studies_csv,
        studies,
        (from_name >= 0) & (from_name != studies["label"]),
        "label contradicts the study folder name",
    )
    _first_bad(studies_csv, studies, studies["study"].duplicated(), "study listed twice")

    parts = images["image"].str.split("/")
    _first_bad(
        images_csv,
        images,
        parts.str.len() != 6,
        "expected MURA-v1.1/<split>/<body part>/<patient>/<study>/<image>",
    )
    index = pd.DataFrame(
        {
            "path": [str(base / p) for p in images["image"]],
            "image": images["image"],
            "study": parts.str[:5].str.join("/") + "/",
            "patient": parts.str[3],
            "body_part": parts.str[2],
        }
    )
    labels = dict(zip(studies["study"], studies["label"], strict=True))
    index["label"] = index["study"].map(labels)
    _first_bad(
        images_csv, images, index["label"].isna(), f"image's study is not in {studies_csv.name}"
    )
    index["label"] = index["label"].astype(int)

    missing = ~index["path"].map(os.path.isfile)
    if missing.any():
        shown = ", ".join(index.loc[missing, "image"].head(3))
        message = (
            f"{int(missing.sum())} image(s) listed in {images_csv} are missing on disk: {shown}"
        )
        if on_missing == "error":
            raise UserError(f"{message}; restore them, or set data.on_missing=skip")
        log.warning("%s; skipped (data.on_missing=skip)", message)
        index = index[~missing].reset_index(drop=True)
    return index


def read_lesion_boxes(root: str | Path) -> pd.DataFrame | None:
    """Ground-truth lesion boxes (synthetic data only; real MURA has none): path -> x0, y0, x1, y1."""
    path = mura_base(root) / MURA_DIR / "lesion_boxes.csv"
    if not path.is_file():
        return None
    boxes = pd.read_csv(path)
    boxes["path"] = [str(mura_base(root) / p) for p in boxes["image"]]
    return boxes


def patient_holdout(
    index: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split an index so that no patient has images on both sides."""
    patients = index["patient"].unique()
    rng = np.random.default_rng(seed)
    held = set(rng.choice(patients, size=max(1, round(fraction * len(patients))), replace=False))
    return patient_split(index, held)


def patient_split(
    index: pd.DataFrame, held: set[str] | list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rest, the images of the `held` patients): a hold-out given by its patients."""
    mask = index["patient"].isin(set(held))
    return index[~mask].reset_index(drop=True), index[mask].reset_index(drop=True)
