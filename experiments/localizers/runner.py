"""The localizer study's runner: trains and evaluates each run through the project's own code
(Hydra compose, `train_stage`, `run_evaluation`), and keeps one JSON record per finished run.

Resumable: a run whose record exists is read back, never trained again. `max_minutes` stops the
runner before it starts a run past that time, so that long plans go in parts.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from experiments.localizers.costs import costs, inference_flops
from experiments.localizers.plan import (
    GLOBAL_INPUT,
    STAGE2,
    Regime,
    Row,
    pinned,
    quick,
    run_name,
)
from experiments.localizers.records import (
    HELDOUT_FROM,
    holdout_figures,
    reproduced,
    study_blocks,
)
from kalm_lightning.config import compose_config, evaluation_config
from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.report import BOXES
from kalm_lightning.runs import Run, write_atomic
from kalm_lightning.tasks.evaluate import run_evaluation
from kalm_lightning.tasks.train import train_stage
from kalm_lightning.training.checkpoints import drop_training_state

QUICK = (
    "backbone.name=test_resnet",  # timm's test ResNet: the tests' tiny CNN (tests/conftest.py)
    "data.image_size=64",
    "data.source_size=128",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.synthetic.train_studies=24",
    "data.synthetic.valid_studies=12",
    "data.synthetic.max_size=96",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.log_every_n_steps=1",
)


class OutOfTime(Exception):
    """The runner reached its time limit before this run: a later invocation continues."""


class Study:
    def __init__(
        self,
        out: Path,
        work: Path,
        quick_sizes: bool,
        max_minutes: float | None,
        runs: Path | None = None,
        pin: bool = True,
        extra: tuple[str, ...] = (),
        stage1: Row = GLOBAL_INPUT,
        schedule: tuple[str, ...] = STAGE2,
    ) -> None:
        """Records in out/results, data in work/data, runs in `runs` (default work/runs); `pin`:
        navigator rows run with the navigator defaults study 2 ran with (`pinned`), else as shipped.
        `extra`: overrides of every run after the preset's (a study of its own sizes); `stage1`:
        the row whose run is every stage-2 run's CNN_g; `schedule`: every stage-2 run's."""
        self.out, self.work, self.quick, self.pin = out, work, quick_sizes, pin
        self.stage1, self.schedule = stage1, schedule
        self.runs = runs or work / "runs"
        self.check_threads()
        self.deadline = None if max_minutes is None else time.monotonic() + max_minutes * 60
        self.trained = 0
        self.base = [
            "experiment=localizer",
            "~callbacks.progress_bar",
            "logger=csv",
            f"paths.output_root={work / 'outputs'}",
            f"paths.data_root={work / 'data'}",
            *(QUICK if quick_sizes else ()),
            *extra,
        ]

    def check_threads(self) -> None:
        """Refuses to add to records made with another number of torch threads: the CPU's sums
        then run in another order, so a stage 1 trained again here would not reproduce its
        record, and every stage-2 run of its seed would be trained again."""
        threads = torch.get_num_threads()
        for path in sorted(self.out.glob("results/*/*.json")):
            recorded = json.loads(path.read_text()).get("torch_threads", threads)
            if recorded != threads:
                raise UserError(
                    f"{path}: made with {recorded} torch threads, this process has {threads}: "
                    f"run with the same (OMP_NUM_THREADS={recorded}, or unset it)"
                )

    def config(self, regime: Regime, seed: int, stage: int, overrides: tuple[str, ...]):
        """The composed config of one run: each seed draws its own data and initialisation."""
        return compose_config(
            "train",
            [
                *self.base,
                *regime.overrides(),
                f"data.synthetic.seed={seed}",
                f"data.root={self.work / 'data' / f'{regime.name}-seed{seed}'}",
                f"stage={stage}",
                f"seed={seed}",
                *(pinned if self.pin else tuple)(quick(overrides) if self.quick else overrides),
            ],
        )

    def stage2_overrides(self, row: Row, *extra: str) -> tuple[str, ...]:
        """A stage-2 run's overrides: the schedule first, so that a row may override it."""
        return (*(() if self.quick else self.schedule), *(row.stage2 or ()), *extra)

    def record_path(self, regime: Regime, row: Row, seed: int) -> Path:
        return self.out / "results" / regime.name / f"{run_name(row)}-seed{seed}.json"

    def run_dir(self, regime: Regime, row: Row, seed: int) -> Path:
        """Where one run of a row trains (or, for the MIL ceiling, is evaluated again)."""
        return self.runs / regime.name / f"seed{seed}" / run_name(row)

    def read(self, regime: Regime, row: Row, seed: int) -> dict | None:
        path = self.record_path(regime, row, seed)
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, regime: Regime, row: Row, seed: int) -> dict:
        """Train and evaluate one run, or read it back when it is finished already."""
        record = self.read(regime, row, seed)
        if record is not None:
            return record
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime
        if row.inference:
            trained = self.trained_run(
                regime, Row(row.name, row.score, row.stage1, row.stage2), seed
            )
            return self.evaluate_again(regime, row, seed, trained)
        return self.train(regime, row, seed)

    def trained_run(self, regime: Regime, row: Row, seed: int) -> dict:
        """A run that another one starts from (stage 1 for stage 2, a trained run for its MIL
        ceiling), with its checkpoint on this machine. A record whose checkpoint is not here (a
        part that ran on another machine) is trained again. Same-seed CPU runs on one machine end
        bit-identical; another machine's floating point may not, and then the record is replaced
        and the seed's stage-2 runs that started from the old checkpoint are trained again too.
        A line says which happened."""
        record = self.run(regime, row, seed)
        if Path(record["ckpt"]).is_file():
            return record
        again = self.train(regime, row, seed)
        same = reproduced(record, again)
        stale = []
        if not same and row.stage2 is None:
            seed_runs = self.record_path(regime, row, seed).parent.glob(f"*-seed{seed}.json")
            stale = sorted(p for p in seed_runs if json.loads(p.read_text())["stage"] == 2)
        for path in stale:
            path.unlink()
        print(
            f"{regime.name} {run_name(row)} seed {seed}: checkpoint not on this machine, trained "
            + ("again: the same figures" if same else "again: figures differ (record replaced)")
            + (
                f"; stage-2 runs to train again from it: {', '.join(p.stem for p in stale)}"
                if stale
                else ""
            )
        )
        return again

    def train(self, regime: Regime, row: Row, seed: int) -> dict:
        """Train and evaluate one run and write its record."""
        start = time.perf_counter()
        run_dir = self.run_dir(regime, row, seed)
        if row.stage2 is None:
            cfg = self.config(regime, seed, 1, row.stage1)
        else:
            stage1 = self.trained_run(regime, self.stage1, seed)["ckpt"]
            cfg = self.config(
                regime, seed, 2, self.stage2_overrides(row, f"stage.global_ckpt='{stage1}'")
            )
        shutil.rmtree(run_dir, ignore_errors=True)  # what a run stopped before its record left
        result = train_stage(cfg, run_dir)
        self.trained += 1
        evaluation = evaluation_config(cfg, result["best_ckpt"])
        metrics = run_evaluation(evaluation, Run(run_dir).evaluation)
        heldout = holdout_figures(evaluation, run_dir / "holdout")
        record = {
            "regime": regime.name,
            "run": run_name(row),
            "seed": seed,
            "overrides": [*row.stage1, *(row.stage2 or ())],
            "stage": result["stage"],
            "ckpt": result["best_ckpt"],
            "selection_metric": result["selection_metric"],
            "heldout": result["best_val_score"],  # on the hold-out of train (what selects)
            "study": study_blocks(metrics),
            "localization": metrics.get("localization"),
            **heldout,
            **costs(result["best_ckpt"], cfg),
            **self.more_figures(run_dir, cfg),
            "seconds": time.perf_counter() - start,
            "torch_threads": torch.get_num_threads(),  # the order of the CPU's sums
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # their kernels (AVX2, ...)
        }
        self.write(regime, row, seed, record)
        # A recorded run needs only its kept checkpoint's weights. last.ckpt (what a stopped run
        # continues from; an unrecorded run is trained afresh anyway) and the optimiser's state
        # would fill the disk over a study's hundreds of runs: study 3's first 153 runs held
        # 22 GB of last.ckpt, and its first 177 kept checkpoints 27 GB, two thirds Adam's moments.
        Run(run_dir).last_checkpoint.unlink(missing_ok=True)
        drop_training_state(result["best_ckpt"])
        return record

    def more_figures(self, run_dir: Path, cfg) -> dict:
        """What a study adds to each record of a trained run (none here)."""
        return {}

    def evaluate_again(self, regime: Regime, row: Row, seed: int, trained: dict) -> dict:
        """A trained run's checkpoint scored with another inference (the MIL ceiling)."""
        start = time.perf_counter()
        cfg = self.config(regime, seed, 2, row.stage2)
        evaluation = evaluation_config(cfg, trained["ckpt"])
        evaluation.inference = row.inference
        out = self.run_dir(regime, row, seed)
        metrics = run_evaluation(evaluation, out)
        record = {
            **trained,
            "run": run_name(row),
            "study": study_blocks(metrics),
            "localization": metrics.get("localization"),
            **holdout_figures(evaluation, out / "holdout"),
            "inference_flops": inference_flops(trained["ckpt"], cfg, row.inference),
            "seconds": trained["seconds"] + time.perf_counter() - start,
        }
        self.write(regime, row, seed, record)
        return record

    def add_holdout(self, regime: Regime, row: Row, seed: int, again: bool = False) -> None:
        """A record made before records held the hold-out's figures gets them from its checkpoint
        (where that is still on this machine): the same evaluation on the hold-out of train."""
        record = self.read(regime, row, seed)
        if record is None or not Path(record["ckpt"]).is_file():
            return
        if "heldout_study" in record and not again:
            return
        if row.stage2 is None:
            cfg = self.config(regime, seed, 1, row.stage1)
        else:
            cfg = self.config(regime, seed, 2, self.stage2_overrides(row))
        evaluation = evaluation_config(cfg, record["ckpt"])
        evaluation.inference = row.inference
        out = self.run_dir(regime, row, seed) / "holdout"
        self.write(regime, row, seed, {**record, **holdout_figures(evaluation, out)})

    def rescore_holdout(self, regime: Regime, row: Row, seed: int) -> None:
        """A record whose hold-out figures came from the hold-out evaluate used to draw with
        seed 0 (every seed >= 1 before checkpoints recorded their hold-out) gets them again from
        its checkpoint, which names the patients its run held out. A checkpoint not on this
        machine is trained again first (`trained_run`: the record is replaced, and says whether
        its figures came out the same)."""
        record = self.read(regime, row, seed)
        if record is None or record.get("heldout_from") == HELDOUT_FROM:
            return
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime
        if row.inference:
            base = Row(row.name, row.score, row.stage1, row.stage2)
            self.rescore_holdout(regime, base, seed)
            again = self.evaluate_again(regime, row, seed, self.trained_run(regime, base, seed))
        elif Path(record["ckpt"]).is_file():
            self.add_holdout(regime, row, seed, again=True)
            return
        else:
            again = self.trained_run(regime, row, seed)
        figures = "the same" if reproduced(record, again) else "other"
        print(
            f"{regime.name} {run_name(row)} seed {seed}: hold-out scored again; {figures} figures"
        )

    def write(self, regime: Regime, row: Row, seed: int, record: dict) -> None:
        path = self.record_path(regime, row, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, indent=2) + "\n")  # a kill leaves the old or the new

    def boxes_figure(self, regime: Regime, row: Row, seed: int) -> Path:
        run = self.run_dir(regime, row, seed)
        return (run if row.inference else Run(run).evaluation) / BOXES
