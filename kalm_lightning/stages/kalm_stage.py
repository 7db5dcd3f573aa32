"""Stage 2: CNN_g frozen from stage 1 (BatchNorm too); the localizer and CNN_l trained on S_l."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from kalm_lightning.data.features import GLOBAL_FEATURES, FeatureCache, weights_digest
from kalm_lightning.data.geometry import box_to_pixels
from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.figures import box_grid, to_uint8
from kalm_lightning.evaluation.studies import GLOBAL, KALM, LOCAL, SCORES
from kalm_lightning.models.backbone import Backbone, backbone_node
from kalm_lightning.models.cam import global_heatmap, local_heatmap
from kalm_lightning.models.kalm import LOCAL_INITS, KALMNet, resize_view
from kalm_lightning.models.localizers.base import recorded
from kalm_lightning.models.preprocessing import GIVEN, Preprocessing
from kalm_lightning.stages.base import StageModule
from kalm_lightning.stages.nodes import check_target
from kalm_lightning.training.checkpoints import read_trained
from kalm_lightning.training.loggers import log_image

BOXES_LOGGED = 16
log = logging.getLogger(__name__)


def local_checkpoint(local_init: str) -> str | None:
    """The stage-2 checkpoint CNN_l starts from, where `stage.local_init` names one (not one of
    LOCAL_INITS)."""
    return None if local_init in LOCAL_INITS else local_init


def same_backbone(what: str, trained: Mapping[str, Any], backbone: Mapping[str, Any]) -> None:
    """Refuse, in one line naming `what` (SETTING=PATH), weights trained with another backbone or
    output stride than this run's."""
    for key in ("name", "output_stride"):
        if trained.get(key) != backbone.get(key):
            setting = "backbone" if key == "name" else f"backbone.{key}"
            raise UserError(
                f"{what} was trained with {setting}={trained.get(key)}, not {backbone.get(key)}"
            )


class KALMStage(StageModule):
    """net: KALMNet's config node (`backbone`: the backbone's node, `localizer`: the localizer's
    node from `conf/localizer/`, `local_init`); preprocessing as in stage 1; global_ckpt: the
    stage-1 checkpoint CNN_g comes from (None when a stage-2 checkpoint is loaded: it holds CNN_g);
    cache_global: read CNN_g's feature maps of the training images from a cache made once
    (`data/features.py`) instead of running the frozen CNN_g in every training step."""

    stage = 2
    scores = SCORES
    selection_score = KALM
    ignore = (*StageModule.ignore, "global_ckpt", "cache_global")
    # CNN_g is in eval mode at the start of stage 2 on purpose (frozen BatchNorm statistics).
    expected_warnings = (r"Found \d+ module\(s\) in eval mode at the start of training",)

    def __init__(
        self,
        net: Mapping[str, Any],
        preprocessing: Mapping[str, Any],
        global_ckpt: str | None = None,
        cache_global: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(net, preprocessing, **options)
        self.cache_global = cache_global
        net, preprocessing = self.hparams["net"], self.hparams["preprocessing"]
        built = check_target(net, KALMNet, "model.net")
        backbone = backbone_node(built["backbone"])
        # CNN_g's weights come from stage 1 (no hub call for it), CNN_l's as the backbone says.
        global_cnn = Backbone(backbone["name"], False, None, backbone.get("output_stride"))
        self.carry(preprocessing, global_cnn)
        if global_ckpt is not None:
            self.load_global(global_ckpt, global_cnn, backbone)
        size = self.preprocessing
        local_ckpt = local_checkpoint(built.get("local_init", "backbone"))
        if local_ckpt is not None:  # a stage-2 run's CNN_l: built as CNN_g's copy, then loaded
            built = {**built, "local_init": "global"}
        self.net = KALMNet(
            **built,
            image_size=size.image_size,
            source_size=size.source_size,
            global_cnn=global_cnn,
        )
        if local_ckpt is not None:
            self.load_local(local_ckpt, backbone)
        # Frozen, BatchNorm statistics included. Lightning restores each submodule's recorded mode
        # rather than calling train() on this module, so eval mode must hold from the start.
        self.net.global_cnn.requires_grad_(False).eval()
        self.run_seed = torch.initial_seed()
        self.inference: str | None = None  # "mil": evaluate's ceiling (`load_stage`)
        self._boxes_to_draw: dict[str, torch.Tensor] = {}

    @property
    def backbone_name(self) -> str:
        return self.net.global_cnn.name

    @staticmethod
    def offline(net: Mapping[str, Any]) -> dict[str, Any]:
        """The net node without weights to fetch (a checkpoint holds them), its localizer's as
        the checkpoint ran it."""
        backbone = {**backbone_node(net["backbone"]), "pretrained": False, "checkpoint_path": None}
        localizer = net.get("localizer")
        # CNN_l's weights are the checkpoint's: a stage-2 checkpoint it started from is not read.
        local_init = net.get("local_init", "backbone")
        if local_checkpoint(local_init) is not None:
            local_init = "global"
        return {
            **net,
            "backbone": backbone,
            "localizer": localizer and recorded(localizer),
            "local_init": local_init,
        }

    def load_global(self, path: str, global_cnn: Backbone, backbone: Mapping[str, Any]) -> None:
        """CNN_g from a stage-1 checkpoint, refusing one trained with another backbone, stride or
        preprocessing."""
        checkpoint = read_trained(path, "stage.global_ckpt")
        hparams = checkpoint["hyper_parameters"]
        if hparams.get("stage") != 1:
            raise UserError(f"stage.global_ckpt={path} is not a stage-1 checkpoint")
        same_backbone(f"stage.global_ckpt={path}", backbone_node(hparams["net"]), backbone)
        stage1 = Preprocessing.from_dict(hparams["preprocessing"])
        for key in GIVEN:
            if getattr(stage1, key) != getattr(self.preprocessing, key):
                raise UserError(
                    f"stage.global_ckpt={path} was trained with data.{key}="
                    f"{getattr(stage1, key)}, not {getattr(self.preprocessing, key)}: CNN_g sees "
                    "the view it was trained on"
                )
        weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()}
        global_cnn.load_state_dict(weights)

    def load_local(self, path: str, backbone: Mapping[str, Any]) -> None:
        """stage.local_init=PATH: CNN_l starts as the CNN_l of a stage-2 checkpoint (another
        localizer's, say), refusing one of another backbone or output stride."""
        setting = "stage.local_init"
        checkpoint = read_trained(path, setting)
        hparams = checkpoint["hyper_parameters"]
        if hparams.get("stage") != 2:
            raise UserError(
                f"{setting}={path} is not a stage-2 checkpoint: CNN_l starts from a stage-2 "
                "run's CNN_l (or backbone | global)"
            )
        same_backbone(f"{setting}={path}", backbone_node(hparams["net"]["backbone"]), backbone)
        prefix = "net.local_cnn."
        weights = {
            k.removeprefix(prefix): v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(prefix)
        }
        self.net.local_cnn.load_state_dict(weights)

    def parameter_groups(self) -> list[dict]:
        """localizer.lr: the localizer's own learning rate (its parameters in a group of their own)."""
        lr = self.net.localizer.lr
        if lr is None:
            return super().parameter_groups()
        box = [p for p in self.net.localizer.parameters() if p.requires_grad]
        ids = {id(p) for p in box}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": box, "lr": lr}]

    def train(self, mode: bool = True) -> KALMStage:
        super().train(mode)
        self.net.global_cnn.eval()  # frozen: BatchNorm running statistics must not move
        return self

    def forward(self, images: torch.Tensor):
        return self.net(images)

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net.mil(images) if self.inference == "mil" else self(images)
        scores = {
            GLOBAL: out.global_prob,
            LOCAL: out.local_prob,
            KALM: out.prob,
            "boxes": out.boxes,
        }
        if out.crops is not None:  # K windows read together: each with its attention weight
            scores.update(crops=out.crops, attention=out.attention)
        return scores

    def heatmaps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """CNN_g's and CNN_l's class activation maps [B, S, S] of source images (models/cam.py),
        CNN_l's inside the box the model chose."""
        boxes = self.net(images).boxes
        return {
            GLOBAL: global_heatmap(self.net.global_cnn, images, self.preprocessing.image_size),
            LOCAL: local_heatmap(self.net, images, boxes),
        }

    def on_fit_start(self) -> None:
        if self.cache_global:
            self.read_global_from_cache()

    def read_global_from_cache(self) -> None:
        """stage.cache_global: CNN_g's feature map of every training image, computed once (on
        the main process; the others wait) unless a cache of these weights, this preprocessing
        and these image files is there already; the train loader then carries each image's."""
        data, cnn = self.trainer.datamodule, self.net.global_cnn
        train = data.dataset("train")
        height, width = cnn.feature_size(self.preprocessing.image_size)
        key = {"cnn_g": weights_digest(cnn), "preprocessing": self.preprocessing.to_dict()}
        cache = FeatureCache(data.cache_dir, train.paths, key, (cnn.num_features, height, width))
        if self.trainer.is_global_zero and not cache.ready:
            train.features = None
            loader = data.every_image("train")
            context = self.trainer.precision_plugin.forward_context
            cache.build(self.global_features(loader, data, context), len(loader))
        self.trainer.strategy.barrier("stage.cache_global")
        train.features = cache
        per_thousand = cache.nbytes / max(cache.count, 1) * 1000 / 2**20
        log.info(
            "CNN_g's feature maps of %d training images read from %s (%.0f MB per 1,000 images)",
            cache.count,
            cache.file,
            per_thousand,
        )

    @torch.no_grad()
    def global_features(
        self, loader, data, context: Callable[[], AbstractContextManager]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(image_id, CNN_g's feature maps) of each batch of loader, made as a training step
        makes them: data's device transform, the precision's context, the same view."""
        for batch in loader:
            if batch is None:
                continue
            batch = data.on_after_batch_transfer(move_data_to_device(batch, self.device), 0)
            images = self.prepare_images(batch["image"])
            with context():
                view = resize_view(images, self.net.image_size)
                yield batch["image_id"], self.net.global_cnn.forward_features(view)

    def step_generator(self) -> torch.Generator:
        """What a localizer draws from in this step (random anchors): seeded by the run's seed
        and the step, so a resumed run draws as the uninterrupted one did."""
        seed = (self.run_seed * 1_000_003 + self.global_step) % (2**63)
        return torch.Generator(self.device).manual_seed(seed)

    def training_loss(
        self, batch: dict, epoch: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage 2's loss on a batch: cross-entropy of S_l on every box CNN_l trains on (the
        located box, or the localizer's training crops), plus the localizer's own loss; and what
        is worth logging of the boxes. epoch: the training epoch (default: the trainer's)."""
        images = self.prepare_images(batch["image"])
        epoch = self.current_epoch if epoch is None else epoch
        logits, crops = self.net.training_outputs(
            images, epoch, self.step_generator(), batch["label"], batch.get(GLOBAL_FEATURES)
        )
        many = logits.shape[1]
        parts = [p for p in batch["body_part"] for _ in range(many)]
        labels = batch["label"].repeat_interleave(many)
        loss = self.classification_loss(logits.flatten(0, 1), labels, parts)
        if crops.loss is not None:
            loss = loss + crops.loss
        logs = {
            "train/box_w": crops.boxes[..., 2].mean(),
            "train/box_h": crops.boxes[..., 3].mean(),
            **crops.logs,
        }
        return loss, logs

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
            drawn = self._boxes_to_draw
            images = to_uint8(drawn["images"])
            boxes = box_to_pixels(drawn["boxes"], images.shape[-1]).tolist()
            captions = [
                f"y={int(y)} p={float(p):.2f}"
                for y, p in zip(drawn["label"], drawn["prob"], strict=True)
            ]
            grid = np.asarray(box_grid(images, boxes, captions))
            log_image(self.loggers, "val/kalm_boxes", grid, self.current_epoch)
        self._boxes_to_draw = {}
