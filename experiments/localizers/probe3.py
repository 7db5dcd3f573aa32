"""Study 3's navigator or attention-sampling row with one thing changed, on one regime and seed:
why does the row miss the lesion where it does?

    python -m experiments.localizers.probe3 --row navigator --variant from-crops --work WORK [--seed 0]
    python -m experiments.localizers.probe3 --row sampling --variant cnn-l-from-k-crops --seed 1 --work WORK
    python -m experiments.localizers.probe3 --row sampling --epochs --work WORK   # a table, per epoch
    python -m experiments.localizers.probe3 --row sampling --signal --regime R --seed S --work WORK

Navigator variants: `from-crops`: taught by CNN_l's own training crops (`localizer.teacher_from=
crops`, one crop per image), so the teacher sees the anchors exactly as CNN_l's crops do;
`teacher-at-crops-scale`: the teacher's pass over the source resized to the crops' scale
(`localizer.teacher_size=crops`); `cnn-l-from-k-crops-no-warm-up`: the next without the warm-up
epoch on random anchors. Both rows: `cnn-l-from-k-crops`: the study's row, its CNN_l started as
the CNN_l of the same regime and seed's "K crops by attention, K = 4" run (`stage.local_init=`
that run's checkpoint; `multicrop-k4` in the record's overrides), which found the lesion: does the
row find it when CNN_l already knows the lesion? Sampling: `entropy-0.1`: ten times the
attention's entropy bonus, so that the attention stays spread longer while CNN_l learns. The
study's runner at the study's sizes, schedule and selection; the seed's stage 1 is the study's
(its record copied, its checkpoint in WORK, the study's work folder). Records in
study3/ROW-probe/results, one per run, written atomically. `--epochs`: the attention's entropy
and CNN_l's study AUROC on the hold-out, epoch by epoch, of every run of the row (the study's and
the probe's) that WORK holds, from the runs' CSV logs. `--signal`: the study's run of the row on
that regime and seed, its kept checkpoint, on the first 200 lesioned training views of its data:
the attention's mass on the anchors that hold the lesion centre (against their share of the
anchors), and CNN_l's p(abnormal) of every anchor's crop. Does CNN_l score a window on the lesion
above the window the attention puts first? If so, what the estimator learns from would draw the
attention to the lesion, could it sample there.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import torch

from experiments.localizers.plan import Row
from experiments.localizers.runner import run_name
from experiments.localizers.scout_lab import views
from experiments.localizers.study3 import (
    GLOBAL_INPUT,
    MULTICROP,
    NAVIGATOR,
    OUT,
    REGIMES,
    SAMPLING,
    Study3,
)
from kalm_lightning.data.geometry import box_to_pixels
from kalm_lightning.evaluation.localization import inside
from kalm_lightning.stages.loading import load_stage

FROM_K_CROPS = "stage.local_init=multicrop-k4"  # the K = 4 run's checkpoint, found at run time
ROWS = {"navigator": NAVIGATOR, "sampling": SAMPLING}
VARIANTS = {  # per row: a variant's overrides over the study's row
    "navigator": {
        "from-crops": ("localizer.teacher_from=crops", "localizer.train_crops=1"),
        "teacher-at-crops-scale": ("localizer.teacher_size=crops",),
        "cnn-l-from-k-crops": (FROM_K_CROPS,),
        "cnn-l-from-k-crops-no-warm-up": (FROM_K_CROPS, "localizer.warmup_epochs=0"),
    },
    "sampling": {
        "cnn-l-from-k-crops": (FROM_K_CROPS,),
        "entropy-0.1": ("localizer.entropy=0.1",),
    },
}


class Probe(Study3):
    """Study 3's runner, with `FROM_K_CROPS` in a row's overrides made the path of the K = 4
    run's checkpoint (`local`)."""

    local: str | None = None

    def stage2_overrides(self, row: Row, *extra: str) -> tuple[str, ...]:
        overrides = super().stage2_overrides(row, *extra)
        given = f"stage.local_init='{self.local}'"
        return tuple(given if o == FROM_K_CROPS else o for o in overrides)


EPOCHS = {"train/attention_entropy": "attention entropy", "val/local/study_auroc": "CNN_l's AUROC"}


def epochs_table(work: Path, row: Row) -> str:
    """A markdown table, per run of `row` in `work` (the study's and its probe variants), of
    `EPOCHS` epoch by epoch (the hold-out's AUROC: the validation of each epoch)."""
    lines = ["| regime | seed | run | " + " | ".join(EPOCHS.values()) + " |", "|---" * 5 + "|"]
    for regime in REGIMES:
        for log in sorted(
            (work / "runs" / regime.name).glob(f"seed*/{run_name(row)}*/csv/*/*.csv")
        ):
            run = log.parents[2]
            means = pd.read_csv(log).reindex(columns=["epoch", *EPOCHS]).groupby("epoch").mean()
            cells = [", ".join(f"{v:.2f}" for v in means[k]) for k in EPOCHS]
            lines.append(
                f"| {regime.name} | {run.parent.name[4:]} | {run.name} | {' | '.join(cells)} |"
            )
    return "\n".join(lines)


def signal(work: Path, regime, seed: int, row: Row, most: int = 200) -> dict[str, float]:
    """`--signal`'s figures for the study's run of `row` (its kept checkpoint)."""
    run = work / "runs" / regime.name / f"seed{seed}" / run_name(row)
    stage = load_stage(str(next((run / "checkpoints").glob("best-*.ckpt"))))
    net, size = stage.net, stage.preprocessing.source_size
    root = work / "data" / f"{regime.name}-seed{seed}"
    images, _, centres = views(
        root, "train", size, lesioned=most, preprocessing=stage.preprocessing
    )
    anchors = net.localizer.anchors
    pixels = box_to_pixels(anchors, size).numpy()
    points = centres.repeat_interleave(len(anchors), 0).numpy()
    held = inside(pixels[None].repeat(len(centres), 0).reshape(-1, 4), points)
    holds = torch.from_numpy(held).view(len(centres), -1).float()  # [N, A]: anchors on each lesion
    found = holds.any(dim=1)  # a centre on the image's very edge may lie in no anchor
    images, holds = images[found], holds[found]
    attention, scores = [], []
    with torch.no_grad():
        for batch in images.split(16):
            attention.append(net.localizer.attention(net.inputs(batch)))
            scores.append(net.crop_scores(batch, anchors.expand(len(batch), -1, -1)))
    attention, scores = torch.cat(attention), torch.cat(scores)
    top = scores.gather(1, attention.argmax(dim=1, keepdim=True)).squeeze(1)
    on_lesion = (scores * holds - (1 - holds)).amax(dim=1)  # the best window on the lesion
    return {
        "views": len(images),
        "attention on the lesion's anchors": float((attention * holds).sum(1).mean()),
        "their share of the anchors": float(holds.mean()),
        "CNN_l, best window on the lesion": float(on_lesion.mean()),
        "CNN_l, the attention's first window": float(top.mean()),
        "views where CNN_l scores the lesion above it": float((on_lesion > top).float().mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", choices=sorted(ROWS), default="navigator")
    parser.add_argument("--variant", help="one of the row's: see the docstring")
    parser.add_argument("--epochs", action="store_true", help="print the row's runs per epoch")
    parser.add_argument("--signal", action="store_true", help="what the row's run attends to")
    parser.add_argument("--work", type=Path, required=True, help="the study's data and runs")
    parser.add_argument("--regime", default=REGIMES[0].name, choices=[r.name for r in REGIMES])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs:
        print(epochs_table(args.work, ROWS[args.row]))
        return
    regime = next(r for r in REGIMES if r.name == args.regime)
    if args.signal:
        if args.row != "sampling":
            parser.error("--signal reads the attention of the sampling row: give --row sampling")
        figures = signal(args.work, regime, args.seed, ROWS[args.row])
        print(json.dumps({"regime": regime.name, "seed": args.seed, **figures}))
        return
    variants = VARIANTS[args.row]
    if args.variant is None:
        parser.error("give --variant (a run), --epochs or --signal (readings of the study's runs)")
    if args.variant not in variants:
        parser.error(f"--variant {args.variant}: the {args.row} row has {', '.join(variants)}")
    out = OUT / f"{args.row}-probe"
    (out / "results" / regime.name).mkdir(parents=True, exist_ok=True)
    for start in (GLOBAL_INPUT, MULTICROP):  # the runs a probe starts from: the study's records
        record = f"{run_name(start)}-seed{args.seed}.json"
        if not (out / "results" / regime.name / record).is_file():
            shutil.copy(OUT / "results" / regime.name / record, out / "results" / regime.name)
    studied = ROWS[args.row]
    name = f"{studied.name}, {args.variant}"
    row = Row(name, "kalm", (), (*studied.stage2, *variants[args.variant]), kind="learned")
    study = Probe(out, args.work.resolve(), False, None)
    if FROM_K_CROPS in row.stage2:
        study.local = study.trained_run(regime, MULTICROP, args.seed)["ckpt"]
    record = study.run(regime, row, args.seed)
    print(
        f"{name}, {regime.label}, seed {args.seed}: study AUROC {record['study']['kalm']['auroc']:.3f}, "
        f"lesion hits {record['localization']['hit_rate']:.1%} (hold-out "
        f"{record['heldout_localization']['hit_rate']:.1%})"
    )


if __name__ == "__main__":
    main()
