"""Control `localizer=brightest`: the anchor that is brightest on average, learned from nothing."""

from __future__ import annotations

import torch

from kalm_lightning.models.localizers.base import Anchored, LocalizerInputs, anchor_means


class BrightestAnchor(Anchored):
    """box = A_k with k = argmax_k mean(view inside A_k): the anchor of the navigator's grid
    (`anchor_grid`) whose pixels of the global view are brightest on average (the channels'
    mean: normalisation is affine per channel, so the argmax is that of the grey level).

    Where the lesion sits in the one bright blob of a view, this finds it without learning
    anything; a learned localizer must beat it to show that it learned more than brightness."""

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        grey = inputs.view.float().mean(dim=1)
        return self.anchors[anchor_means(self.anchors, grey, self._pooling).argmax(dim=1)]
