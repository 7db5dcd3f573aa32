"""The navigator at a lower training cost, against the one that ships (issue 32, point 2).

The shipped navigator (the study's best variant, with the local scout since study 3) trains CNN_l
on two crops per image and passes CNN_l over the whole source for its teacher every step. Cheaper
variants train CNN_l on one crop per image (`localizer.train_crops=1`: the teacher's best anchor in
every other image, a drawn one in the others) and either pass the teacher over the source resized
to the crops' scale (`localizer.teacher_size=crops`) or over the taught images alone
(`localizer.teacher_images=taught`). Each runs on the study's main regime (c = 0.5, D = 0), seeds
0-4, from each seed's stage 1 as the study recorded it, on the study's schedule, and is paired seed
by seed with the shipped navigator on the same data and stage 1. The study's own records (its
GroupNorm scout) stay as a row. Resumable (one record per run, written atomically); writes
NAVIGATOR-COST.md beside the study's RESULTS.md.

    python -m experiments.localizers.navigator_cost --work WORK [--seeds 0 1 2 3 4]
    python -m experiments.localizers.navigator_cost --work WORK \
        --out experiments/localizers/navigator-cost-2 --rows maps2 maps-looks   # the second table

WORK: the study's work folder (its data and stage-1 runs; `make study` uses outputs/localizers).
A stage 1 that is not in WORK is trained again, and where its figures differ from the record every
stage-2 run of its seed is too: the second table (`--out`) holds variants run after the first
table's stage 1 was gone, beside the shipped navigator trained again from the same stage 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from experiments.localizers.navigator_variants import ROWS, SAME_SCHEDULE, SECOND, SHIPPED
from experiments.localizers.plan import GLOBAL_INPUT, NAVIGATOR, STAGE2, Row, main_regime
from experiments.localizers.runner import Study, run_name
from experiments.localizers.stats import mean, spread
from kalm_lightning.runs import write_atomic

HERE = Path(__file__).parent
OUT = HERE / "navigator-cost"
STUDIED = Row(
    "navigator as the study ran it (GroupNorm scout, shipped before 1ad05cc)",
    "kalm",
    (),
    (*NAVIGATOR, "localizer.reads=source", "localizer.grid=6", "localizer.half=0.4"),
)
LOST = 0.05  # a seed loses the hit rate where it is more than 5 points below the shipped one's


def figures(records: list[dict]) -> str:
    auroc = [r["study"]["kalm"]["auroc"] for r in records]
    hits = [r["localization"]["hit_rate"] for r in records]
    held = [r["heldout_localization"]["hit_rate"] for r in records]
    flops = mean([r["training_flops"] for r in records])
    minutes = mean([r["seconds"] for r in records]) / 60
    return (
        f"{mean(auroc):.3f} ± {spread(auroc):.3f} | {', '.join(f'{a:.3f}' for a in auroc)} | "
        f"{mean(hits):.1%} ± {spread(hits):.1%} | {', '.join(f'{h:.1%}' for h in hits)} | "
        f"{mean(held):.1%} | {flops / 1e9:.2f} | {minutes:.1f}"
    )


def epochs(record: dict) -> int:
    """The epochs a stage-2 run trained: the study's schedule, or the row's own."""
    told = [o for o in (*STAGE2, *record["overrides"]) if o.startswith("trainer.max_epochs=")]
    return int(told[-1].partition("=")[2])


def paired(
    row: Row, cheap: list[dict], reference: list[dict], seeds: list[int], against: str = ""
) -> str:
    """A cheaper variant minus the shipped one (`against`: which run of it, where not the
    study's schedule), seed by seed (same data, same stage 1)."""
    shipped = f"the shipped one{against}"
    hits = [
        c["localization"]["hit_rate"] - r["localization"]["hit_rate"]
        for c, r in zip(cheap, reference, strict=True)
    ]
    auroc = [
        c["study"]["kalm"]["auroc"] - r["study"]["kalm"]["auroc"]
        for c, r in zip(cheap, reference, strict=True)
    ]
    step = mean([c["training_flops"] for c in cheap]) / mean(
        [r["training_flops"] for r in reference]
    )
    run = mean([c["training_flops"] * epochs(c) for c in cheap]) / mean(
        [r["training_flops"] * epochs(r) for r in reference]
    )
    lost = [str(seed) for seed, h in zip(seeds, hits, strict=True) if h < -LOST]
    points = f"{LOST * 100:.0f} points"
    verdict = (
        f"loses hits on seed(s) {', '.join(lost)} (more than {points} below {shipped})"
        if lost
        else f"keeps its hits on every seed (none more than {points} below)"
    )
    return (
        f"{row.name}, paired per seed (minus {shipped}): lesion hits {mean(hits):+.1%} ± "
        f"{spread(hits):.1%} ({', '.join(f'{h:+.1%}' for h in hits)}), study AUROC "
        f"{mean(auroc):+.3f} ± {spread(auroc):.3f}; training FLOPs per image and step {step:.2f}x "
        f"those of {shipped}, over the run {run:.2f}x. It {verdict}."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the study's data and runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        default=[key for key in ROWS if key not in SECOND],
        help="the variants to run beside the shipped one (default: the first table's)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT,
        help="records (and, where not the default, the report); another folder: a table of its "
        "own, from a stage 1 trained again",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    regime, studied = main_regime(), HERE / "results" / main_regime().name
    ours = out / "results" / regime.name
    ours.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # each seed's stage 1 as the study recorded it
        name = f"{run_name(GLOBAL_INPUT)}-seed{seed}.json"
        if not (ours / name).is_file():
            shutil.copy(studied / name, ours / name)
    study = Study(out, args.work.resolve(), False, None, pin=False)
    cheaper = [ROWS[key] for key in ROWS if key in args.rows]
    same_schedule = [(row, shipped) for row, shipped in SAME_SCHEDULE if row in cheaper]
    shipped_too = dict.fromkeys(shipped for _, shipped in same_schedule)  # once each, in order
    runs = {row: [] for row in (SHIPPED, *cheaper, *shipped_too)}
    for seed in args.seeds:  # seed by seed: a part cut short leaves whole pairs
        for row, records in runs.items():
            records.append(study.run(regime, row, seed))
    first = out == OUT.resolve()  # the first table: its stage 1 is the study's, so its row too
    studied_records = [
        json.loads((studied / f"{run_name(STUDIED)}-seed{seed}.json").read_text())
        for seed in (args.seeds if first else ())
    ]
    seeds = " ".join(map(str, args.seeds))
    command = f"python -m experiments.localizers.navigator_cost --work WORK --seeds {seeds}"
    if not first:
        command += (
            f" --out {out.relative_to(HERE.parent.parent.resolve())} --rows {' '.join(args.rows)}"
        )
    report = [
        "# The navigator at a lower training cost" + ("" if first else ": a second table"),
        "",
        f"{regime.label}; seeds {seeds.replace(' ', ', ')} (data and training); stage 2 for 5 "
        "epochs at batch 8 (the study's schedule, where a row names no other) from each seed's "
        "recorded stage 1; MURA valid of each draw. Hits: the lesion's centre inside the box, "
        "over the lesioned views; hold-out hits: the same on the hold-out of train that selected "
        "the checkpoint; training: counted FLOPs of one image's training step (forward and "
        "backward of the stage's loss), averaged over the epochs; minutes: wall time of a run's "
        "training and evaluation on 2 CPU cores.",
        *(
            ()
            if first
            else (
                "",
                "Each seed's stage 1 trained again (NAVIGATOR-COST.md's checkpoints were not on "
                "the machine, and a stage 1 trained again does not reproduce its records): the "
                "runs here, the shipped navigator's included, pair with each other only, not "
                "with NAVIGATOR-COST.md's.",
            )
        ),
        "",
        "| row | study AUROC | per seed | lesion hits | per seed | hold-out hits "
        "| training GFLOPs / image and step | minutes / run |",
        "|---|---|---|---|---|---|---|---|",
        *((f"| {STUDIED.name} (study records) | {figures(studied_records)} |",) if first else ()),
        *(f"| {row.name} | {figures(records)} |" for row, records in runs.items()),
        "",
        *(f"- {paired(row, runs[row], runs[SHIPPED], args.seeds)}" for row in cheaper),
        *(
            f"- {paired(row, runs[row], runs[shipped], args.seeds, ' at the same 10 epochs')}"
            for row, shipped in same_schedule
        ),
        "",
        f"`{command}`",
        "",
    ]
    write_atomic((HERE if first else out) / "NAVIGATOR-COST.md", "\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
