"""Control `localizer=random`: a uniformly drawn anchor."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kalm_lightning.models.localizers.base import Localizer, LocalizerInputs, anchor_grid


class RandomAnchor(Localizer):
    """box = A_k with k ~ Uniform{1..K} per image, from the same anchor grid as the navigator
    (`models.localizers.base.anchor_grid`: `grid` x `grid` centres per half-extent `half`).

    In training the draw comes from the step's generator (seeded by the run's seed and the
    step, so a resumed run draws the same); at inference from a generator seeded 0 at every
    call, so an evaluation is repeatable. A localizer must beat this to show it chose."""

    def __init__(
        self,
        height: int,
        width: int,
        channels: int,
        grid: int | Sequence[int] = 5,
        half: float | Sequence[float] = 0.5,
        lr: float | None = None,
    ) -> None:
        super().__init__(height, width, channels, lr)
        self.register_buffer("anchors", anchor_grid(grid, half), persistent=False)

    def candidates(self, inputs: LocalizerInputs) -> torch.Tensor:
        return self.anchors.expand(inputs.source.size(0), -1, -1)

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
