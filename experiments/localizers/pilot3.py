"""Study 3's pilot: can global @ source learn the lesion, and global @ input not, in a regime?

    python -m experiments.localizers.pilot3 --amplitude 0.25 0.4 [--regime c0.5-d0] [--row input]

The first regime (texture amplitude 0.12, study3/first-regime/) left every row near chance,
global @ source included, so K crops had nothing to find. The pilot trains global @ source with
study 3's sizes, schedule and selection on seed 100, a seed no study run uses (its own data draw
and initialisation), and prints the hold-out's figures at the kept epoch. Regimes are chosen on
these pilot figures only: MURA valid of the study's seeds is never looked at to choose them.
Records in study3/pilot/, one per setting.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.localizers import study3
from experiments.localizers.runner import Study

PILOT_SEED = 100  # outside every study's seeds (0-4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amplitude", type=float, nargs="+", required=True)
    parser.add_argument("--regime", default="c0.5-d0", help="a regime name of study3.REGIMES")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-studies", type=int, default=200)
    parser.add_argument("--row", choices=["source", "input"], default="source", help="global @ ...")
    parser.add_argument("--out", type=Path, default=study3.OUT / "pilot")
    parser.add_argument("--work", type=Path, default=Path("outputs/localizers3-pilot"))
    args = parser.parse_args(argv)
    regime = next(g for g in study3.REGIMES if g.name == args.regime)
    row = study3.GLOBAL_SOURCE if args.row == "source" else study3.GLOBAL_INPUT
    for amplitude in args.amplitude:
        setting = f"a{amplitude:g}-e{args.epochs}-n{args.train_studies}"
        extra = (
            *study3.SIZES,
            f"trainer.max_epochs={args.epochs}",
            "data.batch_size=8",
            f"data.synthetic.train_studies={args.train_studies}",
            f"data.synthetic.texture_amplitude={amplitude}",
            "data.synthetic.attribute=0.0",
            *study3.SELECTION,
        )
        study = Study(
            args.out.resolve() / setting,
            args.work.resolve() / setting,
            False,
            None,
            pin=False,
            extra=extra,
            schedule=(),
        )
        record = study.run(regime, row, PILOT_SEED)
        held = record.get("heldout_study", {})
        print(f"pilot {regime.name} {setting} {row.name}: hold-out {held}", flush=True)


if __name__ == "__main__":
    main()
