"""`localizer=sampling`: K windows drawn from an attention distribution over anchors and averaged
(attention sampling, Katharopoulos & Fleuret 2019): study 3's second K-crop design beside
`localizer=multicrop`, at equal K."""

from __future__ import annotations

import torch

from kalm_lightning.errors import UserError, check_number
from kalm_lightning.models.localizers.base import LocalizerInputs, Scorer, TrainingCrops
from kalm_lightning.models.localizers.multicrop import ScoutWindows


class AttentionSampling(ScoutWindows):
    """K windows drawn from an attention distribution, read by CNN_l, averaged.

    - Attention: the scout's map s averaged inside each anchor (`ScoutWindows`) gives
      a = softmax(s_A) over the A anchors.
    - Training: K anchors i_1..i_K drawn from a with replacement (the step's generator); CNN_l
      reads each crop; the pooled feature is (1/K) sum_k f(i_k) a_{i_k} / sg(a_{i_k}), whose
      value is the plain mean, an unbiased estimate of sum_i a_i f(i), and whose gradient
      reaches a (ATS's estimator, their eq. 6-7). So the scout learns from CNN_l's own
      classification loss, not from a label of its own; `entropy` x H(a) is subtracted from
      the loss so that a does not collapse on one anchor before CNN_l has learned anything.
    - Inference: the K best anchors of a taken greedily with no overlap (as `multicrop`),
      their features averaged with a renormalised over the K: the same sum, deterministic,
      restricted to where a is largest.

    `locate` is the anchor of highest attention; the model's box is the window weighed most,
    and all K windows come with their weights (`crops`, `attention`).
    """

    def __init__(
        self, height: int, width: int, channels: int, entropy: float = 0.01, **windows
    ) -> None:
        """`windows`: `ScoutWindows`' options (k, half, grid, scout_width, scout, lr)."""
        if windows.get("heads", 1) != 1:
            raise UserError(
                f"localizer.heads={windows['heads']}: sampling's scout learns from CNN_l's loss, "
                "one for all heads, so no head could be chosen; remove localizer.heads"
            )
        super().__init__(height, width, channels, **windows)
        check_number("localizer.entropy", entropy, 0)
        self.entropy = float(entropy)

    def attention(self, inputs: LocalizerInputs) -> torch.Tensor:
        """a [B, A]: softmax over the anchors of the scout's map averaged inside each."""
        return self.anchor_scores(self.saliency(inputs)).softmax(dim=1)

    def read_windows(self, inputs: LocalizerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.attention(inputs)
        picks = self.best(attention)
        chosen = attention.gather(1, picks)
        return self.anchors[picks], self.k * chosen / chosen.sum(dim=1, keepdim=True)

    def pool(
        self, features: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean of the K features, each times its scale (a_k / sg(a_k) in training, K a_k /
        sum a in inference); the weights are the scales over K."""
        if scale is None:
            scale = torch.ones(features.shape[:2], device=features.device)
        pooled = (features * scale[..., None].to(features.dtype)).mean(dim=1)
        return pooled, scale.detach() / features.size(1)

    def training_crops(self, inputs: LocalizerInputs, scorer: Scorer, epoch: int) -> TrainingCrops:
        attention = self.attention(inputs)
        picks = torch.multinomial(
            attention.detach(), self.k, replacement=True, generator=inputs.generator
        )
        drawn = attention.gather(1, picks)
        entropy = -(attention * attention.clamp_min(1e-12).log()).sum(dim=1).mean()
        return TrainingCrops(
            self.anchors[picks],
            -self.entropy * entropy,
            {"train/attention_entropy": entropy.detach()},
            together=True,
            scale=drawn / drawn.detach(),
        )
