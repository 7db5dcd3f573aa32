"""The shipped localizers on draws outside the study, as a new user would meet them.

`localizer=navigator` as shipped (its defaults, not the ones study 2 pinned) against the paper's
KALM and the global CNN, in a regime the study did not train (c = 0.6, no decoys), on data seeds
and training seeds the study never drew (11, 12, 13 by default): the same stage-1 run per seed,
stage 2 on the study's schedule, MURA valid reported. Resumable (one record per run, written
atomically); writes FRESH.md beside the study's RESULTS.md.

    python -m experiments.localizers.fresh_draw --work /tmp/fresh [--seeds 11 12 13]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.localizers import navigator_variants as cost
from experiments.localizers.plan import GLOBAL_INPUT, PAPER, Regime, Row
from experiments.localizers.runner import Study
from experiments.localizers.stats import mean, spread
from kalm_lightning.runs import write_atomic

HERE = Path(__file__).parent
REGIME = Regime("fresh-c0.6", "c = 0.6, D = 0 (outside the study)", 0.6)
SHIPPED = cost.variant("localizer=navigator (shipped)")
# What `localizer=navigator` shipped before its scout became `local` (1ad05cc): these records
# were made then, with the only scout there was.
GROUP_SCOUT = cost.variant(
    "localizer=navigator, GroupNorm scout (shipped before 1ad05cc)", "localizer.scout=group"
)
# The cheapest navigator to train (issue 32): no teacher's pass, one CNN_l crop per image; chosen
# on study 2's main regime (NAVIGATOR-COST.md), checked here on draws that chose nothing.
FROM_CROPS = cost.variant(
    "localizer=navigator, teacher from CNN_l's training crops, one crop per image",
    *cost.FROM_CROPS.stage2[1:],
)
FROM_CROPS_LONG = cost.variant(
    f"{FROM_CROPS.name}, 10 epochs (lr / 10 after 6)", *cost.FROM_CROPS_LONG.stage2[1:]
)
ROWS = [GLOBAL_INPUT, PAPER, GROUP_SCOUT, SHIPPED, FROM_CROPS, FROM_CROPS_LONG]
# `--second`: variants measured after the first table's stage 1 was gone, beside the shipped
# navigator trained again from the same stage 1 (fresh-draw-2/FRESH.md)
DRAWN_SCALE = cost.variant(
    "localizer=navigator, two crops per image taught by their maps, the drawn one at 0.7 of the "
    "side",
    *cost.FROM_MAPS2_SMALL.stage2[1:],
)
SECOND = [GLOBAL_INPUT, SHIPPED, DRAWN_SCALE]


def table(records: dict[str, list[dict]], rows: list[Row]) -> list[str]:
    """One line per row: the fused study AUROC and the lesion hit rate, per seed and in mean ± sd."""
    lines = [
        "| row | study AUROC, mean ± sd | per seed | lesion hits, mean ± sd | per seed |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        done = records[row.name]
        auroc = [r["study"][row.score]["auroc"] for r in done]
        hits = [r["localization"]["hit_rate"] for r in done if r.get("localization")]
        per = lambda xs, f: ", ".join(f.format(x) for x in xs) or "-"  # noqa: E731
        lines.append(
            f"| {row.name} | {mean(auroc):.3f} ± {spread(auroc):.3f} | {per(auroc, '{:.3f}')} | "
            + (
                f"{mean(hits):.1%} ± {spread(hits):.1%} | {per(hits, '{:.1%}')} |"
                if hits
                else "- | - |"
            )
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="data and runs go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument(
        "--second", action="store_true", help="the second table (fresh-draw-2/): " + SECOND[-1].name
    )
    args = parser.parse_args(argv)
    out, rows = (HERE / "fresh-draw-2", SECOND) if args.second else (HERE / "fresh-draw", ROWS)
    study = Study(out, args.work.resolve(), False, None, pin=False)
    records: dict[str, list[dict]] = {row.name: [] for row in rows}
    for seed in args.seeds:  # seed by seed: a part cut short leaves whole pairs
        for row in rows:
            records[row.name].append(study.run(REGIME, row, seed))
    report = [
        "# The shipped localizers on fresh draws" + (": a second table" if args.second else ""),
        "",
        f"{REGIME.label}; data seed = training seed = {', '.join(map(str, args.seeds))}; "
        "`experiment=localizer`, stage 2 for 5 epochs at batch 8 (the study's schedule); "
        "MURA valid of each draw. Lesion hits: the lesion's centre inside the box, over the "
        "lesioned views.",
        "",
        *(
            (
                "Each seed's stage 1 trained again (FRESH.md's checkpoints were not on the "
                "machine): these rows pair with each other only.",
                "",
            )
            if args.second
            else ()
        ),
        *table(records, rows),
        "",
        f"`python -m experiments.localizers.fresh_draw --work WORK --seeds {' '.join(map(str, args.seeds))}"
        + (" --second`" if args.second else "`"),
        "",
    ]
    write_atomic((out if args.second else HERE) / "FRESH.md", "\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
