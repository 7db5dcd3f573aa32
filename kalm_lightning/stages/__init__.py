"""One LightningModule per training stage, on a small shared base."""

from kalm_lightning.stages.base import StageModule, load_stage
from kalm_lightning.stages.global_stage import GlobalStage
from kalm_lightning.stages.kalm_stage import KALMStage

__all__ = ["GlobalStage", "KALMStage", "StageModule", "load_stage"]
