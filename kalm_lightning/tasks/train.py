"""The train command: one training stage, or the demo's chain of stage 1, stage 2 and evaluation, from a composed config."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from kalm_lightning import runs
from kalm_lightning.errors import Preempted, UserError
from kalm_lightning.settings import group_choices
from kalm_lightning.training.checkpoints import WEIGHTS_ONLY, read_trained
from kalm_lightning.training.loggers import finish_wandb, log_files

log = logging.getLogger(__name__)


def data_root(cfg: DictConfig) -> str:
    return str(Path(cfg.data.root).expanduser().resolve())


def find_stage1_checkpoint(cfg: DictConfig) -> str:
    """stage.global_ckpt: a path, or auto = the newest best stage-1 checkpoint for this backbone and data."""
    wanted = cfg.stage.global_ckpt
    if wanted not in (None, "auto"):
        if not Path(wanted).is_file():
            raise UserError(f"stage.global_ckpt={wanted} does not exist")
        return str(wanted)
    root = Path(cfg.paths.output_root)
    found = runs.newest_stage1(root, cfg.backbone.name, cfg.backbone.output_stride, data_root(cfg))
    if found is None:
        name = cfg.backbone.name  # a config of the backbone group, or any timm model by its name
        backbone = (
            f"backbone={name}" if name in group_choices("backbone") else f"backbone.name={name}"
        )
        raise UserError(
            f"no finished stage-1 run for {backbone} data={cfg.data.name} under {root}: run "
            f"`python -m kalm_lightning.train stage=1 {backbone} data={cfg.data.name}` first, or "
            "set stage.global_ckpt=PATH"
        )
    return found


def resume_checkpoint(cfg: DictConfig, run: runs.Run) -> str | None:
    """ckpt_path: null, last (this run directory's last.ckpt, also what a requeued SLURM job
    continues from), or a path; checked safe to load, on the main process."""
    if runs.resumes_last(cfg.ckpt_path):
        last = run.last_checkpoint
        if last.is_file():
            log.info("Resuming from %s", last)
            return continuable(str(last))
        log.warning("ckpt_path=last: no %s yet, starting this stage from scratch", last)
        return None
    if cfg.ckpt_path in (None, ""):
        return None
    if not Path(cfg.ckpt_path).is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist")
    return continuable(str(cfg.ckpt_path))


def continuable(path: str) -> str:
    """path, refused in one line if it is unsafe, from an older version, or holds the weights
    alone (no optimiser state to continue from: `drop_training_state`, save_weights_only)."""
    if "optimizer_states" not in read_trained(path):
        raise UserError(
            f"ckpt_path={path} holds the weights alone (no optimiser state), so training cannot "
            "continue from it: evaluate, predict or export it, or start a new run from it "
            "(stage.global_ckpt= for a stage-1 file, stage.local_init= for a stage-2 one)"
        )
    return path


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
    run = runs.Run(run_dir)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    extra = {"global_ckpt": find_stage1_checkpoint(cfg)} if cfg.stage.number == 2 else {}
    model = hydra.utils.instantiate(cfg.model, **extra)
    normalization = model.preprocessing
    datamodule = hydra.utils.instantiate(
        cfg.data,
        mean=normalization.mean,
        std=normalization.std,
        run_dir=str(run_dir),
        seed=cfg.seed,
    )
    loggers = instantiate_all(cfg.get("logger"))
    exit_code = 1
    try:
        trainer = build_trainer(cfg, instantiate_all(cfg.get("callbacks")), loggers)
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            runs.write_atomic(run.config_file, OmegaConf.to_yaml(cfg, resolve=True))
            for logger in loggers:
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            log_files(loggers, [run.config_file])
        with warnings.catch_warnings():
            for message in model.expected_warnings:  # what the stage causes on purpose
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(
                model,
                datamodule=datamodule,
                ckpt_path=resume_checkpoint(cfg, run),
                weights_only=WEIGHTS_ONLY,
            )
        exit_code = 0
    except Preempted as stop:
        exit_code = stop.exit_code
        raise
    finally:
        finish_wandb(loggers, exit_code)  # a crashed or stopped run is marked so, never left open
    callback = trainer.checkpoint_callback
    result = {
        "stage": int(cfg.stage.number),
        "backbone": cfg.backbone.name,
        "output_stride": cfg.backbone.output_stride,
        "data": cfg.data.name,
        "data_root": data_root(cfg),
        "run_dir": str(run_dir.resolve()),
        "best_ckpt": str(Path(callback.best_model_path).resolve())
        if callback and callback.best_model_path
        else None,
        "last_ckpt": str(run.last_checkpoint.resolve()) if run.last_checkpoint.is_file() else None,
        "selection_metric": cfg.model.selection_metric,
        "best_val_score": float(callback.best_model_score)
        if callback and callback.best_model_score is not None
        else None,
        "epochs": trainer.current_epoch,
    }
    if trainer.is_global_zero and not trainer.interrupted:
        run.write_result(result)  # atomically: `auto` never reads half a file
    return result
