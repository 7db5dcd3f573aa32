"""Where each row's box sits in the views without a lesion, and how CNN_l scores what it sees
there: the study's records say how often a box holds the lesion; this says what it looks at
otherwise, and whether CNN_l can tell the lesion's blob from a decoy once it looks at a blob.

    python -m experiments.localizers.views --work /work/study-work --regime c1 --seed 2

For one regime and seed whose runs are in the work folder (each run's predictions_images.csv on
valid), the seed's data is drawn again with cue 0 and no lesions, with the same random draws:
the difference between the two is the blobs alone, so every valid view's blob centres are known.
Per row it prints, for the views without a lesion (those of normal studies and the unlesioned
views of abnormal ones), the share whose box holds a blob centre (a decoy) and CNN_l's mean
p(abnormal) on those and on the rest; for the lesioned views, the share whose box holds the
lesion's centre and CNN_l's mean p(abnormal) on hits and misses; and the AUROC with which CNN_l's
p(abnormal) tells a lesion's blob from a decoy among the views whose box holds a blob centre.
Valid only reports: nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from scipy import ndimage
from torchmetrics.functional.classification import binary_auroc

from experiments.localizers.plan import REGIMES, SWEEP_CUES, best_navigator, sweep_regime
from experiments.localizers.runner import Study
from kalm_lightning.data.blobs import BLOB_CONTRAST
from kalm_lightning.data.geometry import LESION_BOX, PIXEL_BOX
from kalm_lightning.data.images import load_grayscale
from kalm_lightning.data.index import read_lesion_boxes, read_mura_index
from kalm_lightning.data.synthetic import SyntheticSettings, ensure_synthetic_mura
from kalm_lightning.evaluation.localization import hits, inside
from kalm_lightning.runs import Run

HERE = Path(__file__).resolve().parent


def blob_centres(root: Path, twin: Path, images: list[str], cue: float) -> dict[str, np.ndarray]:
    """Each view's blob centres (x, y) in its pixels: where it is brighter than its twin drawn
    without blobs by more than half the blobs' contrast (blobs that touch count as one)."""
    centres = {}
    for image in images:
        lift = (load_grayscale(root / image).astype(float) - load_grayscale(twin / image)) / 255
        mask = lift > 0.5 * cue * BLOB_CONTRAST
        labels, count = ndimage.label(mask)
        yx = ndimage.center_of_mass(mask, labels, range(1, count + 1))
        centres[image] = np.array([(x, y) for y, x in yx]).reshape(-1, 2)
    return centres


def holds(box: np.ndarray, points: np.ndarray) -> bool:
    """Whether the box holds any of the points, by the rule of a hit."""
    return bool(inside(np.broadcast_to(box, (len(points), 4)), points).any())


def predictions_of(run_dir: Path) -> pd.DataFrame | None:
    """A run's image predictions on valid (the MIL ceiling is evaluated into its folder itself)."""
    for folder in (Run(run_dir).evaluation, run_dir):
        if (folder / "predictions_images.csv").is_file():
            return pd.read_csv(folder / "predictions_images.csv")
    return None


def mean_of(values: pd.Series) -> str:
    return f"{values.mean():.2f}" if len(values) else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("outputs/localizers"), help="data, runs")
    parser.add_argument("--regime", required=True, help="a regime's name, as in results/")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--out", type=Path, default=HERE, help="the study's results/ folder's parent"
    )
    parser.add_argument("--quick", action="store_true", help="a study run with --quick")
    args = parser.parse_args(argv)
    study = Study(args.out.resolve(), args.work.resolve(), args.quick, None)
    regimes = {r.name: r for r in [*REGIMES, *(sweep_regime(c) for c in SWEEP_CUES)]}
    if args.regime not in regimes:
        sys.exit(f"--regime {args.regime}: not one of {', '.join(regimes)}")
    regime = regimes[args.regime]
    if regime.cue == 0:
        sys.exit(f"--regime {args.regime}: its views carry no blob to look at (cue 0)")
    cfg = study.config(regime, args.seed, 1, ())
    root = Path(cfg.data.root)
    if not root.is_dir():
        sys.exit(
            f"{root}: no data of regime {regime.name} seed {args.seed} in --work; run the study"
        )
    settings = SyntheticSettings(**OmegaConf.to_container(cfg.data.synthetic))
    twin = root.with_name(root.name + "-no-blobs")
    ensure_synthetic_mura(twin, **asdict(replace(settings, cue=0.0, conspicuity=0.0)))
    index = read_mura_index(root, "valid")
    lesions = read_lesion_boxes(root).set_index("path").reindex(index["path"]).dropna()
    centres = blob_centres(root, twin, list(index["image"]), regime.cue)
    print(f"{regime.label}, seed {args.seed}: {len(index)} valid views, {len(lesions)} lesioned")
    print()
    print(
        "| row | unlesioned views: box on a blob | p_l there / elsewhere | lesioned views: hit "
        "| p_l hit / miss | p_l tells lesion from decoy, boxes on blobs (AUROC) |"
    )
    print("|---|---|---|---|---|---|")
    best = best_navigator(study, args.quick)
    for row in regime.rows(best):
        frame = predictions_of(study.run_dir(regime, row, args.seed))
        if frame is None or not set(PIXEL_BOX) <= set(frame.columns):
            continue  # not run here, or no box (a global CNN)
        # `path` as MURA lists it (the prediction table); absolute in runs of earlier versions
        key = "path" if frame["path"].str.startswith("/").all() else "image"
        frame = frame.rename(columns={"path": key}).merge(index[["path", "image"]], on=key)
        lesioned = frame["path"].isin(lesions.index)
        boxes = frame[PIXEL_BOX].to_numpy(float)
        on_blob = np.array(
            [holds(b, centres[i]) for b, i in zip(boxes, frame["image"], strict=True)]
        )
        truth = lesions.reindex(frame["path"])[LESION_BOX].to_numpy(float)
        hit = hits(boxes, truth) & lesioned  # NaN boxes of unlesioned views hit nothing
        p = frame["prob_local"]
        looked = (lesioned & hit) | (~lesioned & on_blob)  # the box holds a blob centre
        auroc = (
            float(
                binary_auroc(
                    torch.tensor(p[looked].to_numpy()), torch.tensor(lesioned[looked].to_numpy())
                )
            )
            if lesioned[looked].nunique() == 2
            else None
        )
        print(
            f"| {row.name} | {on_blob[~lesioned].mean():.1%} "
            f"| {mean_of(p[~lesioned & on_blob])} / {mean_of(p[~lesioned & ~on_blob])} "
            f"| {hit[lesioned].mean():.1%} | {mean_of(p[hit])} / {mean_of(p[lesioned & ~hit])} "
            f"| {'-' if auroc is None else f'{auroc:.3f}'} |"
        )


if __name__ == "__main__":
    main()
