"""Can a scout find the lesion on its own? The K-window readers' scout trained alone, in seconds.

    python -m experiments.localizers.scout_lab --regime c0.5-d3 [--scout local group] \\
        [--lr 1e-3 3e-3] [--init-seeds 0 1 2] [--data-seed 100] [--epochs 5]

The scout (`models/localizers/scout.py`) of `localizer=multicrop` learns from the image label
alone, through top-t% pooling of its map; its windows never feed its own loss. So it can be
trained here without CNN_l: on a regime of study 3 at the study's sizes (one seed's data, drawn as
the study draws it), batch 8, Adam with lr / 10 after epoch 3, as in the study's schedule. Each
run prints one JSON line: the scout's image AUROC (the top-t% logit) on that seed's MURA valid
views, and the share of lesioned views whose lesion centre lies inside its best window, either
of its 2 best and any of its 4 best disjoint windows (the study's 7 x 7 grid of half 0.25).
The default data seed, 100, is the pilots' (`pilot3.py`): no study run uses it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from experiments.localizers import study3
from experiments.localizers.pilot3 import PILOT_SEED
from kalm_lightning.data.dataset import MURADataset
from kalm_lightning.data.geometry import box_to_pixels
from kalm_lightning.data.index import read_lesion_boxes
from kalm_lightning.data.mura import read_mura_index
from kalm_lightning.data.synthetic import ensure_synthetic_mura
from kalm_lightning.evaluation.localization import inside
from kalm_lightning.models.localizers.base import LocalizerInputs
from kalm_lightning.models.localizers.multicrop import MultiCrop, top_pooling


def views(
    root: Path, split: str, size: int, lesioned: int | None = None, preprocessing=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A split's images [N, 3, size, size] as the stages see them, labels [N] and lesion centres
    [N, 2] in the images' pixels (NaN where a view has no lesion). lesioned: only the first that
    many views with a lesion; preprocessing: a checkpoint's (its resize and normalisation; by
    default the stages' defaults)."""
    index = read_mura_index(root, split)
    boxes = read_lesion_boxes(root).set_index("path")
    if lesioned is not None:
        index = index[index["path"].isin(boxes.index)].head(lesioned).reset_index(drop=True)
    given = (
        {}
        if preprocessing is None
        else {"resize": preprocessing.resize, "mean": preprocessing.mean, "std": preprocessing.std}
    )
    dataset = MURADataset(index, source_size=size, **given)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    centres = torch.full((len(index), 2), float("nan"))
    for i, path in enumerate(index["path"]):
        if path in boxes.index:
            height, width = dataset.original_size(i)
            x0, y0, x1, y1 = boxes.loc[path, ["x0", "y0", "x1", "y1"]]
            centres[i] = torch.tensor([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height]) * size
    return images, torch.as_tensor(index["label"].to_numpy()), centres


def hits(
    scout: MultiCrop, saliency: torch.Tensor, centres: torch.Tensor, size: int, k: int
) -> float:
    """The share of lesioned views (centres in pixels of size x size images) whose lesion centre
    lies inside any of the scout's k best windows of this map (its greedy choice: the first k of
    its `k`)."""
    windows = box_to_pixels(scout.windows_of(saliency)[:, :k], size)
    lesioned = ~centres[:, 0].isnan()
    points = centres[lesioned].repeat_interleave(k, 0).numpy()
    found = inside(windows[lesioned].flatten(0, 1).numpy(), points).reshape(-1, k).any(1)
    return float(found.mean())


def inputs(images: torch.Tensor, labels: torch.Tensor | None = None) -> LocalizerInputs:
    """What the scout reads: the source images (and the labels it learns from); no CNN_g."""
    return LocalizerInputs(None, None, None, images, labels=labels)


def train(data: tuple, kind: str, lr: float, seed: int, epochs: int, heads: int) -> MultiCrop:
    """`localizer=multicrop` with the study's windows (4 of a 7 x 7 grid of half 0.25), its
    scout trained through its own `training_crops` loss; its `head_loss` holds each head's
    running loss."""
    images, labels, _ = data
    torch.manual_seed(seed)
    scout = MultiCrop(1, 1, 1, k=4, half=0.25, grid=7, scout=kind, heads=heads)
    optimizer = torch.optim.Adam(scout.head.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr / 10 if epoch >= 3 else lr  # the study's milestone
        perm = torch.randperm(len(images), generator=order)
        for start in range(0, len(images) - 7, 8):
            batch = perm[start : start + 8]
            loss = scout.training_crops(inputs(images[batch], labels[batch]), None, epoch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return scout.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", default="c0.5-d3", help="a regime name of study3.REGIMES")
    parser.add_argument("--data-seed", type=int, default=PILOT_SEED)
    parser.add_argument("--scout", nargs="+", default=["local"], help="local and/or group")
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3])
    parser.add_argument("--init-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--heads", type=int, default=1, help="scouts trained side by side")
    parser.add_argument("--work", type=Path, default=Path("outputs/scout-lab"))
    args = parser.parse_args(argv)
    regime = next(g for g in study3.REGIMES if g.name == args.regime)
    runner = study3.Study3(args.work.resolve(), args.work.resolve(), False, None)
    cfg = runner.config(regime, args.data_seed, 1, ())
    root = Path(cfg.data.root)
    ensure_synthetic_mura(root, **OmegaConf.to_container(cfg.data.synthetic, resolve=True))
    size = int(cfg.data.source_size)
    train_views, valid = views(root, "train", size), views(root, "valid", size)
    for kind in args.scout:
        for lr in args.lr:
            for seed in args.init_seeds:
                start = time.perf_counter()
                scout = train(train_views, kind, lr, seed, args.epochs, args.heads)
                with torch.no_grad():
                    maps = torch.cat([scout.maps(inputs(chunk)) for chunk in valid[0].split(32)])
                seconds = round(time.perf_counter() - start)
                running = scout.head_loss
                for head in range(args.heads):
                    auroc = roc_auc_score(valid[1], top_pooling(maps[:, head].flatten(1), scout.t))
                    row = {"regime": regime.name, "data_seed": args.data_seed, "scout": kind}
                    row |= {"lr": lr, "init_seed": seed, "head": head}
                    row |= {"chosen": head == int(scout.best_head())}
                    row |= {"running_loss": round(float(running[head]), 4)}
                    row |= {"image_auroc": round(float(auroc), 3)}
                    row |= {
                        f"hits_{k}": round(hits(scout, maps[:, head], valid[2], size, k), 3)
                        for k in (1, 2, 4)
                    }
                    row["seconds"] = seconds
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
