"""Stage 1: CNN_g alone on the whole radiograph, cross-entropy on S_g."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kalm_lightning.evaluation.studies import GLOBAL
from kalm_lightning.models.backbone import Backbone
from kalm_lightning.models.cam import global_heatmap
from kalm_lightning.models.kalm import resize_view
from kalm_lightning.stages.base import StageModule
from kalm_lightning.stages.nodes import check_target


class GlobalStage(StageModule):
    """net: the backbone's config node (`conf/backbone/*.yaml`: name, pretrained,
    checkpoint_path, output_stride); preprocessing: image_size, source_size, resize (`data.*`)."""

    stage = 1
    scores = (GLOBAL,)
    selection_score = GLOBAL

    def __init__(
        self, net: Mapping[str, Any], preprocessing: Mapping[str, Any], **options: Any
    ) -> None:
        super().__init__(net, preprocessing, **options)
        self.net = Backbone(**check_target(self.hparams["net"], Backbone, "model.net"))
        self.carry(self.hparams["preprocessing"], self.net)
        self.net.feature_size(self.preprocessing.image_size)  # refuse an input too small, now

    @property
    def backbone_name(self) -> str:
        return self.net.name

    @staticmethod
    def offline(net: Mapping[str, Any]) -> dict[str, Any]:
        """The net node without weights to fetch: a checkpoint holds them."""
        return {**net, "pretrained": False, "checkpoint_path": None}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(resize_view(images, self.preprocessing.image_size))

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {GLOBAL: self(images).float().softmax(dim=1)[:, 1]}

    def heatmaps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """CNN_g's class activation map [B, S, S] of source images (models/cam.py)."""
        return {GLOBAL: global_heatmap(self.net, images, self.preprocessing.image_size)}

    def training_loss(
        self, batch: dict, epoch: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage 1's loss on a batch: cross-entropy of S_g (nothing else to log)."""
        logits = self(self.prepare_images(batch["image"]))
        return self.classification_loss(logits, batch["label"], batch["body_part"]), {}
