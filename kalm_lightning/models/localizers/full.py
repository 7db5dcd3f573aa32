"""Control `localizer=full`: CNN_l sees the whole source image."""

from __future__ import annotations

import torch

from kalm_lightning.models.localizers.base import Localizer, LocalizerInputs, centred


class FullImage(Localizer):
    """box = (0, 0, 1, 1) for every image: CNN_l on the whole source image at the CNN input size.

    What KALM's fused score gains over this control is what the box adds beyond a second CNN."""

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        return centred(inputs.source.size(0), 1.0, inputs.source)
