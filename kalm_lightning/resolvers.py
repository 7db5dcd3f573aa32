"""The OmegaConf resolvers the configs use (`${kalm_run_dir:...}` and the others)."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from kalm_lightning import runs
from kalm_lightning.errors import UserError


def sweep_group(fallback: str) -> str:
    """The sweep directory's name (multirun/<timestamp>) for a multirun job, else fallback."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"
    return fallback


def training_run_dir(parent: str, ckpt: str | None = None) -> str:
    """kalm_run_dir: Hydra resolves it before the task runs, outside its one-line errors, so a
    directory that cannot be made is reported here (and the command ends)."""
    try:
        return str(runs.run_dir(Path(parent), ckpt))
    except UserError as error:
        print(f"kalm-train: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def register_resolvers() -> None:
    """Resolvers the configs use; safe to call more than once."""
    if not OmegaConf.has_resolver("kalm_run_dir"):
        # A training run's directory: new, or the one ckpt_path=last continues (runs.run_dir).
        OmegaConf.register_new_resolver("kalm_run_dir", training_run_dir, use_cache=True)
    if not OmegaConf.has_resolver("kalm_first"):
        # The first value that is set: predict's output=DIR, else its timestamped default.
        OmegaConf.register_new_resolver("kalm_first", lambda *values: next(v for v in values if v))
    if not OmegaConf.has_resolver("kalm_group"):
        # A W&B group: the sweep's name in a multirun (its jobs side by side), else the fallback.
        OmegaConf.register_new_resolver("kalm_group", sweep_group)
    if not OmegaConf.has_resolver("kalm_abspath"):
        # An absolute path (an MLflow store's URI must not depend on the working directory).
        OmegaConf.register_new_resolver(
            "kalm_abspath", lambda path: str(Path(path).expanduser().resolve())
        )
    if not OmegaConf.has_resolver("kalm_job_dir"):
        # A multirun job's directory: its swept overrides, or job<N> when a sweep varies nothing.
        OmegaConf.register_new_resolver("kalm_job_dir", lambda name, num: name or f"job{num}")
