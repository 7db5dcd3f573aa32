"""Config nodes into a stage's pieces: plain data for its checkpoint, the optimiser and scheduler
factories, and the `_target_` a stage accepts for its network."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from kalm_lightning.errors import UserError
from kalm_lightning.settings import check

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def plain(node: Any) -> Any:
    """A config node as plain dicts and lists (what a checkpoint can hold)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) else node


def factory(node: Any) -> Any:
    """An optimiser or scheduler: a `_partial_: true` config node is instantiated into the
    partial (the model node is instantiated without recursion, so its `net` stays a node)."""
    if isinstance(node, (DictConfig, Mapping)):
        return hydra.utils.instantiate(node)
    return node


def check_target(node: Mapping[str, Any], expected: type, setting: str) -> dict[str, Any]:
    """The node's options, refusing a `_target_` other than the class the stage builds."""
    target = node.get("_target_")
    names = {
        f"{expected.__module__}.{expected.__qualname__}",
        f"kalm_lightning.models.{expected.__name__}",
    }
    if target is not None and target not in names:
        raise UserError(f"{setting}._target_={target}: this stage builds {sorted(names)[0]}")
    return {k: v for k, v in node.items() if not k.startswith("_")}


def check_optimizer(optimizer: OptimizerFactory | None) -> None:
    """Refuse a learning rate or weight decay that cannot train, when the module is built."""
    keywords = getattr(optimizer, "keywords", {})
    for name in ("lr", "weight_decay"):
        if name in keywords:
            check(f"model.optimizer.{name}", keywords[name])
