"""Localizers beyond the paper's (which is `models.kalm.KeyAreaLocalizer`), one file each: the
controls (`full`, `fixed`, `random`) and the navigators that learn where to look from the local
branch. Each has its YAML under `conf/localizer/` and its formula in its docstring."""

from kalm_lightning.models.localizers.fixed import FixedBox
from kalm_lightning.models.localizers.full import FullImage
from kalm_lightning.models.localizers.navigator import Navigator
from kalm_lightning.models.localizers.random_anchor import RandomAnchor

__all__ = ["FixedBox", "FullImage", "Navigator", "RandomAnchor"]
