"""The localizer study: when does a localizer find the key area, and which one learns to?

    python -m experiments.localizers.study [--max-minutes 85]   # or: make study; resumable
    python -m experiments.localizers.study --quick --out DIR --work DIR   # tiny sizes, for the tests

Every row trains and evaluates through the project's own code on the `experiment=localizer`
preset (rows.py: rows and regimes; runner.py: training and records; report.py: RESULTS.md). The
main regime (c = 0.5, D = 0) runs first: every navigator variant for 3 seeds, which chooses the best
on the hold-out of train; 5 seeds for the rows its conclusions rest on (the goal's comparisons and
the best navigator), 3 for the others. Then c = 0 and the decoy regime (3 seeds) and the sweep of
c on the reduced rows, each with the best navigator, its REINFORCE refinement and its MIL ceiling.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from experiments.localizers.plan import (
    PAPER,
    STAGE2,
    Regime,
    best_navigator,
    collect,
    cues,
    everything,
    main_regime,
    regimes_of,
    sweep_regime,
)
from experiments.localizers.plots import side_by_side
from experiments.localizers.report import summarize, write
from experiments.localizers.runner import OutOfTime, Study
from kalm_lightning.data.blobs import texture_kept
from kalm_lightning.data.synthetic import SyntheticSettings

HERE = Path(__file__).resolve().parent


def texture_kept_in(study: Study, regime: Regime) -> float:
    """How much of the lesion's texture the generator leaves in its blob in this regime."""
    s = SyntheticSettings(**OmegaConf.to_container(study.config(regime, 0, 1, ()).data.synthetic))
    return texture_kept(s.blobs(), s.max_size, s.conspicuity, s.layout_jitter)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: for tests, not results")
    parser.add_argument("--out", type=Path, default=HERE, help="results/, RESULTS.md and plots")
    parser.add_argument("--work", type=Path, default=Path("outputs/localizers"), help="data, runs")
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="start no run after this many minutes (0: only write the report)",
    )
    parser.add_argument("--regimes", nargs="+", help="only these regimes (and no sweep)")
    parser.add_argument(
        "--rescore-holdout",
        action="store_true",
        help="score the hold-out of seeds >= 1 again on the patients each checkpoint records",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    study = Study(args.out.resolve(), args.work.resolve(), args.quick, args.max_minutes)
    for run in everything(best_navigator(study, args.quick), args.quick):
        study.add_holdout(*run)  # records made before they held the hold-out's figures
    stopped = False
    try:
        if args.rescore_holdout:  # records of seeds >= 1 scored seed 0's hold-out before the fix
            for run in everything(best_navigator(study, args.quick), args.quick):
                if run[2] >= 1 and (not args.regimes or run[0].name in args.regimes):
                    study.rescore_holdout(*run)
        while True:  # the plan follows the best navigator as its first seeds come in
            best = best_navigator(study, args.quick)
            pending = [
                run
                for run in everything(best, args.quick)
                if (not args.regimes or run[0].name in args.regimes) and study.read(*run) is None
            ]
            if not pending:
                break
            regime, row, seed = pending[0]
            elapsed = (time.perf_counter() - start) / 60
            print(
                f"study: {len(pending)} run(s) left; next {regime.name} {row.name} seed {seed} "
                f"({study.trained} trained in this part, {elapsed:.0f} min)",
                flush=True,
            )
            study.run(*pending[0])
    except OutOfTime:
        stopped = True
    best = best_navigator(study, args.quick)
    plan = everything(best, args.quick)
    records = [study.read(*run) for run in plan]
    left, done = records.count(None), [r for r in records if r is not None]
    summaries = [
        (g, summarize(g, g.rows(best), collect(study, g, best, args.quick)))
        for g in regimes_of(args.quick)
    ]
    sweep = [sweep_regime(c) for c in cues(args.quick)]
    sweeps = [(g, summarize(g, g.rows(best), collect(study, g, best, args.quick))) for g in sweep]
    kept = {g.name: texture_kept_in(study, g) for g in [*regimes_of(args.quick), *sweep]}
    cfg = study.config(main_regime(), 0, 2, ())
    setting = [
        f"- Data per seed: {cfg.data.synthetic.train_studies} train / {cfg.data.synthetic.valid_studies} valid studies "
        f"(abnormal rate {cfg.data.synthetic.abnormal_rate}), lesions `{list(cfg.data.synthetic.lesions)}`: stripes of "
        f"period 3 px filling a blob of diameter {cfg.data.synthetic.blob_size:.0%} of the shorter side; limbs shifted "
        f"by up to {cfg.data.synthetic.layout_jitter:.0%}; blob centres uniform over the bones.",
        f"- ResNet18 from scratch, CNN input {cfg.data.image_size} px, source {cfg.data.source_size} px; stage 1: batch "
        f"{cfg.data.batch_size}, {cfg.trainer.max_epochs} epochs; stage 2: {', '.join(STAGE2)}; Adam lr {cfg.model.optimizer.lr}, "
        f"selection by {cfg.model.selection_metric} on a hold-out of {cfg.data.val_from_train:.0%} of train patients.",
        f"- Navigators: {cfg.localizer.get('grid', 5)}x{cfg.localizer.get('grid', 5)} anchors of half-extent "
        "0.5 (a quarter of the image; one variant 6x6 of half-extent 0.4, 16%), CNN_l warmed up 1 epoch on random "
        "anchors, teacher: CNN_l's p(image's label) of each anchor, pooled over the source (the ablation: p(abnormal)); "
        "the controls' anchors are 5x5 of half-extent 0.5.",
        "- Seeds: 0-4 for the rows the main regime's conclusions rest on, 0-2 for the others; each seed "
        "draws its own data (`data.synthetic.seed`) and its own initialisation (`seed`).",
        f"- Wall time of the {len(done)} finished runs, training and evaluation: "
        f"{sum(r['seconds'] for r in done) / 3600:.1f} h in all (on the machines of the parts that ran "
        "them; see Machine).",
        f"- This invocation: {(time.perf_counter() - start) / 60:.1f} min wall, {study.trained} runs trained, "
        "the rest read back.",
    ]
    paper = (main_regime(), PAPER, 0)
    # the runs' figures are in the work folder; a part on another machine keeps the committed grid
    boxes = (
        side_by_side(
            [study.boxes_figure(*paper), study.boxes_figure(main_regime(), best, 0)],
            study.out / "boxes.png",
        )
        or (study.out / "boxes.png").is_file()
    )
    command = "python -m experiments.localizers.study" + (" --quick" if args.quick else "")
    write(
        study.out, summaries, sweeps, sweep[0].rows(best), best, setting, command, left, boxes, kept
    )
    state = f"stopped at the time limit, {left} run(s) left: run it again" if stopped else "done"
    print(f"{study.trained} runs trained; {state}; results in {study.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
