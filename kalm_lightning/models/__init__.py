"""The paper's CNNs (timm backbones with a 2-class head) and KALM: localizer, crop, KALMNet."""

from kalm_lightning.models.backbone import Backbone
from kalm_lightning.models.kalm import KALMNet, KALMOutput, KeyAreaLocalizer, crop

__all__ = ["Backbone", "KALMNet", "KALMOutput", "KeyAreaLocalizer", "crop"]
