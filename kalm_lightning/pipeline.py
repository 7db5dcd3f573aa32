"""The train command's task: one training stage, or the chain a pipeline runs (stage 1, stage 2
on its best checkpoint, evaluation), each stage's config composed here, where configs are made."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from kalm_lightning import runs
from kalm_lightning.config import (
    evaluation_config,
    print_config,
    quote_numeric_choices,
    stage2_config,
    task_overrides,
)
from kalm_lightning.errors import UserError
from kalm_lightning.tasks.evaluate import run_evaluation
from kalm_lightning.tasks.train import train_stage
from kalm_lightning.training.ddp import leave_process_group, one_ddp_job


def run_pipeline(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    """Stage 1, stage 2 on its best checkpoint, then evaluation: the demo in one command."""
    run = runs.Run(run_dir)
    first = train_stage(cfg, run.stage(1).path)
    if not first["best_ckpt"]:
        raise UserError(f"stage 1 in {run.stage(1).path} saved no best checkpoint")
    second = train_stage(stage2_config(first["best_ckpt"], overrides), run.stage(2).path)
    if rank_zero_only.rank != 0 or not second["best_ckpt"]:
        return second
    leave_process_group()  # training is over: the evaluation is this process's alone
    run_evaluation(evaluation_config(cfg, second["best_ckpt"]), run.evaluation)
    print(f"KALM boxes drawn in {run.evaluation / 'boxes.png'}")
    return second


def run_training(cfg: DictConfig) -> float | None:
    """The train command: print the config, then one stage or the whole pipeline."""
    if rank_zero_only.rank == 0:
        print_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    with one_ddp_job(quote_numeric_choices):  # a further rank's command line, as Hydra reads it
        result = (
            run_pipeline(cfg, run_dir, task_overrides())
            if cfg.pipeline
            else train_stage(cfg, run_dir)
        )
    return result.get("best_val_score")  # what a sweeper (Optuna) optimises
