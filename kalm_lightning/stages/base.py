"""What both training stages share: the network built from its config node, the preprocessing it
carries into every checkpoint, the optimiser and schedule from config, study-level validation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.data.index import BODY_PARTS
from kalm_lightning.errors import UserError, check_choice
from kalm_lightning.evaluation.metrics import NAMES, StudyMetrics
from kalm_lightning.evaluation.operating import (
    calibrate,
    check_rule,
    choose_threshold,
    fit_temperature,
)
from kalm_lightning.evaluation.studies import GLOBAL, THRESHOLD, study_means
from kalm_lightning.models.backbone import Backbone
from kalm_lightning.models.preprocessing import Preprocessing
from kalm_lightning.settings import check
from kalm_lightning.stages.loss import (
    CLASS_WEIGHTS,
    body_part_codes,
    check_finite,
    class_weights,
)
from kalm_lightning.stages.nodes import (
    OptimizerFactory,
    SchedulerFactory,
    check_optimizer,
    factory,
    plain,
)
from kalm_lightning.training.checkpoints import CHECKPOINT_FORMAT

# The checkpoint kept: the best epoch by one of these; val/selection is a log-loss negated.
SELECTION_METRICS = tuple(f"{lv}_{m}" for lv in ("image", "study") for m in (*NAMES, "log_loss"))
PREPROCESSING = {"image_size": 224, "source_size": 448, "resize": "stretch"}  # the paper's
# model.operating_point: how the decision threshold (and a temperature) are chosen, on the
# validation split, which must then be a hold-out of train (settings.py refuses otherwise).
OPERATING_POINT = {"rule": "fixed=0.5", "temperature": False}
# model.loss: MURA's baseline weights per body part (w_abnormal = N / (A + N)), or balanced
# overall; label smoothing. The paper's loss is plain cross-entropy.
LOSS = {"class_weights": None, "label_smoothing": 0.0}
LR_SCHEDULE = {"interval": "epoch", "frequency": 1, "monitor": "val/selection"}


class StageModule(pl.LightningModule):
    """A stage names its scores (e.g. global, local, kalm) and which one selects checkpoints.

    Every stage is `Stage(net, preprocessing, **options)`: `net`, its network's config node;
    `preprocessing`, the sizes and resize mode it carries into its checkpoints; the options below,
    shared by all stages and handled here once. The arguments are recorded as hyper-parameters
    (as plain dicts: a checkpoint holds no config object), but those in `ignore`, which are built
    into the module rather than recorded. `expected_warnings`: warnings the stage causes on
    purpose, which training silences around its fit (and nowhere else)."""

    stage: int = 0
    scores: tuple[str, ...] = (GLOBAL,)
    selection_score: str = GLOBAL
    ignore: tuple[str, ...] = ("optimizer", "scheduler", "compile")
    expected_warnings: tuple[str, ...] = ()

    def __init__(
        self,
        net: Mapping[str, Any],
        preprocessing: Mapping[str, Any],
        channels_last: bool = False,
        optimizer: OptimizerFactory | Mapping | None = None,
        scheduler: SchedulerFactory | Mapping | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
        selection_metric: str = "image_accuracy",
        selection_from_epoch: int = 0,
        compile: bool = False,
        operating_point: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        **recorded: Any,
    ) -> None:
        """recorded: what a checkpoint's hyper-parameters hold besides the arguments (`stage`,
        `format`), which `load_from_checkpoint` hands back; the class's own values stand."""
        super().__init__()
        unknown = set(recorded) - {"stage", "format"}
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(unknown)}")
        self.save_hyperparameters(ignore=[*self.ignore, "recorded"], logger=False)
        for key, value in list(self.hparams.items()):
            self.hparams[key] = plain(value)
        optimizer, scheduler = factory(optimizer), factory(scheduler)
        self.operating_rule = {**OPERATING_POINT, **plain(operating_point or {})}
        check_rule(self.operating_rule["rule"])
        self.loss_options = {**LOSS, **plain(loss or {})}
        check_choice("model.loss.class_weights", self.loss_options["class_weights"], CLASS_WEIGHTS)
        check("model.loss.label_smoothing", self.loss_options["label_smoothing"])
        self.operating = {"rule": "fixed=0.5", "threshold": THRESHOLD, "temperature": 1.0}
        # The hold-out of train this stage validated on (MURADataModule.holdout), recorded in
        # its checkpoints: evaluate's split=holdout scores exactly those patients.
        self.holdout: dict[str, Any] | None = None
        self.tta = "none"  # at inference: "hflip" averages each image's scores with its mirror's
        self.register_buffer("class_weight_table", torch.ones(len(BODY_PARTS), 2), persistent=False)
        check_optimizer(optimizer)
        check_choice("model.selection_metric", selection_metric, SELECTION_METRICS)
        self.selection_metric = selection_metric
        check("model.selection_from_epoch", selection_from_epoch)
        self.selection_from_epoch = int(selection_from_epoch)
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

    def predict_step(self, batch: dict | None, batch_idx: int) -> dict[str, torch.Tensor] | None:
        """Every score of a batch's images (and their boxes, stage 2) with their ids: what
        `Trainer.predict` gives evaluate and predict. `tta="hflip"`: each score is the mean of
        the image's and its mirror's (the boxes are the image's)."""
        if batch is None:  # every image of the batch was skipped as bad
            return None
        images = self.prepare_images(batch["image"])
        outputs = {key: value.float() for key, value in self.score(images).items()}
        if self.tta == "hflip":
            mirrored = self.score(images.flip(-1))
            for name in self.scores:
                outputs[name] = (outputs[name] + mirrored[name].float()) / 2
        return {**outputs, "image_id": batch["image_id"]}

    def training_loss(
        self, batch: dict, epoch: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage's loss on a batch, and what else to log: what `training_step` optimises,
        and what the localizer study counts the FLOPs of."""
        raise NotImplementedError

    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was skipped as bad
            return None
        loss, logs = self.training_loss(batch)
        size = len(batch["label"])
        check_finite(loss, batch, self)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if logs:
            self.log_dict(logs, batch_size=size)
        return loss

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

    def on_fit_start(self) -> None:
        """model.loss.class_weights: the weights from the training split's counts."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.loss_options["class_weights"] and datamodule is not None:
            index = datamodule.dataset("train").index
            table = class_weights(index, self.loss_options["class_weights"])
            self.class_weight_table = table.to(self.device)

    def classification_loss(
        self, logits: torch.Tensor, label: torch.Tensor, body_part: Sequence[str] | torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of [N, 2] logits, weighted per body part and class and label-smoothed
        where model.loss says so (the paper's plain cross-entropy by default)."""
        smoothing = float(self.loss_options["label_smoothing"])
        if not self.loss_options["class_weights"]:
            return F.cross_entropy(logits.float(), label, label_smoothing=smoothing)
        parts = body_part_codes(body_part, self.device)
        per_image = F.cross_entropy(
            logits.float(), label, label_smoothing=smoothing, reduction="none"
        )
        return (per_image * self.class_weight_table[parts, label]).mean()

    def choose_operating_point(self) -> None:
        """The threshold (and temperature) of the selection score on this validation: what the
        checkpoint written now records (`on_save_checkpoint`)."""
        state = self.val_metrics[self.selection_score].gathered_everywhere()
        prob, label = state["prob"], state["label"]
        temperature = fit_temperature(prob, label) if self.operating_rule["temperature"] else 1.0
        studies = study_means(calibrate(prob, temperature), label, state["study_id"])
        threshold = choose_threshold(studies.prob, studies.label, self.operating_rule["rule"])
        self.operating = {
            "rule": self.operating_rule["rule"],
            "threshold": threshold,
            "temperature": temperature,
            "score": self.selection_score,
            "fitted_on": "the validation split (data.val_from_train: a hold-out of train)",
            "epoch": int(self.current_epoch),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["operating_point"] = dict(self.operating)
        holdout = getattr(self.trainer.datamodule, "holdout", None)
        self.holdout = holdout if holdout is not None else self.holdout
        checkpoint["holdout"] = self.holdout

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.operating = {**self.operating, **(checkpoint.get("operating_point") or {})}
        self.holdout = checkpoint.get("holdout")

    def on_validation_epoch_end(self) -> None:
        logged = {}
        if not self.trainer.sanity_checking:
            self.choose_operating_point()
        selection = self.selection_figure()
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
            "val/selection": selection,
        }
        self.log_dict(
            {k: torch.tensor(v, dtype=torch.float32) for k, v in chosen.items()},
            prog_bar=True,
            sync_dist=False,
        )

    def selection_figure(self) -> float:
        """What the checkpoint is kept by (higher is better), before the metrics reset: the
        selection score's `model.selection_metric`, negated for a log-loss; -inf before
        `model.selection_from_epoch` (a warm-up's epochs are kept only until a later one is)."""
        if self.current_epoch < self.selection_from_epoch:
            return -math.inf
        metrics = self.val_metrics[self.selection_score]
        level, _, name = self.selection_metric.partition("_")
        return -metrics.log_loss(level) if name == "log_loss" else metrics.compute()[level][name]

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
