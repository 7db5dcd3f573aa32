"""Stage 2: CNN_g frozen from stage 1 (BatchNorm too); fc_w, fc_h and CNN_l trained on S_l."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from kalm_lightning.checkpoints import read_checkpoint
from kalm_lightning.errors import UserError, check_number
from kalm_lightning.figures import log_box_grid
from kalm_lightning.models.backbone import Backbone
from kalm_lightning.models.kalm import KALMNet
from kalm_lightning.stages.base import OptimizerFactory, SchedulerFactory, StageModule
from kalm_lightning.studies import GLOBAL, KALM, LOCAL, SCORES

BOXES_LOGGED = 16
# CNN_g is in eval mode at the start of stage 2 on purpose (frozen BatchNorm statistics).
warnings.filterwarnings(
    "ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training"
)


class KALMStage(StageModule):
    scores = SCORES
    selection_score = KALM

    def __init__(
        self,
        backbone: str,
        pretrained: bool = False,
        backbone_weights: str | None = None,
        image_size: int = 224,
        source_size: int = 448,
        centre: str = "paper",
        local_init: str = "backbone",
        global_ckpt: str | None = None,
        channels_last: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        selection_metric: str = "image_accuracy",
        compile: bool = False,
        aggregation: str = "sum",
        temperature: float = 10.0,
        box_init: float | None = None,
        box_lr: float | None = None,
        crop: str = "kalm",
        fixed_box: float = 0.5,
        output_stride: int | None = None,
    ) -> None:
        super().__init__(channels_last, optimizer, scheduler, selection_metric, compile)
        self.save_hyperparameters(
            ignore=["optimizer", "scheduler", "global_ckpt", "compile"], logger=False
        )
        self.hparams["stage"] = 2
        if box_lr is not None:
            check_number("stage.box_lr", box_lr, 0, exclusive_minimum=True)
        # CNN_g's weights come from stage 1 and CNN_l's from the backbone config: no hub call for CNN_g.
        self.net = KALMNet(
            backbone,
            False,
            None,
            image_size,
            source_size,
            centre,
            "backbone",
            aggregation,
            temperature,
            box_init,
            crop,
            fixed_box,
            output_stride,
        )
        if local_init == "backbone" and (pretrained or backbone_weights):
            self.net.local_cnn = Backbone(backbone, pretrained, backbone_weights)
        if global_ckpt is not None:
            self.load_global(global_ckpt, backbone, output_stride)
            if local_init == "global":
                self.net.copy_global_to_local()
        # Frozen, BatchNorm statistics included. Lightning restores each submodule's recorded mode
        # rather than calling train() on this module, so eval mode must hold from the start.
        self.net.global_cnn.requires_grad_(False).eval()
        self._boxes_to_draw: dict[str, torch.Tensor] = {}

    def load_global(self, path: str, backbone: str, output_stride: int | None) -> None:
        """CNN_g from a stage-1 checkpoint, refusing one trained with another backbone or stride."""
        checkpoint = read_checkpoint(path)
        hparams = checkpoint.get("hyper_parameters", {})
        if hparams.get("stage") != 1:
            raise UserError(f"stage.global_ckpt={path} is not a stage-1 checkpoint")
        if hparams.get("backbone") != backbone:
            raise UserError(
                f"stage.global_ckpt={path} was trained with backbone "
                f"{hparams.get('backbone')}, not {backbone}"
            )
        if hparams.get("output_stride") != output_stride:
            raise UserError(
                f"stage.global_ckpt={path} was trained with backbone.output_stride="
                f"{hparams.get('output_stride')}, not {output_stride}"
            )
        weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()}
        self.net.global_cnn.load_state_dict(weights)

    def parameter_groups(self) -> list[dict]:
        """stage.box_lr: the localizer's own learning rate (fc_w, fc_h and learned channel weights)."""
        if self.hparams.box_lr is None:
            return super().parameter_groups()
        box = [p for p in self.net.localizer.parameters() if p.requires_grad]
        ids = {id(p) for p in box}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": box, "lr": self.hparams.box_lr}]

    def train(self, mode: bool = True) -> KALMStage:
        super().train(mode)
        self.net.global_cnn.eval()  # frozen: BatchNorm running statistics must not move
        return self

    def forward(self, images: torch.Tensor):
        return self.net(images)

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self(images)
        return {
            GLOBAL: out.global_prob,
            LOCAL: out.local_prob,
            KALM: out.prob,
            "boxes": out.boxes,
        }

    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:
            return None
        out = self(self.prepare_images(batch["image"]))
        loss = F.cross_entropy(out.local_logits.float(), batch["label"])
        size = len(batch["label"])
        self.check_finite(loss, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict(
            {"train/box_w": out.boxes[:, 2].mean(), "train/box_h": out.boxes[:, 3].mean()},
            batch_size=size,
        )
        return loss

    def on_validation_outputs(self, batch: dict, outputs: dict, batch_idx: int) -> None:
        if batch_idx == 0:
            self._boxes_to_draw = {
                "images": batch["image"][:BOXES_LOGGED].detach().float().cpu(),
                "boxes": outputs["boxes"][:BOXES_LOGGED].detach().float().cpu(),
                "prob": outputs[KALM][:BOXES_LOGGED].detach().cpu(),
                "label": batch["label"][:BOXES_LOGGED].cpu(),
            }

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._boxes_to_draw and self.trainer.is_global_zero:
            log_box_grid(self.loggers, self._boxes_to_draw, self.current_epoch)
        self._boxes_to_draw = {}
