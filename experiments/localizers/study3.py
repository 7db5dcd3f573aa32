"""Localizer study 3: K crops read by attention, in regimes where looking pays (issue 30).

    python -m experiments.localizers.study3 [--max-minutes 90] [--seeds 0 1 2 3 4]   # resumable
    python -m experiments.localizers.study3 --quick --out DIR --work DIR   # tiny sizes, for tests

Source 320 px, CNN input 80 (global @ source costs 16x the input's), lesion texture in a blob of
10% of the side whose amplitude (0.25) is held fixed as its contrast c changes, D look-alike decoys
of the same blob without a lesion and without a brightness attribute, c in {0, 0.5, 1}, D in
{0, 1, 3}. The amplitude was chosen by `pilot3.py` on seed 100, which no study run uses: at the
first regime's 0.12 nothing learned the lesion, global @ source included (study3/first-regime/).
Every row trains the same steps (5 epochs at batch 8, stage 1 too); checkpoints are selected on
the hold-out's study log-loss with the warm-up epoch excluded; accuracy and kappa are read at the
operating point fitted on the hold-out (Youden). Seed s draws its own data and initialisation;
seed 0 of every regime runs first, then seed 1, and so on. Records in study3/results, one per run,
written atomically; RESULTS.md from them (`report3.py`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd

from experiments.localizers.plan import Regime, Row
from experiments.localizers.runner import OutOfTime, Study
from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.predictions import STUDIES
from kalm_lightning.runs import Run

HERE = Path(__file__).resolve().parent
OUT = HERE / "study3"
WORK = Path("outputs/localizers3")  # the runs and generated data, beside any checkout

INPUT, SOURCE, MATCHED = 80, 320, 184  # MATCHED: the side whose global CNN costs what K = 4 does
SIZES = (
    f"data.image_size={INPUT}",
    f"data.source_size={SOURCE}",
    "data.synthetic.max_size=366",  # stripes of period 3 px: 2.6 px at the source, 0.66 at input
    "data.synthetic.blob_size=0.1",
)
SCHEDULE = ("trainer.max_epochs=5", "data.batch_size=8")  # study 2's stage 2 (lr / 10 after 3)
REGIME = ("data.synthetic.texture_amplitude=0.25", "data.synthetic.attribute=0.0")  # pilot3.py
SELECTION = (
    "model.selection_metric=study_log_loss",
    "model.selection_from_epoch=1",  # a navigator's warm-up epoch is never the one kept
    "model.operating_point.rule=youden",
)
# At source = 4 x input, a window of half-extent 0.25 is read at the source's own resolution: the
# anchored rows (navigator, controls) choose among the 7 x 7 windows the K-crop reader has.
WINDOWS = ("localizer.grid=7", "localizer.half=0.25")

GLOBAL_INPUT = Row(f"global CNN @ input ({INPUT} px)", "global")
GLOBAL_SOURCE = Row(f"global CNN @ source ({SOURCE} px)", "global", (f"data.image_size={SOURCE}",))
GLOBAL_MATCHED = Row(
    f"global CNN, FLOP-matched to K = 4 ({MATCHED} px)", "global", (f"data.image_size={MATCHED}",)
)
PAPER = Row("KALM (paper)", "kalm", (), ("localizer=kalm",), kind="paper")
NAVIGATOR = Row(
    "navigator, one crop", "kalm", (), ("localizer=navigator", *WINDOWS), kind="learned"
)
MULTICROP = Row(
    "K crops by attention, K = 4",
    "kalm",
    (),
    ("localizer=multicrop", "localizer.k=4"),
    kind="learned",
)
MULTICROP2 = Row(
    "K crops by attention, K = 2",
    "kalm",
    (),
    ("localizer=multicrop", "localizer.k=2"),
    kind="learned",
)
SAMPLING = Row(  # the second K-crop design, at equal K: attention sampling (Katharopoulos 2019)
    "K crops by attention sampling, K = 4",
    "kalm",
    (),
    ("localizer=sampling", "localizer.k=4"),
    kind="learned",
)
CONTROL = {"score": "kalm", "stage1": (), "kind": "control"}
BRIGHTEST = Row("control: brightest anchor", stage2=("localizer=brightest", *WINDOWS), **CONTROL)
RANDOM = Row("control: random anchor", stage2=("localizer=random", *WINDOWS), **CONTROL)
FIXED = Row(
    "control: fixed centred box", stage2=("localizer=fixed", "localizer.half=0.25"), **CONTROL
)
CONTROLS = [GLOBAL_INPUT, GLOBAL_MATCHED, BRIGHTEST, RANDOM, FIXED]  # what K crops must beat
ROWS = [GLOBAL_INPUT, GLOBAL_SOURCE, GLOBAL_MATCHED, PAPER, NAVIGATOR, MULTICROP, MULTICROP2]
ROWS += [SAMPLING, BRIGHTEST, RANDOM, FIXED]
READERS = (MULTICROP, MULTICROP2, SAMPLING)  # the K-crop rows the goal is checked for
FIVE = (GLOBAL_SOURCE, *READERS, *CONTROLS)  # the goal's rows: 5 seeds; others 3

CUES, DECOYS = (0.0, 0.5, 1.0), (0, 1, 3)
# seed by seed, regimes in this order: the regime of study 2's success and its decoy variant first
ORDER = [(0.5, 0), (0.5, 3), (1.0, 0), (0.0, 0), (1.0, 3), (0.0, 3), (0.5, 1), (1.0, 1), (0.0, 1)]
REGIMES = [Regime(f"c{c:g}-d{d}", f"c = {c:g}, D = {d}", c, d) for c, d in ORDER]
QUICK_SIZES = {str(INPUT): "64", str(SOURCE): "128", str(MATCHED): "90"}


def seeds_of(row: Row, quick: bool) -> list[int]:
    return [0] if quick else list(range(5 if row in FIVE else 3))


def regimes_of(quick: bool) -> list[Regime]:
    """The regimes a study runs: all nine, or the first alone for --quick."""
    return REGIMES[:1] if quick else REGIMES


def plan(quick: bool, seeds: list[int] | None = None) -> list[tuple[Regime, Row, int]]:
    """Every run: seed 0 of every regime and row first, then seed 1, ... (--quick: one regime)."""
    runs = [(g, r, s) for g in regimes_of(quick) for r in ROWS for s in seeds_of(r, quick)]
    runs = [run for run in runs if seeds is None or run[2] in seeds]
    return sorted(runs, key=lambda run: run[2])


def quick_row(row: Row) -> Row:
    def size(o: str) -> str:
        key, _, value = o.partition("=")
        return f"{key}={QUICK_SIZES.get(value, value)}" if key == "data.image_size" else o

    return Row(row.name, row.score, tuple(map(size, row.stage1)), row.stage2, kind=row.kind)


class Study3(Study):
    """The runner of study 2 (`runner.Study`) at this study's sizes, schedule and selection, the
    shipped localizer defaults (not study 2's pinned ones); each record also holds accuracy and
    kappa at the hold-out's operating point and the images trained on."""

    def __init__(self, out: Path, work: Path, quick: bool, max_minutes: float | None) -> None:
        extra = (*REGIME, *SELECTION) if quick else (*SIZES, *SCHEDULE, *REGIME, *SELECTION)
        super().__init__(out, work, quick, max_minutes, pin=False, extra=extra, schedule=())
        self.stage1 = self.row(GLOBAL_INPUT)

    def row(self, row: Row) -> Row:
        return quick_row(row) if self.quick else row

    def more_figures(self, run_dir: Path, cfg) -> dict:
        studies = pd.read_csv(Run(run_dir).evaluation / STUDIES)
        logs = Run(run_dir).read_logs()
        return {
            "at_operating_point": agreement(studies["call"], studies["label"]),
            "images_trained": int(logs["step"].max() + 1) * int(cfg.data.batch_size),
        }


def agreement(call: pd.Series, label: pd.Series) -> dict[str, float]:
    """Accuracy and Cohen's kappa of the calls (at the model's threshold) against the truth."""
    call, label = call.astype(int), label.astype(int)
    accuracy = float((call == label).mean())
    expected = float(call.mean() * label.mean() + (1 - call.mean()) * (1 - label.mean()))
    kappa = (accuracy - expected) / (1 - expected) if expected < 1 else math.nan
    return {"accuracy": accuracy, "kappa": float(kappa), "threshold_rule": "youden"}


def main(argv: list[str] | None = None) -> None:
    from experiments.localizers.report3 import write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: for tests, not results")
    parser.add_argument("--out", type=Path, default=OUT, help="results/ and RESULTS.md")
    parser.add_argument("--work", type=Path, default=WORK, help="data, runs")
    parser.add_argument("--max-minutes", type=float, help="start no run after this many minutes")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        study = Study3(args.out.resolve(), args.work.resolve(), args.quick, args.max_minutes)
    except UserError as error:
        raise SystemExit(f"study3: {error}") from None
    runs = [(g, study.row(r), s) for g, r, s in plan(args.quick, args.seeds)]
    stopped = False
    try:
        for done, (regime, row, seed) in enumerate(runs):
            if study.read(regime, row, seed) is None:
                minutes = (time.perf_counter() - start) / 60
                print(
                    f"study3: {done}/{len(runs)} runs done; next {regime.name} {row.name} seed "
                    f"{seed} ({study.trained} trained in this part, {minutes:.0f} min)",
                    flush=True,
                )
            study.run(regime, row, seed)
    except OutOfTime:
        stopped = True
    left = sum(study.read(*run) is None for run in runs)
    write_report(study, args.quick, time.perf_counter() - start)
    state = f"stopped at the time limit, {left} run(s) left: run it again" if stopped else "done"
    print(f"study3: {study.trained} runs trained; {state}; results in {study.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
