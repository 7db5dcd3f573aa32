"""Stage 1: CNN_g alone on the whole radiograph, cross-entropy on S_g."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kalm_lightning.models.backbone import Backbone
from kalm_lightning.models.kalm import resize_view
from kalm_lightning.stages.base import OptimizerFactory, SchedulerFactory, StageModule
from kalm_lightning.studies import GLOBAL


class GlobalStage(StageModule):
    scores = (GLOBAL,)
    selection_score = GLOBAL

    def __init__(
        self,
        backbone: str,
        pretrained: bool = False,
        backbone_weights: str | None = None,
        image_size: int = 224,
        source_size: int = 448,
        channels_last: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        selection_metric: str = "image_accuracy",
        compile: bool = False,
        output_stride: int | None = None,
    ) -> None:
        super().__init__(channels_last, optimizer, scheduler, selection_metric, compile)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "compile"], logger=False)
        self.hparams["stage"] = 1
        self.image_size = image_size
        self.net = Backbone(backbone, pretrained, backbone_weights, output_stride)
        self.net.feature_size(image_size)  # refuse an input too small for the backbone, now

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(resize_view(images, self.image_size))

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {GLOBAL: self(images).float().softmax(dim=1)[:, 1]}

    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:
            return None
        loss = F.cross_entropy(self(self.prepare_images(batch["image"])).float(), batch["label"])
        self.check_finite(loss, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss
