"""Synthetic MURA-v1.1 trees: radiograph-like images with small lesions and their ground-truth boxes.

The exact MURA layout and header-less CSVs, so the code that reads real MURA reads these unchanged.
`python -m kalm_lightning.data.synthetic --out DIR --studies N --seed S`
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kalm_lightning.data.blobs import Blobs, render_blob_view
from kalm_lightning.data.index import BODY_PARTS, MURA_DIR
from kalm_lightning.data.radiographs import (
    DEFAULT_LESIONS,
    LESION_KINDS,
    MODE_WEIGHTS,
    PNG_MODES,
    render_view,
    save_png,
)
from kalm_lightning.errors import UserError
from kalm_lightning.runs import write_atomic
from kalm_lightning.settings import blob_regime, check

# MURA v1.1 train studies per body part, for realistic proportions.
PART_WEIGHTS = np.array([1912, 2110, 1010, 2185, 727, 3015, 3697], dtype=float)


@dataclass
class SyntheticSettings:
    """Everything that determines a generated tree; stored beside it to detect a stale tree."""

    train_studies: int = 600
    valid_studies: int = 150
    seed: int = 0
    conspicuity: float = 1.0
    max_size: int = 512
    abnormal_rate: float = 0.4
    lesions: list[str] = field(default_factory=lambda: list(DEFAULT_LESIONS))
    layout_jitter: float = 0.0  # > 0: limbs shifted by up to this fraction of the image
    # The localizer study's regimes (data/blobs.py); cue=None: no blobs, the demo's drawing.
    cue: float | None = None  # contrast of the blob every view carries, in [0, 1]
    decoys: int = 0  # blobs besides the one that holds the lesion
    attribute: float = 0.0  # the lesion's blob is (1 + attribute) times as bright as a decoy
    blob_size: float = 0.3  # blob diameter, as a fraction of the shorter side
    texture_amplitude: float | None = None  # None: cut by headroom | a: held fixed as cue changes

    def blobs(self) -> Blobs | None:
        blob_regime(self.cue, self.decoys, self.attribute)
        if self.cue is None:
            return None
        for setting, value in (
            ("cue", self.cue),
            ("decoys", self.decoys),
            ("attribute", self.attribute),
            ("blob_size", self.blob_size),
            ("texture_amplitude", self.texture_amplitude),
        ):
            if value is not None:
                check(f"data.synthetic.{setting}", value)
        return Blobs(self.cue, self.decoys, self.attribute, self.blob_size, self.texture_amplitude)


@dataclass
class Study:
    split: str
    body_part: str
    patient: str
    number: int
    label: int
    views: int
    index: int

    @property
    def folder(self) -> str:
        outcome = "positive" if self.label else "negative"
        return (
            f"{MURA_DIR}/{self.split}/{self.body_part}/{self.patient}/study{self.number}_{outcome}/"
        )


def plan_studies(
    split: str, count: int, first_patient: int, abnormal_rate: float, rng: np.random.Generator
) -> list[Study]:
    """Patients with one to three studies each; study numbers restart per body part, as in MURA."""
    studies: list[Study] = []
    patient = first_patient
    while len(studies) < count:
        per_part: Counter[str] = Counter()
        for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
            if len(studies) == count:
                break
            part = BODY_PARTS[int(rng.choice(len(BODY_PARTS), p=PART_WEIGHTS / PART_WEIGHTS.sum()))]
            per_part[part] += 1
            views = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.3, 0.2]))
            label = int(rng.random() < abnormal_rate)
            studies.append(
                Study(
                    split, part, f"patient{patient:05d}", per_part[part], label, views, len(studies)
                )
            )
        patient += 1
    return studies


def _write_study(args: tuple[Path, Study, SyntheticSettings]) -> list[tuple[str, tuple | None]]:
    base, study, settings = args
    rng = np.random.default_rng([settings.seed, 0 if study.split == "train" else 1, study.index])
    folder = base / study.folder
    folder.mkdir(parents=True, exist_ok=True)
    lesioned = [study.label and (v == 0 or rng.random() < 0.7) for v in range(study.views)]
    rows = []
    for view in range(study.views):
        long_side = rng.uniform(0.6, 1.0) * settings.max_size
        aspect = rng.uniform(0.7, 1.0)
        h, w = (round(long_side), round(long_side * aspect))
        if rng.random() < 0.5:
            h, w = w, h
        kind = str(rng.choice(settings.lesions)) if lesioned[view] else None
        args = (study.body_part, h, w, kind, settings.conspicuity, rng, settings.layout_jitter)
        blobs = settings.blobs()
        pixels, box = render_view(*args) if blobs is None else render_blob_view(*args, blobs)
        mode = PNG_MODES[int(rng.choice(len(PNG_MODES), p=MODE_WEIGHTS))]
        name = f"{study.folder}image{view + 1}.png"
        save_png(pixels, base / name, mode)
        rows.append((name, box))
    return rows


def generate_synthetic_mura(
    out: str | Path, settings: SyntheticSettings, workers: int | None = None
) -> dict:
    """Write MURA-v1.1/ under out; returns the counts of studies and images per split and body part."""
    for kind in settings.lesions:
        if kind not in LESION_KINDS:
            raise UserError(f"synthetic lesion {kind!r} is not one of {', '.join(LESION_KINDS)}")
    settings.blobs()  # refuse bad regime settings before any file is written
    base = Path(out)
    (base / MURA_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(settings.seed)
    plans = {
        "train": plan_studies("train", settings.train_studies, 1, settings.abnormal_rate, rng),
        "valid": plan_studies("valid", settings.valid_studies, 90001, settings.abnormal_rate, rng),
    }
    counts: dict = {}
    boxes: list[tuple[str, tuple]] = []
    workers = workers or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        for split, studies in plans.items():
            results = list(
                pool.map(_write_study, [(base, s, settings) for s in studies], chunksize=8)
            )
            images = [row for rows in results for row in rows]
            boxes += [(name, box) for name, box in images if box is not None]
            with (base / MURA_DIR / f"{split}_image_paths.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows([name] for name, _ in images)
            with (base / MURA_DIR / f"{split}_labeled_studies.csv").open("w", newline="") as handle:
                csv.writer(handle).writerows([s.folder, s.label] for s in studies)
            counts[split] = {
                "studies": len(studies),
                "images": len(images),
                "abnormal_studies": sum(s.label for s in studies),
                "studies_by_body_part": dict(sorted(Counter(s.body_part for s in studies).items())),
            }
    with (base / MURA_DIR / "lesion_boxes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "x0", "y0", "x1", "y1"])
        writer.writerows([name, *box] for name, box in boxes)
    write_atomic(base / MURA_DIR / "synthetic.json", json.dumps(asdict(settings), indent=2))
    return counts


def ensure_synthetic_mura(root: str | Path, **settings) -> Path:
    """Generate the tree under root unless it is already there with the same settings."""
    wanted = SyntheticSettings(**settings)
    marker = Path(root) / MURA_DIR / "synthetic.json"
    if marker.is_file():
        # Settings added since a tree was made take their defaults, which it was made with.
        if {**asdict(SyntheticSettings()), **json.loads(marker.read_text())} == asdict(wanted):
            return Path(root)
        raise UserError(
            f"{marker.parent} was generated with other settings than data.synthetic asks for; "
            "choose another data.root or delete that folder"
        )
    if (Path(root) / MURA_DIR).exists():
        raise UserError(
            f"{Path(root) / MURA_DIR} exists but is not synthetic data made here; "
            "choose another data.root"
        )
    generate_synthetic_mura(root, wanted)
    return Path(root)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write MURA-v1.1/ into")
    parser.add_argument("--studies", type=int, default=600, help="training studies")
    parser.add_argument("--valid-studies", type=int, help="validation studies (default studies/4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--conspicuity", type=float, default=1.0, help="lesion contrast, 0.3 subtle"
    )
    parser.add_argument("--max-size", type=int, default=512, help="longest image side in pixels")
    parser.add_argument("--lesions", nargs="+", default=list(DEFAULT_LESIONS), choices=LESION_KINDS)
    parser.add_argument("--layout-jitter", type=float, default=0.0, help="limb shift, 0.25 spreads")
    parser.add_argument("--cue", type=float, help="contrast of a blob in every view (0-1)")
    parser.add_argument("--decoys", type=int, default=0, help="decoy blobs per view (with --cue)")
    parser.add_argument("--attribute", type=float, default=0.0, help="lesion blob's extra contrast")
    parser.add_argument("--blob-size", type=float, default=0.3, help="blob diameter / short side")
    parser.add_argument(
        "--texture-amplitude", type=float, help="texture amplitude held fixed as --cue changes"
    )
    args = parser.parse_args(argv)
    if (Path(args.out) / MURA_DIR).exists():
        parser.exit(2, f"{Path(args.out) / MURA_DIR} exists already: choose another --out\n")
    settings = SyntheticSettings(
        args.studies,
        args.valid_studies or max(1, args.studies // 4),
        args.seed,
        args.conspicuity,
        args.max_size,
        lesions=args.lesions,
        layout_jitter=args.layout_jitter,
        cue=args.cue,
        decoys=args.decoys,
        attribute=args.attribute,
        blob_size=args.blob_size,
        texture_amplitude=args.texture_amplitude,
    )
    print(json.dumps(generate_synthetic_mura(args.out, settings), indent=2))


if __name__ == "__main__":
    main()
