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
from experiments.localizers.plan import GLOBAL_INPUT, PAPER, Regime
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


def table(records: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    """One line per row: the fused study AUROC and the lesion hit rate, per seed and in mean ± sd."""
    lines = [
        "| row | study AUROC, mean ± sd | per seed | lesion hits, mean ± sd | per seed |",
        "|---|---|---|---|---|",
    ]
    for row in ROWS:
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
    args = parser.parse_args(argv)
    study = Study(HERE / "fresh-draw", args.work.resolve(), False, None, pin=False)
    records = {row.name: [study.run(REGIME, row, seed) for seed in args.seeds] for row in ROWS}
    report = [
        "# The shipped localizers on fresh draws",
        "",
        f"{REGIME.label}; data seed = training seed = {', '.join(map(str, args.seeds))}; "
        "`experiment=localizer`, stage 2 for 5 epochs at batch 8 (the study's schedule); "
        "MURA valid of each draw. Lesion hits: the lesion's centre inside the box, over the "
        "lesioned views.",
        "",
        *table(records, args.seeds),
        "",
        f"`python -m experiments.localizers.fresh_draw --work WORK --seeds {' '.join(map(str, args.seeds))}`",
        "",
    ]
    write_atomic(HERE / "FRESH.md", "\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
