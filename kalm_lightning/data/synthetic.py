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
from PIL import Image

from kalm_lightning.data.mura import BODY_PARTS, MURA_DIR
from kalm_lightning.errors import UserError

# MURA v1.1 train studies per body part, for realistic proportions.
PART_WEIGHTS = np.array([1912, 2110, 1010, 2185, 727, 3015, 3697], dtype=float)
PNG_MODES = ("L", "RGB", "I;16", "LA", "P")
MODE_WEIGHTS = np.array([0.78, 0.1, 0.06, 0.03, 0.03])
LESION_KINDS = ("implant", "fracture")


@dataclass
class SyntheticSettings:
    """Everything that determines a generated tree; stored beside it to detect a stale tree."""

    train_studies: int = 600
    valid_studies: int = 150
    seed: int = 0
    conspicuity: float = 1.0
    max_size: int = 512
    abnormal_rate: float = 0.4
    lesions: list[str] = field(default_factory=lambda: list(LESION_KINDS))


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
        return f"{MURA_DIR}/{self.split}/{self.body_part}/{self.patient}/study{self.number}_{outcome}/"


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
            studies.append(Study(split, part, f"patient{patient:05d}", per_part[part], label, views,
                                 len(studies)))
        patient += 1
    return studies


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _bone_layout(part: str, h: int, w: int, rng: np.random.Generator) -> list[tuple]:
    """(start, end, radius) segments in pixels, roughly shaped like the body part."""
    s = min(h, w)
    jitter = lambda: rng.normal(0, 0.03 * s, 2)  # noqa: E731
    top, bottom = np.array([0.05 * h, w / 2]), np.array([0.95 * h, w / 2])
    if part in ("XR_HUMERUS", "XR_FOREARM"):
        n = 1 if part == "XR_HUMERUS" else 2
        offsets = np.linspace(-0.15, 0.15, n) * w if n > 1 else [0.0]
        return [(top + [0, o] + jitter(), bottom + [0, o] + jitter(), s * rng.uniform(0.06, 0.1))
                for o in offsets]
    if part in ("XR_FINGER", "XR_HAND"):
        fingers = 1 if part == "XR_FINGER" else 4
        bones = []
        for f in range(fingers):
            x = w * (0.5 if fingers == 1 else 0.2 + 0.6 * f / (fingers - 1))
            joints = np.linspace(0.08 * h, 0.92 * h, 4)
            for a, b in zip(joints[:-1], joints[1:], strict=True):
                bones.append((np.array([a, x]) + jitter(), np.array([b - 0.02 * h, x]) + jitter(),
                              s * rng.uniform(0.04, 0.07)))
        return bones
    if part == "XR_ELBOW":
        joint = np.array([0.5 * h, 0.5 * w]) + jitter()
        return [(np.array([0.05 * h, 0.35 * w]), joint, s * 0.09),
                (joint + [0.03 * h, 0], np.array([0.95 * h, 0.7 * w]), s * 0.07)]
    if part == "XR_SHOULDER":
        head = np.array([0.35 * h, 0.45 * w]) + jitter()
        return [(head, head + [0.01, 0.01], s * 0.18), (head, np.array([0.98 * h, 0.55 * w]), s * 0.09),
                (np.array([0.1 * h, 0.05 * w]), np.array([0.25 * h, 0.95 * w]), s * 0.04)]
    # XR_WRIST: radius, ulna and a row of carpal bones.
    bones = [(np.array([0.55 * h, x * w]) + jitter(), np.array([0.98 * h, x * w]) + jitter(), s * 0.07)
             for x in (0.38, 0.62)]
    for x in np.linspace(0.3, 0.7, 4):
        centre = np.array([0.42 * h, x * w]) + jitter()
        bones.append((centre, centre + [0.01, 0.01], s * 0.05))
    return bones


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((w, h), Image.BICUBIC))


def render_view(part: str, h: int, w: int, lesion: str | None, conspicuity: float,
                rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """One radiograph as uint8 [h, w] and its lesion box (x0, y0, x1, y1) when it has a lesion."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = 0.06 + 0.05 * _smooth_noise(h, w, 4, rng)
    bones = _bone_layout(part, h, w, rng)
    texture = _smooth_noise(h, w, 24, rng)
    tissue, bone = np.zeros_like(image), np.zeros_like(image)
    for p0, p1, radius in bones:
        d = _segment_distance(yy, xx, np.asarray(p0, np.float32), np.asarray(p1, np.float32))
        np.maximum(tissue, 0.12 * np.clip(1 - d / (radius * 2.2), 0, 1) ** 0.5, out=tissue)
        cortex = np.exp(-(((d - 0.85 * radius) / (0.15 * radius)) ** 2))
        np.maximum(bone, (d < radius) * (0.25 + 0.12 * texture + 0.18 * cortex), out=bone)
    # Overlapping bones take the brighter one, so only lesions stand out as extra-bright spots.
    image += tissue + bone
    box = None
    if lesion is not None:
        p0, p1, radius = bones[int(rng.integers(len(bones)))]
        t = rng.uniform(0.25, 0.75)
        cy, cx = np.asarray(p0) + t * (np.asarray(p1) - np.asarray(p0))
        side = np.sqrt(rng.uniform(0.01, 0.03) * h * w)
        if lesion == "implant":
            r = side / 2
            mask = np.clip(r - np.hypot(yy - cy, xx - cx), 0, 1)
            image += conspicuity * 0.55 * mask
        else:
            axis = np.asarray(p1, float) - np.asarray(p0, float)
            normal = np.array([-axis[1], axis[0]]) / max(np.linalg.norm(axis), 1e-9)
            half = max(radius * 1.3, side / 2)
            ends = (np.array([cy, cx]) - half * normal, np.array([cy, cx]) + half * normal)
            d = _segment_distance(yy, xx, ends[0].astype(np.float32), ends[1].astype(np.float32))
            mask = np.clip(1.5 + 0.004 * side - d, 0, 1)
            image -= conspicuity * 0.45 * mask * (image > 0.3)
            r = half
        y0, y1 = max(0, int(cy - r - 2)), min(h, int(np.ceil(cy + r + 2)))
        x0, x1 = max(0, int(cx - r - 2)), min(w, int(np.ceil(cx + r + 2)))
        box = (x0, y0, x1, y1)
    image += rng.normal(0, 0.025, (h, w))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), box


def save_png(pixels: np.ndarray, path: Path, mode: str) -> None:
    """Write 8-bit greyscale pixels in one of the PNG modes MURA-like data arrives in."""
    image = Image.fromarray(pixels, mode="L")
    if mode == "RGB":
        image = image.convert("RGB")
    elif mode == "LA":
        image = Image.merge("LA", (image, Image.new("L", image.size, 255)))
    elif mode == "P":
        image = image.convert("P")
    elif mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257)
    image.save(path)


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
        pixels, box = render_view(study.body_part, h, w, kind, settings.conspicuity, rng)
        mode = PNG_MODES[int(rng.choice(len(PNG_MODES), p=MODE_WEIGHTS))]
        name = f"{study.folder}image{view + 1}.png"
        save_png(pixels, base / name, mode)
        rows.append((name, box))
    return rows


def generate_synthetic_mura(out: str | Path, settings: SyntheticSettings, workers: int | None = None) -> dict:
    """Write MURA-v1.1/ under out; returns the counts of studies and images per split and body part."""
    for kind in settings.lesions:
        if kind not in LESION_KINDS:
            raise UserError(f"synthetic lesion {kind!r} is not one of {', '.join(LESION_KINDS)}")
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
            results = list(pool.map(_write_study, [(base, s, settings) for s in studies], chunksize=8))
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
    (base / MURA_DIR / "synthetic.json").write_text(json.dumps(asdict(settings), indent=2))
    return counts


def ensure_synthetic_mura(root: str | Path, **settings) -> Path:
    """Generate the tree under root unless it is already there with the same settings."""
    wanted = SyntheticSettings(**settings)
    marker = Path(root) / MURA_DIR / "synthetic.json"
    if marker.is_file():
        if json.loads(marker.read_text()) == asdict(wanted):
            return Path(root)
        raise UserError(
            f"{marker.parent} was generated with other settings than data.synthetic asks for; "
            "choose another data.root or delete that folder"
        )
    if (Path(root) / MURA_DIR).exists():
        raise UserError(f"{Path(root) / MURA_DIR} exists but is not synthetic data made here; "
                        "choose another data.root")
    generate_synthetic_mura(root, wanted)
    return Path(root)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write MURA-v1.1/ into")
    parser.add_argument("--studies", type=int, default=600, help="training studies")
    parser.add_argument("--valid-studies", type=int, help="validation studies (default studies/4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conspicuity", type=float, default=1.0, help="lesion contrast, 0.3 subtle")
    parser.add_argument("--max-size", type=int, default=512, help="longest image side in pixels")
    parser.add_argument("--lesions", nargs="+", default=list(LESION_KINDS), choices=LESION_KINDS)
    args = parser.parse_args(argv)
    if (Path(args.out) / MURA_DIR).exists():
        parser.exit(2, f"{Path(args.out) / MURA_DIR} exists already: choose another --out\n")
    settings = SyntheticSettings(args.studies, args.valid_studies or max(1, args.studies // 4),
                                 args.seed, args.conspicuity, args.max_size, lesions=args.lesions)
    print(json.dumps(generate_synthetic_mura(args.out, settings), indent=2))


if __name__ == "__main__":
    main()
