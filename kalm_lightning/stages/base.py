"""What both training stages share: the network built from its config node, the preprocessing it
carries into every checkpoint, the optimiser and schedule from config, study-level validation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kalm_lightning.errors import UserError, check_choice
from kalm_lightning.evaluation.metrics import NAMES, StudyMetrics
from kalm_lightning.evaluation.studies import GLOBAL
from kalm_lightning.models.backbone import Backbone
from kalm_lightning.models.preprocessing import Preprocessing
from kalm_lightning.settings import check
from kalm_lightning.training.checkpoints import CHECKPOINT_FORMAT

SELECTION_METRICS = tuple(f"{level}_{name}" for level in ("image", "study") for name in NAMES)
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
PREPROCESSING = {"image_size": 224, "source_size": 448, "resize": "stretch"}  # the paper's
LR_SCHEDULE = {"interval": "epoch", "frequency": 1, "monitor": "val/selection"}


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


class StageModule(pl.LightningModule):
    """A stage names its scores (e.g. global, local, kalm) and which one selects checkpoints."""

    stage: int = 0
    scores: tuple[str, ...] = (GLOBAL,)
    selection_score: str = GLOBAL

    def __init__(
        self,
        channels_last: bool = False,
        optimizer: OptimizerFactory | Mapping | None = None,
        scheduler: SchedulerFactory | Mapping | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
        selection_metric: str = "image_accuracy",
        compile: bool = False,
    ) -> None:
        super().__init__()
        optimizer, scheduler = factory(optimizer), factory(scheduler)
        check_optimizer(optimizer)
        check_choice("model.selection_metric", selection_metric, SELECTION_METRICS)
        self.selection_metric = selection_metric
        self.channels_last, self.compile_net = channels_last, compile
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.lr_schedule = {**LR_SCHEDULE, **plain(lr_schedule or {})}
        self.val_metrics = nn.ModuleDict({name: StudyMetrics() for name in self.scores})

    def carry(self, preprocessing: Mapping[str, Any], backbone: Backbone) -> None:
        """Record the preprocessing (sizes and resize as configured, normalisation from the
        backbone's pretrained_cfg unless given) and the format in the hyper-parameters, so that
        every checkpoint carries them."""
        given = plain(preprocessing)
        mean, std = backbone.normalization
        self.preprocessing = Preprocessing.from_dict(
            {**PREPROCESSING, "mean": mean, "std": std, "in_chans": 3, **given}
        )
        self.hparams["preprocessing"] = self.preprocessing.to_dict()
        self.hparams["stage"] = self.stage
        self.hparams["format"] = CHECKPOINT_FORMAT

    @property
    def backbone_name(self) -> str:
        raise NotImplementedError

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )

    def configure_model(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_net and not getattr(self, "_compiled", False):
            # model.compile: torch.compile in place (nn.Module.compile), so checkpoints keep their keys.
            self.net.compile()
            self._compiled = True

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Abnormal probabilities per score name, plus anything else worth keeping (e.g. boxes)."""
        raise NotImplementedError

    def check_finite(self, loss: torch.Tensor, batch: dict) -> None:
        """Stop at the first NaN or Inf loss, naming the step and the batch's images; the
        checkpoints saved before it stay as they are."""
        if torch.isfinite(loss.detach()).all():
            return
        ids = batch["image_id"].tolist()
        datamodule = getattr(self.trainer, "datamodule", None)
        paths = [datamodule.dataset("train").paths[i] for i in ids] if datamodule else ids
        shown = ", ".join(map(str, paths[:3])) + (
            f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        )
        raise UserError(
            f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
            f"the batch held {shown}. The last good checkpoints are kept; lower model.optimizer.lr "
            "or check those images"
        )

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:
            return
        outputs = self.score(self.prepare_images(batch["image"]))
        for name in self.scores:
            self.val_metrics[name].update(
                outputs[name],
                batch["label"],
                batch["image_id"],
                batch["study_id"],
                batch["body_part"],
            )
        self.on_validation_outputs(batch, outputs, batch_idx)

    def on_validation_outputs(self, batch: dict, outputs: dict, batch_idx: int) -> None:
        """Hook for stage-specific use of validation outputs (stage 2 keeps boxes to draw)."""

    def on_validation_epoch_end(self) -> None:
        logged = {}
        for name in self.scores:
            result = self.val_metrics[name].compute()
            self.val_metrics[name].reset()
            for level in ("image", "study"):
                for metric in NAMES:
                    logged[f"val/{name}/{level}_{metric}"] = result[level][metric]
        # Figures are already global (gathered across processes): no further reduction.
        self.log_dict(
            {k: torch.tensor(v, dtype=torch.float32) for k, v in logged.items()}, sync_dist=False
        )
        # The paper selects checkpoints by image-level accuracy; model.selection_metric may choose
        # a study-level figure instead. Both of the stage's selection score (CNN_g, or KALM).
        chosen = {
            "val/image_acc": logged[f"val/{self.selection_score}/image_accuracy"],
            "val/selection": logged[f"val/{self.selection_score}/{self.selection_metric}"],
        }
        self.log_dict(
            {k: torch.tensor(v, dtype=torch.float32) for k, v in chosen.items()},
            prog_bar=True,
            sync_dist=False,
        )

    def parameter_groups(self) -> list[dict]:
        """What the optimiser trains: every parameter that requires a gradient, in one group."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise UserError("model.optimizer is not set: training needs an optimiser config")
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        # lr_schedule: Lightning's scheduler settings; `monitor` is what ReduceLROnPlateau reads
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), **self.lr_schedule},
        }
