"""A trained stage back from its checkpoint, whichever stage wrote it."""

from __future__ import annotations

from kalm_lightning.checkpoints import WEIGHTS_ONLY, read_checkpoint
from kalm_lightning.errors import UserError
from kalm_lightning.stages.base import StageModule
from kalm_lightning.stages.global_stage import GlobalStage
from kalm_lightning.stages.kalm_stage import KALMStage

STAGES: dict[int, type[StageModule]] = {1: GlobalStage, 2: KALMStage}


def load_stage(path: str, map_location: str = "cpu") -> StageModule:
    """A trained stage-1 or stage-2 module from its checkpoint, without touching the network."""
    hparams = read_checkpoint(path, mmap=True).get("hyper_parameters", {})
    stage = hparams.get("stage")
    if stage not in STAGES:
        raise UserError(f"{path} is not a kalm-lightning stage-1 or stage-2 checkpoint")
    module = STAGES[stage].load_from_checkpoint(
        path,
        map_location=map_location,
        pretrained=False,
        backbone_weights=None,
        weights_only=WEIGHTS_ONLY,
    )
    return module.eval()
