"""One stage-2 run of the localizer study's main regime with extra overrides, scored on the hold-out
of train it selected on: how the study's navigator settings were chosen, never looking at valid.

    python -m experiments.localizers.probe --seed 0 localizer=navigator localizer.reads=view \
        localizer.teacher_score=label

It trains exactly as the study does (`runner.Study`: the preset, the regime, the seed's own data
and its stage-1 run, stage 2 at the study's batch and epochs) and keeps its record in
`--out`/results/ (default: the study's work folder, beside its runs, not in the study's results),
so a probe already made is read back. It prints only the hold-out's figures (its record, as
every study record, holds valid's as well).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from experiments.localizers.plan import GLOBAL_INPUT, Row, main_regime
from experiments.localizers.runner import Study

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="+", help="the stage-2 run's overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("outputs/localizers"), help="data, runs")
    parser.add_argument("--out", type=Path, help="its record (default: WORK/probes)")
    parser.add_argument("--results", type=Path, default=HERE, help="the study's records")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: for tests, not results")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    out = (args.out or work / "probes").resolve()
    study = Study(out, work, args.quick, None, runs=out / "runs")  # never the study's runs
    regime = main_regime()
    # the seed's stage-1 run is the study's: its record is copied, so it is not trained again
    own = Study(args.results.resolve(), work, args.quick, None).record_path(
        regime, GLOBAL_INPUT, args.seed
    )
    mine = study.record_path(regime, GLOBAL_INPUT, args.seed)
    if own.is_file() and not mine.is_file():
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(own, mine)
    probe = Row("probe", "kalm", (), tuple(args.overrides))
    record = study.run(regime, probe, args.seed)
    figures = {
        "overrides": record["overrides"],
        "seed": args.seed,
        "heldout_auroc": record["heldout_study"]["kalm"]["auroc"],
        **{f"heldout_{k}": v for k, v in record["heldout_localization"].items()},
        "record": str(study.record_path(regime, probe, args.seed)),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
