"""Where the Hydra configs live, their groups, and composing (and printing) a config."""

from __future__ import annotations

import re
from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from kalm_lightning.resolvers import register_resolvers
from kalm_lightning.settings import check_config, config_dir, group_choices

GROUPS = (
    "backbone",
    "stage",
    "localizer",
    "scheduler",
    "data",
    "hardware",
    "logger",
    "experiment",
    "trainer",
    "callbacks",
    "debug",
    "hparams_search",
)


def quote_numeric_choices(argv: list[str]) -> list[str]:
    """`stage=2` -> `stage='2'`: Hydra parses a bare 2 as an int, which it refuses as a group option."""
    quoted = []
    for arg in argv:
        match = re.fullmatch(r"((?:\+{1,2})?(\w+))=(\d+(?:,\d+)*)", arg)
        if match and match.group(2) in GROUPS:
            arg = f"{match.group(1)}=" + ",".join(f"'{v}'" for v in match.group(3).split(","))
        quoted.append(arg)
    return quoted


def variant(cfg: DictConfig) -> str:
    """How a run's model departs from the paper's, as overrides ("" for the paper's KALM): the
    localizer (its group choice, then each option that differs from that choice's YAML), CNN_l's
    start and the backbone's output stride."""
    node = OmegaConf.to_container(cfg.get("localizer") or {}, resolve=True)
    changed = []
    for name in group_choices("localizer"):
        defaults = OmegaConf.to_container(
            OmegaConf.load(config_dir() / "localizer" / f"{name}.yaml")
        )
        if defaults.get("_target_") == node.get("_target_"):
            if name != "kalm":
                changed.append(f"localizer={name}")
            changed += [f"{k}={v}" for k, v in node.items() if defaults.get(k, v) != v]
            break
    else:
        changed.append(f"localizer._target_={node.get('_target_')}")
    if cfg.stage.get("local_init", "backbone") != "backbone":
        changed.append(f"local_init={cfg.stage.local_init}")
    if cfg.backbone.get("output_stride"):
        changed.append(f"output_stride={cfg.backbone.output_stride}")
    return " ".join(changed)


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
    from rich.console import Console
    from rich.syntax import Syntax

    text = OmegaConf.to_yaml(cfg, resolve=True)
    Console(stderr=False).print(Syntax(text, "yaml", theme="ansi_dark", word_wrap=True))


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
