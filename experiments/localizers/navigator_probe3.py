"""Study 3's navigator row with its teacher changed, on one regime and seed: is the teacher's
pass the reason the navigator misses the lesion in study 3's regimes?

    python -m experiments.localizers.navigator_probe3 --variant from-crops --work WORK [--seed 0]

`from-crops`: taught by CNN_l's own training crops (`localizer.teacher_from=crops`, one crop per
image), so the teacher sees the anchors exactly as CNN_l's crops do; `teacher-at-crops-scale`: the
teacher's pass over the source resized to the crops' scale (`localizer.teacher_size=crops`). The
study's runner at the study's sizes, schedule and selection; the seed's stage 1 is the study's
(its record copied, its checkpoint in WORK, the study's work folder). Records in
study3/navigator-probe/results, one per run, written atomically.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from experiments.localizers.plan import Row
from experiments.localizers.runner import run_name
from experiments.localizers.study3 import GLOBAL_INPUT, NAVIGATOR, OUT, REGIMES, Study3

VARIANTS = {
    "from-crops": ("localizer.teacher_from=crops", "localizer.train_crops=1"),
    "teacher-at-crops-scale": ("localizer.teacher_size=crops",),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--work", type=Path, required=True, help="the study's data and runs")
    parser.add_argument("--regime", default=REGIMES[0].name, choices=[r.name for r in REGIMES])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    regime = next(r for r in REGIMES if r.name == args.regime)
    out = OUT / "navigator-probe"
    stage1 = f"{run_name(GLOBAL_INPUT)}-seed{args.seed}.json"
    (out / "results" / regime.name).mkdir(parents=True, exist_ok=True)
    if not (out / "results" / regime.name / stage1).is_file():
        shutil.copy(OUT / "results" / regime.name / stage1, out / "results" / regime.name / stage1)
    name = f"{NAVIGATOR.name}, {args.variant}"
    row = Row(name, "kalm", (), (*NAVIGATOR.stage2, *VARIANTS[args.variant]), kind="learned")
    record = Study3(out, args.work.resolve(), False, None).run(regime, row, args.seed)
    print(
        f"{name}, {regime.label}, seed {args.seed}: study AUROC {record['study']['kalm']['auroc']:.3f}, "
        f"lesion hits {record['localization']['hit_rate']:.1%} (hold-out "
        f"{record['heldout_localization']['hit_rate']:.1%})"
    )


if __name__ == "__main__":
    main()
