"""Where the Hydra configs live, the resolvers they use, and checks made before Hydra starts."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from rich.console import Console
from rich.syntax import Syntax

from kalm_lightning.settings import check_config

GROUPS = (
    "backbone",
    "stage",
    "data",
    "hardware",
    "logger",
    "experiment",
    "trainer",
    "callbacks",
    "debug",
    "hparams_search",
)


def config_dir() -> Path:
    """The config folder: packaged as kalm_lightning.conf when installed, else the checkout's conf/."""
    spec = importlib.util.find_spec("kalm_lightning.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "conf"


def group_choices(group: str) -> list[str]:
    """The config names available in a group, e.g. ['inception_v4', 'resnet18', 'vgg16']."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def check_group_overrides(argv: list[str]) -> str | None:
    """Return one line naming the valid choices when an override picks an unknown group option."""
    for arg in argv:
        match = re.fullmatch(r"(?:\+{1,2})?(\w+)=(.*)", arg)
        if not match or match.group(1) not in GROUPS or "(" in match.group(2):
            continue
        group, values = match.groups()
        choices = group_choices(group)
        # a sweep (a,b) or several options of one group ([csv,wandb]): each must exist
        for value in (v.strip("'\" []") for v in values.split(",")):
            if value not in choices and value not in ("null", ""):
                hint = (
                    " (or any timm model through backbone.name=...)" if group == "backbone" else ""
                )
                return f"unknown {group} '{value}': choose one of {', '.join(choices)}{hint}"
    return None


def requeued() -> bool:
    """True in a SLURM job that was requeued: it continues its run as if ckpt_path=last."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resumes_last(ckpt_path: str | None) -> bool:
    """Whether a run continues the newest run directory's last.ckpt."""
    return ckpt_path == "last" or (ckpt_path in (None, "") and requeued())


def newest_run_dir(parent: Path, ckpt_path: str | None) -> Path:
    """A new timestamped run directory, or with ckpt_path=last (and in a requeued SLURM job) the
    newest one holding last.ckpt."""
    if resumes_last(ckpt_path):
        lasts = [(p.stat().st_mtime, p) for p in parent.glob("*/**/checkpoints/last.ckpt")]
        if lasts:
            newest = max(lasts)[1]
            return parent / newest.relative_to(parent).parts[0]
    return claim_dir(parent, datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def claim_dir(parent: Path, name: str) -> Path:
    """Create parent/name, or name_2, name_3 ... when another run took it: two runs started in the
    same second never share a directory (mkdir is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = parent / (name if n == 1 else f"{name}_{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory named {name}* under {parent}")


def sweep_group(fallback: str) -> str:
    """The sweep directory's name (multirun/<timestamp>) for a multirun job, else fallback."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"
    return fallback


def register_resolvers() -> None:
    """Resolvers the configs use; safe to call more than once."""
    if not OmegaConf.has_resolver("kalm_run_dir"):
        OmegaConf.register_new_resolver(
            "kalm_run_dir",
            lambda parent, ckpt=None: str(newest_run_dir(Path(parent), ckpt)),
            use_cache=True,
        )
    if not OmegaConf.has_resolver("kalm_first"):
        # The first value that is set: predict's output=DIR, else its timestamped default.
        OmegaConf.register_new_resolver("kalm_first", lambda *values: next(v for v in values if v))
    if not OmegaConf.has_resolver("kalm_group"):
        # A W&B group: the sweep's name in a multirun (its jobs side by side), else the fallback.
        OmegaConf.register_new_resolver("kalm_group", sweep_group)
    if not OmegaConf.has_resolver("kalm_job_dir"):
        # A multirun job's directory: its swept overrides, or job<N> when a sweep varies nothing.
        OmegaConf.register_new_resolver("kalm_job_dir", lambda name, num: name or f"job{num}")


def quote_numeric_choices(argv: list[str]) -> list[str]:
    """`stage=2` -> `stage='2'`: Hydra parses a bare 2 as an int, which it refuses as a group option."""
    quoted = []
    for arg in argv:
        match = re.fullmatch(r"((?:\+{1,2})?(\w+))=(\d+(?:,\d+)*)", arg)
        if match and match.group(2) in GROUPS:
            arg = f"{match.group(1)}=" + ",".join(f"'{v}'" for v in match.group(3).split(","))
        quoted.append(arg)
    return quoted


HYDRA_VALUED_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--info",
    "-i",
}
SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(", "shuffle(", "sort(")


def name_jobs_by_swept_overrides(argv: list[str]) -> list[str]:
    """In a multirun, name each job's directory by what the sweep varies, not every override."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    fixed = []
    for previous, arg in zip(["", *argv], argv, strict=False):
        match = re.fullmatch(r"[~+]*([\w.@/-]+)(?:=(.*))?", arg)
        if previous in HYDRA_VALUED_FLAGS or arg.startswith("-") or not match:
            continue  # a flag, or a flag's value such as `--cfg job`
        if match.group(1).startswith("hydra."):
            continue
        value = match.group(2) or ""
        swept = ("," in value and not value.startswith(("[", "{"))) or value.startswith(
            SWEEP_FUNCTIONS
        )
        if not swept:
            fixed.append(match.group(1))
    if not fixed:
        return argv
    keys = ",".join(f"'{key}'" for key in fixed)
    return [*argv, f"hydra.job.config.override_dirname.exclude_keys=[{keys}]"]


def prepare_argv(program: str) -> None:
    """Prepare argv for Hydra, stopping with one line for an unknown group value (before Hydra's report)."""
    sys.argv[1:] = name_jobs_by_swept_overrides(quote_numeric_choices(sys.argv[1:]))
    message = check_group_overrides(sys.argv[1:])
    if message:
        print(f"{program}: {message}", file=sys.stderr)
        raise SystemExit(2)


def pin_job_for_other_ranks() -> None:
    """In a multirun, make DDP's further ranks join this job instead of re-running the sweep.

    Lightning starts each further rank as `python -m kalm_lightning.train <sys.argv[1:]>
    hydra.run.dir=<HydraConfig run.dir>`. In a multirun that argv is the whole sweep (`-m seed=1,2`),
    so each rank ran every job again in a sweep directory of its own. The ranks get this job's own
    overrides and its own directory instead."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra_cfg = HydraConfig.get()
    sys.argv[1:] = quote_numeric_choices(list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def task_overrides() -> list[str]:
    """The command line's overrides of the running Hydra job (a multirun job's own), else none."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """conf/<name>.yaml composed by Hydra with overrides, inside a running Hydra app or outside
    one, and its settings checked (settings.py)."""
    register_resolvers()
    overrides = quote_numeric_choices(list(overrides))
    if GlobalHydra.instance().is_initialized():
        cfg = compose(name, overrides=overrides)
    else:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose(name, overrides=overrides)
    check_config(cfg)
    return cfg


def print_config(cfg: DictConfig) -> None:
    """The resolved config as highlighted YAML."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    Console(stderr=False).print(Syntax(text, "yaml", theme="ansi_dark", word_wrap=True))
