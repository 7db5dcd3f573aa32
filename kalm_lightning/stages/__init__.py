"""One LightningModule per training stage, on a small shared base."""

from kalm_lightning.stages.base import StageModule
from kalm_lightning.stages.global_stage import GlobalStage
from kalm_lightning.stages.kalm_stage import KALMStage
from kalm_lightning.stages.loading import load_stage

__all__ = ["GlobalStage", "KALMStage", "StageModule", "load_stage"]
