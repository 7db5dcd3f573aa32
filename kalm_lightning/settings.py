"""What a setting accepts, for the settings whose rule needs no model code: one table.

Every composed config is checked against it once, where it is composed (`cli.hydra_entry` for the
commands, `config.compose_config` for Python), before torch, Lightning or timm are imported: a
mistyped value answers in half a second with one line. The classes that take the same values from
Python (`MURADataModule`, the stages) call `check` with the same names, so each rule is written
once. Rules that need the model (is the image large enough for this backbone?) or Lightning (is
this a precision?) are checked where those are built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kalm_lightning.errors import UserError, check_choice, check_number

RESIZE_MODES = ("stretch", "pad")  # how a radiograph becomes a square (geometry.fit_geometry)
ON_PROBLEM = ("error", "skip")  # data.on_missing, data.on_bad_image
AGGREGATIONS = ("mean", "max")  # a study's probability from its images'; mean is the paper's
TTA = ("none", "hflip")  # test-time augmentation: hflip averages each image with its mirror
# What evaluate scores: MURA valid (the paper's test set), train, or the hold-out of train that a
# training run selected on (its patients recorded in the checkpoint)
SCORED_SPLITS = {"valid": "test", "train": "train", "holdout": "val"}  # -> the DataModule's part


def config_dir() -> Path:
    """The config folder: packaged as kalm_lightning.conf when installed, else the checkout's conf/."""
    spec = importlib.util.find_spec("kalm_lightning.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "conf"


def group_choices(group: str) -> list[str]:
    """The config names available in a group, e.g. ['inception_v4', 'resnet18', 'vgg16']."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@dataclass(frozen=True)
class Number:
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    exclusive_minimum: bool = False

    def __call__(self, setting: str, value: object) -> None:
        check_number(
            setting, value, self.minimum, self.maximum, self.integer, self.exclusive_minimum
        )


@dataclass(frozen=True)
class Choice:
    choices: Iterable[object]

    def __call__(self, setting: str, value: object) -> None:
        check_choice(setting, value, self.choices)


RULES = {
    "data.image_size": Number(1, integer=True),
    "data.source_size": Number(1, integer=True),
    "data.batch_size": Number(1, integer=True),
    "data.num_workers": Number(0, integer=True),
    "data.resize": Choice(RESIZE_MODES),
    "data.on_missing": Choice(ON_PROBLEM),
    "data.on_bad_image": Choice(ON_PROBLEM),
    "data.synthetic.cue": Number(0, 1),
    "data.synthetic.decoys": Number(0, integer=True),
    "data.synthetic.attribute": Number(0),
    "data.synthetic.blob_size": Number(0.05, 0.6),
    "data.synthetic.texture_amplitude": Number(0.01, 0.4),  # or null
    "model.optimizer.lr": Number(0, exclusive_minimum=True),
    "model.selection_from_epoch": Number(0, integer=True),
    "model.loss.label_smoothing": Number(0, 1),
    "model.optimizer.weight_decay": Number(0),
    # Trainer settings Lightning checks late (a ZeroDivisionError mid-fit) or not at all.
    "trainer.max_epochs": Number(-1, integer=True),  # -1: no limit
    "trainer.accumulate_grad_batches": Number(1, integer=True),
    "trainer.log_every_n_steps": Number(1, integer=True),
    "trainer.check_val_every_n_epoch": Number(1, integer=True),
    "trainer.num_nodes": Number(1, integer=True),
    "trainer.gradient_clip_val": Number(0),
    "hardware.timeout_s": Number(1),
    # evaluate and predict (and the evaluation that ends a training run)
    "study_aggregation": Choice(AGGREGATIONS),
    "tta": Choice(TTA),
    "evaluate.study_aggregation": Choice(AGGREGATIONS),
    "evaluate.tta": Choice(TTA),
    "split": Choice(SCORED_SPLITS),
    "inference": Choice(("mil",)),  # null: the localizer's own box
    # serve
    "port": Number(1, 65535, integer=True),
    "max_batch_size": Number(1, integer=True),
    "batch_timeout": Number(0),
    "max_upload_mb": Number(0, exclusive_minimum=True),
    "timeout_s": Number(0, exclusive_minimum=True),
    "dicom.port": Number(1, 65535, integer=True),
}


def blob_regime(cue: float | None, decoys: int, attribute: float) -> None:
    """Decoys and the attribute are blobs' properties: they need a blob contrast (data/blobs.py)."""
    if cue is None and (decoys or attribute):
        raise UserError(
            f"data.synthetic.decoys={decoys} and data.synthetic.attribute={attribute} need "
            "data.synthetic.cue=c (the blobs' contrast, 0 to 1)"
        )


def serving(cfg: DictConfig) -> None:
    """The serve command's extras are installed, and its DICOM node has where to write."""
    if importlib.util.find_spec("litserve") is None:
        raise UserError("serve needs the serve extra: pip install 'kalm-lightning[serve]'")
    if OmegaConf.select(cfg, "dicom.port", default=None) is not None:
        if (
            importlib.util.find_spec("pynetdicom") is None
            or importlib.util.find_spec("highdicom") is None
        ):
            raise UserError(
                "dicom.port needs the DICOM node's packages: pip install 'kalm-lightning[serve,dicom]'"
            )
        if not OmegaConf.select(cfg, "dicom.output", default=None):
            raise UserError("dicom.port needs dicom.output=DIR, where its structured reports go")


def check(setting: str, value: object) -> None:
    """Refuse a value that setting does not accept, with one line naming both."""
    RULES[setting](setting, value)


def check_config(cfg: DictConfig) -> None:
    """Check every setting of the table that cfg holds (null means the library's default), and
    that a hyper-parameter search runs on the stage whose settings it searches."""
    for setting, rule in RULES.items():
        value = OmegaConf.select(cfg, setting, default=None)
        if value is not None:
            rule(setting, value)
    synthetic = OmegaConf.select(cfg, "data.synthetic", default=None)
    if synthetic is not None:
        blob_regime(synthetic.get("cue"), synthetic.get("decoys", 0), synthetic.get("attribute", 0))
    rule = OmegaConf.select(cfg, "model.operating_point.rule", default="fixed=0.5")
    temperature = OmegaConf.select(cfg, "model.operating_point.temperature", default=False)
    held_out = OmegaConf.select(cfg, "data.val_from_train", default=0) or 0
    if (temperature or not str(rule).startswith("fixed=")) and not held_out:
        raise UserError(
            f"model.operating_point (rule={rule}, temperature={temperature}) is fitted on the "
            "validation split, which is the split reported (MURA valid) unless data.val_from_train "
            "> 0: set data.val_from_train=0.1 (a patient-disjoint hold-out of train)"
        )
    if OmegaConf.select(cfg, "split", default=None) == "holdout" and OmegaConf.select(
        cfg, "predictions", default=None
    ):
        raise UserError(
            "split=holdout scores the hold-out of train a checkpoint records (ckpt_path=CKPT); "
            "a predictions CSV records none: score it with split=valid or split=train"
        )
    if OmegaConf.select(cfg, "stage.cache_global", default=False):
        augment = OmegaConf.select(cfg, "data.augment", default=None) or {}
        on = [f"data.augment.{key}={value}" for key, value in augment.items() if value]
        if on:
            off = " ".join(f"{setting.split('=')[0]}=0" for setting in on)
            raise UserError(
                f"stage.cache_global=true computes CNN_g's outputs once per image, but "
                f"{' and '.join(on)} change{'s' if len(on) == 1 else ''} CNN_g's input in every "
                f"epoch: set {off}, or "
                "stage.cache_global=false"
            )
    loggers = OmegaConf.select(cfg, "logger", default=None) or {}
    targets = {str(node.get("_target_", "")) for node in loggers.values() if node}
    if any(t.endswith("MLFlowLogger") for t in targets) and not importlib.util.find_spec("mlflow"):
        raise UserError(
            "logger=mlflow needs the mlflow extra: pip install 'kalm-lightning[mlflow]'"
        )
    if OmegaConf.select(cfg, "task_name", default=None) == "serve":
        serving(cfg)
    searched = OmegaConf.select(cfg, "hparams_search.stage", default=None)
    stage = OmegaConf.select(cfg, "stage.number", default=None)
    if searched is not None and stage is not None and searched != stage:
        name = OmegaConf.select(cfg, "hparams_search.name", default="the search")
        raise UserError(
            f"hparams_search={name} searches stage {searched} (the localizer and CNN_l on a "
            f"trained stage 1), not stage={stage}: leave stage out, or give your own "
            "hydra.sweeper.params for stage 1 without hparams_search"
        )
