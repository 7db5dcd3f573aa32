"""Control `localizer=random`: a uniformly drawn anchor."""

from __future__ import annotations

import torch

from kalm_lightning.models.localizers.base import Anchored, LocalizerInputs


class RandomAnchor(Anchored):
    """box = A_k with k ~ Uniform{1..K} per image, from the same anchor grid as the navigator
    (`models.localizers.base.anchor_grid`: `grid` x `grid` centres per half-extent `half`).

    In training the draw comes from the step's generator (seeded by the run's seed and the
    step, so a resumed run draws the same); at inference from a generator seeded 0 at every
    call, so an evaluation is repeatable. A localizer must beat this to show it chose."""

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        generator = inputs.generator
        if generator is None:
            generator = torch.Generator(self.anchors.device).manual_seed(0)
        pick = torch.randint(
            len(self.anchors),
            (inputs.source.size(0),),
            generator=generator,
            device=generator.device,
        )
        return self.anchors[pick.to(self.anchors.device)]
