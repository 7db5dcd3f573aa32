"""The train command: one training stage, or the demo's chain of stage 1, stage 2 and evaluation, from a composed config."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from kalm_lightning.checkpoints import (
    WEIGHTS_ONLY,
    last_checkpoint,
    partial_path,
    read_checkpoint,
)
from kalm_lightning.config import (
    compose_config,
    pin_job_for_other_ranks,
    print_config,
    resumes_last,
    task_overrides,
)
from kalm_lightning.errors import UserError
from kalm_lightning.loggers import finish_wandb
from kalm_lightning.models.backbone import backbone_normalization
from kalm_lightning.summary import RESULT_FILE
from kalm_lightning.tasks.evaluate import run_evaluation

log = logging.getLogger(__name__)


def find_stage1_checkpoint(cfg: DictConfig) -> str:
    """stage.global_ckpt: a path, or auto = the newest best stage-1 checkpoint for this backbone and data."""
    wanted = cfg.stage.global_ckpt
    if wanted not in (None, "auto"):
        if not Path(wanted).is_file():
            raise UserError(f"stage.global_ckpt={wanted} does not exist")
        return str(wanted)
    root = Path(cfg.paths.output_root)
    data_root = str(Path(cfg.data.root).expanduser().resolve())
    found = []
    for path in root.rglob(RESULT_FILE) if root.is_dir() else []:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # another process's file, not finished: never picked
        if (
            result.get("stage") == 1
            and result.get("backbone") == cfg.backbone.name
            and result.get("output_stride") == cfg.backbone.output_stride
            and result.get("data_root") == data_root
            and Path(result.get("best_ckpt") or "").is_file()
        ):
            found.append((Path(result["best_ckpt"]).stat().st_mtime, result["best_ckpt"]))
    if not found:
        raise UserError(
            f"no finished stage-1 run for backbone={cfg.backbone.name} data={cfg.data.name} under "
            f"{root}: run `python -m kalm_lightning.train stage=1 backbone={cfg.backbone.name} "
            f"data={cfg.data.name}` first, or set stage.global_ckpt=PATH"
        )
    return max(found)[1]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """ckpt_path: null, last (this run directory's last.ckpt, also what a requeued SLURM job
    continues from), or a path; checked safe to load."""
    if resumes_last(cfg.ckpt_path):
        last = last_checkpoint(run_dir)
        if last.is_file():
            log.info("Resuming from %s", last)
            read_checkpoint(str(last), mmap=True)
            return str(last)
        log.warning("ckpt_path=last: no %s yet, starting this stage from scratch", last)
        return None
    if cfg.ckpt_path in (None, ""):
        return None
    if not Path(cfg.ckpt_path).is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist")
    read_checkpoint(str(cfg.ckpt_path), mmap=True)  # refused here, on the main process, if unsafe
    return str(cfg.ckpt_path)


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> pl.Trainer:
    """The Trainer from cfg.trainer (its numbers were checked when cfg was composed: settings.py);
    a setting Lightning refuses ends the run with one line."""
    try:
        return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except InstantiationException as error:
        cause = error.__cause__ or error
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(f"Lightning refused the trainer settings: {first}") from error


def instantiate_all(group: DictConfig | None) -> list[Any]:
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c and "_target_" in c]


def train_stage(cfg: DictConfig, run_dir: Path) -> dict:
    """Fit one stage in run_dir; returns (and writes to result.json) where its checkpoints are."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    mean, std = backbone_normalization(cfg.backbone.name)
    datamodule = hydra.utils.instantiate(
        cfg.data, mean=mean, std=std, run_dir=str(run_dir), seed=cfg.seed
    )
    extra = {"global_ckpt": find_stage1_checkpoint(cfg)} if cfg.stage.number == 2 else {}
    model = hydra.utils.instantiate(cfg.model, **extra)
    loggers = instantiate_all(cfg.get("logger"))
    trainer = build_trainer(cfg, instantiate_all(cfg.get("callbacks")), loggers)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(
        model,
        datamodule=datamodule,
        ckpt_path=resume_checkpoint(cfg, run_dir),
        weights_only=WEIGHTS_ONLY,
    )
    callback = trainer.checkpoint_callback
    last = last_checkpoint(run_dir)
    result = {
        "stage": int(cfg.stage.number),
        "backbone": cfg.backbone.name,
        "output_stride": cfg.backbone.output_stride,
        "data": cfg.data.name,
        "data_root": str(Path(cfg.data.root).expanduser().resolve()),
        "run_dir": str(run_dir.resolve()),
        "best_ckpt": str(Path(callback.best_model_path).resolve())
        if callback and callback.best_model_path
        else None,
        "last_ckpt": str(last.resolve()) if last.is_file() else None,
        "selection_metric": cfg.model.selection_metric,
        "best_val_score": float(callback.best_model_score)
        if callback and callback.best_model_score is not None
        else None,
        "epochs": trainer.current_epoch,
    }
    if trainer.is_global_zero and not trainer.interrupted:
        # Written to a temporary name, then renamed: `auto` never reads half a file.
        partial = partial_path(run_dir / RESULT_FILE)
        partial.write_text(json.dumps(result, indent=2) + "\n")
        partial.replace(run_dir / RESULT_FILE)
    finish_wandb(loggers)
    return result


def stage2_config(global_ckpt: str, overrides: list[str]) -> DictConfig:
    """The same run as stage 2: conf/train.yaml composed again with stage=2 on a stage-1 checkpoint."""
    replaced = ("stage", "stage.global_ckpt", "pipeline")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in replaced]
    return compose_config("train", [*kept, "stage=2", f"stage.global_ckpt={global_ckpt}"])


def evaluation_config(cfg: DictConfig, ckpt_path: str) -> DictConfig:
    """conf/evaluate.yaml for a checkpoint of this run, on the data, device and precision it trained with."""
    evaluation = compose_config("evaluate")
    with open_dict(evaluation):
        evaluation.merge_with(
            {
                "ckpt_path": ckpt_path,
                # Resolved here: its interpolations (data.root under paths.data_root) are this run's.
                "data": OmegaConf.to_container(cfg.data, resolve=True),
                "device": "cuda" if cfg.trainer.accelerator == "gpu" else "cpu",
                "precision": str(cfg.trainer.precision),
                "seed": cfg.seed,
                **cfg.evaluate,
            }
        )
    return evaluation


def run_pipeline(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    """Stage 1, stage 2 on its best checkpoint, then evaluation: the demo in one command."""
    first = train_stage(cfg, run_dir / "stage1")
    if not first["best_ckpt"]:
        raise UserError(f"stage 1 in {run_dir / 'stage1'} saved no best checkpoint")
    second = train_stage(stage2_config(first["best_ckpt"], overrides), run_dir / "stage2")
    if rank_zero_only.rank != 0 or not second["best_ckpt"]:
        return second
    out = run_dir / "evaluate"
    run_evaluation(evaluation_config(cfg, second["best_ckpt"]), out)
    print(f"KALM boxes drawn in {out / 'boxes.png'}")
    return second


DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def one_ddp_job() -> Iterator[None]:
    """A multirun job's DDP ranks belong to that job alone.

    The further ranks are pointed at this job (`pin_job_for_other_ranks`); afterwards the process
    group is closed and the variables Lightning's launcher set in this process are removed, so the
    next job of the sweep starts its own ranks instead of talking to the finished job's."""
    before = {key: os.environ.get(key) for key in DDP_ENVIRONMENT}
    pin_job_for_other_ranks()
    try:
        yield
    finally:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_training(cfg: DictConfig) -> float | None:
    """The train command: print the config, then one stage or the whole pipeline."""
    if rank_zero_only.rank == 0:
        print_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    with one_ddp_job():
        result = (
            run_pipeline(cfg, run_dir, task_overrides())
            if cfg.pipeline
            else train_stage(cfg, run_dir)
        )
    return result.get("best_val_score")  # what a sweeper (Optuna) optimises
