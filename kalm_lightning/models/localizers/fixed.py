"""Control `localizer=fixed`: a centred box of a fixed size."""

from __future__ import annotations

import torch

from kalm_lightning.errors import check_number
from kalm_lightning.models.localizers.base import Localizer, LocalizerInputs, centred


class FixedBox(Localizer):
    """box = (0, 0, half, half) for every image: the centred box of half-extent `half` in [-1, 1]
    units (0.5: half the image's side, a quarter of its area).

    What a localizer gains over this control is what placing the box adds beyond zooming in."""

    def __init__(
        self, height: int, width: int, channels: int, half: float = 0.5, lr: float | None = None
    ) -> None:
        super().__init__(height, width, channels, lr)
        check_number("localizer.half", half, 0, 1, exclusive_minimum=True)
        self.half = float(half)

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        return centred(inputs.source.size(0), self.half, inputs.source)
