"""What a setting accepts, for the settings whose rule needs no model code: one table.

Every composed config is checked against it once, where it is composed (`cli.hydra_entry` for the
commands, `config.compose_config` for Python), before torch, Lightning or timm are imported: a
mistyped value answers in half a second with one line. The classes that take the same values from
Python (`MURADataModule`, the stages) call `check` with the same names, so each rule is written
once. Rules that need the model (is the image large enough for this backbone?) or Lightning (is
this a precision?) are checked where those are built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from kalm_lightning.errors import check_choice, check_number

RESIZE_MODES = ("stretch", "pad")  # how a radiograph becomes a square (geometry.fit_geometry)
ON_PROBLEM = ("error", "skip")  # data.on_missing, data.on_bad_image


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
    "model.optimizer.lr": Number(0, exclusive_minimum=True),
    "model.optimizer.weight_decay": Number(0),
    # Trainer settings Lightning checks late (a ZeroDivisionError mid-fit) or not at all.
    "trainer.max_epochs": Number(-1, integer=True),  # -1: no limit
    "trainer.accumulate_grad_batches": Number(1, integer=True),
    "trainer.log_every_n_steps": Number(1, integer=True),
    "trainer.check_val_every_n_epoch": Number(1, integer=True),
    "trainer.num_nodes": Number(1, integer=True),
    "trainer.gradient_clip_val": Number(0),
}


def check(setting: str, value: object) -> None:
    """Refuse a value that setting does not accept, with one line naming both."""
    RULES[setting](setting, value)


def check_config(cfg: DictConfig) -> None:
    """Check every setting of the table that cfg holds; null means the library's default."""
    for setting, rule in RULES.items():
        value = OmegaConf.select(cfg, setting, default=None)
        if value is not None:
            rule(setting, value)
