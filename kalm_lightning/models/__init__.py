"""The paper's CNNs (timm backbones with a 2-class head), KALM (localizer, crop, KALMNet), the
localizer interface and the localizers beyond the paper, and the preprocessing a model carries."""

from kalm_lightning.models.backbone import Backbone
from kalm_lightning.models.kalm import KALMNet, KALMOutput, crop
from kalm_lightning.models.localizers import (
    BrightestAnchor,
    FixedBox,
    FullImage,
    KeyAreaLocalizer,
    Localizer,
    LocalizerInputs,
    MultiCrop,
    Navigator,
    RandomAnchor,
    TrainingCrops,
)
from kalm_lightning.models.preprocessing import Preprocessing

__all__ = [
    "Backbone",
    "BrightestAnchor",
    "FixedBox",
    "FullImage",
    "KALMNet",
    "KALMOutput",
    "KeyAreaLocalizer",
    "Localizer",
    "LocalizerInputs",
    "MultiCrop",
    "Navigator",
    "Preprocessing",
    "RandomAnchor",
    "TrainingCrops",
    "crop",
]
