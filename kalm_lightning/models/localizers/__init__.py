"""Every localizer, one file each, on one interface (`base.py`): the paper's (`kalm.py`,
`KeyAreaLocalizer`), the controls (`full`, `fixed`, `random`, `brightest`) and the navigators that learn where
to look from the local branch, one crop (`navigator`) or K read by attention (`multicrop`), and
K drawn by attention sampling (`sampling`). Each has its YAML under `conf/localizer/` and its formula in its
docstring."""

from kalm_lightning.models.localizers.base import (
    Localizer,
    LocalizerInputs,
    Scorer,
    TrainingCrops,
    build_localizer,
)
from kalm_lightning.models.localizers.brightest import BrightestAnchor
from kalm_lightning.models.localizers.fixed import FixedBox
from kalm_lightning.models.localizers.full import FullImage
from kalm_lightning.models.localizers.kalm import KeyAreaLocalizer
from kalm_lightning.models.localizers.multicrop import MultiCrop
from kalm_lightning.models.localizers.navigator import Navigator
from kalm_lightning.models.localizers.random_anchor import RandomAnchor
from kalm_lightning.models.localizers.sampling import AttentionSampling

__all__ = [
    "AttentionSampling",
    "BrightestAnchor",
    "FixedBox",
    "FullImage",
    "KeyAreaLocalizer",
    "Localizer",
    "LocalizerInputs",
    "MultiCrop",
    "Navigator",
    "RandomAnchor",
    "Scorer",
    "TrainingCrops",
    "build_localizer",
]
