"""`localizer=multicrop`: K windows from a scout's saliency map, read by CNN_l together and
pooled by gated attention (after GMIC, Shen et al. 2021, and NTS-Net; the pooling is Ilse et al.
2018's gated attention MIL)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.errors import UserError, check_number
from kalm_lightning.models.localizers.base import (
    Localizer,
    LocalizerInputs,
    Scorer,
    TrainingCrops,
    anchor_grid,
    anchor_means,
)
from kalm_lightning.models.localizers.scout import RECORDED_BEFORE, make_scout, run_head


def top_pooling(saliency: torch.Tensor, fraction: float) -> torch.Tensor:
    """[...] the mean of the highest `fraction` of each map's cells [..., N] (GMIC's top-t%
    pooling): the image's logit, high where a small part of the image looks abnormal."""
    count = max(1, round(fraction * saliency.shape[-1]))
    return saliency.topk(count, dim=-1).values.mean(dim=-1)


def running_loss(running: torch.Tensor, losses: torch.Tensor, decay: float = 0.95) -> torch.Tensor:
    """[M] each scout head's running loss: the exponential average of its losses [M] over the
    steps (the first step's losses where `running` is still NaN)."""
    return torch.where(running.isnan(), losses, decay * running + (1 - decay) * losses)


def greedy_windows(scores: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] anchor indices: the best-scoring anchor, then the best one that overlaps none chosen
    so far, k times (non-maximum suppression at overlap 0). scores [B, A], anchors [A, 4]. Where
    fewer than k anchors are disjoint, the best overlapping ones fill the rest."""
    x, y, w, h = anchors.unbind(dim=1)
    overlaps = ((x[:, None] - x[None]).abs() < w[:, None] + w[None] - 1e-6) & (
        (y[:, None] - y[None]).abs() < h[:, None] + h[None] - 1e-6
    )  # [A, A]: boxes i and j share area
    left = scores.detach().float().clone()
    chosen = []
    for _ in range(k):  # k is small and fixed: a loop over windows, not over the batch
        pick = left.argmax(dim=1)
        chosen.append(pick)
        left = left - 1e4 * overlaps[pick].to(left.dtype)  # a chosen window and its overlaps
    return torch.stack(chosen, dim=1)


class GatedAttention(nn.Module):
    """a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))), pooled = sum_k a_k h_k (Ilse et al.
    2018, eq. 9): K crop features [B, K, C] to one [B, C] and the weights [B, K]."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.V, self.U = nn.Linear(channels, hidden), nn.Linear(channels, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.tanh(self.V(features)) * torch.sigmoid(self.U(features))
        weights = self.w(gate).squeeze(-1).float().softmax(dim=1)
        return (weights[..., None].to(features.dtype) * features).sum(dim=1), weights


class ScoutWindows(Localizer):
    """What the K-crop readers share: a scout (`scout.make_scout` of kind `scout`, a few percent
    of a ResNet18) reads the source image and gives a map s (stride 16); the anchors (`grid` x
    `grid` centres of half-extent `half`) are scored by s averaged inside each (`anchor_means`),
    and the best k are taken greedily with no overlap (`greedy_windows`). `locate` is the best
    window. With `heads` > 1 the scout is that many scouts side by side, and s is the map of the
    one whose running loss is lowest (`chosen`)."""

    windowed = True
    # A checkpoint without `scout` has the GroupNorm scout; without `heads`, one head.
    recorded_before: Mapping[str, Any] = {**RECORDED_BEFORE, "heads": 1}

    def __init__(
        self,
        height: int,
        width: int,
        channels: int,
        k: int = 4,
        half: float = 0.25,
        grid: int = 7,
        scout_width: int = 32,
        scout: str = "local",
        heads: int = 1,
        lr: float | None = None,
    ) -> None:
        super().__init__(height, width, channels, lr)
        check_number("localizer.k", k, 1, integer=True)
        check_number("localizer.scout_width", scout_width, 2, integer=True)
        self.register_buffer("anchors", anchor_grid(grid, half), persistent=False)
        if k > len(self.anchors):
            raise UserError(
                f"localizer.k={k} windows but localizer.grid={grid} has {len(self.anchors)} "
                "anchors: lower k or raise grid"
            )
        check_number("localizer.heads", heads, 1, integer=True)
        self.k, self.heads = k, heads
        self.head = make_scout(scout_width, scout, heads)
        # Each head's running loss (`running_loss`, kept by the training of a subclass whose heads
        # learn from losses of their own); the windows come from the head where it is lowest.
        self.register_buffer("head_loss", torch.full((heads,), math.nan), persistent=heads > 1)
        self._pooling: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def maps(self, inputs: LocalizerInputs) -> torch.Tensor:
        """[B, heads, h, w]: each scout head's map over the source image (logits)."""
        return self.head(inputs.source.to(self.head[0].weight.dtype)).float()

    def best_head(self) -> torch.Tensor:
        """[1]: the head of lowest running loss (the first before any), on the device."""
        return self.head_loss.nan_to_num(math.inf).argmin().reshape(1)

    def chosen(self, maps: torch.Tensor) -> torch.Tensor:
        """s [B, h, w]: the chosen head's map out of every head's maps [B, heads, h, w]."""
        return maps.index_select(1, self.best_head())[:, 0]

    def saliency(self, inputs: LocalizerInputs) -> torch.Tensor:
        """s [B, h, w]: the scout's map over the source image (logits), from its chosen head,
        computed alone (`run_head`)."""
        if self.heads == 1:
            return self.maps(inputs)[:, 0]
        source = inputs.source.to(self.head[0].weight.dtype)
        return run_head(self.head, self.heads, source, self.best_head())[:, 0].float()

    def anchor_scores(self, saliency: torch.Tensor) -> torch.Tensor:
        """[B, A]: s averaged inside each anchor."""
        return anchor_means(self.anchors, saliency, self._pooling)

    def best(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, k] the greedy, disjoint anchors of highest score, best first."""
        return greedy_windows(scores, self.anchors, self.k)

    def windows_of(self, saliency: torch.Tensor) -> torch.Tensor:
        """[B, k, 4] the greedy, disjoint windows of a saliency map, best first."""
        return self.anchors[self.best(self.anchor_scores(saliency))]

    def windows(self, inputs: LocalizerInputs) -> torch.Tensor:
        return self.windows_of(self.saliency(inputs))

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        return self.windows(inputs)[:, 0]

    def candidates(self, inputs: LocalizerInputs) -> torch.Tensor:
        return self.windows(inputs)


class MultiCrop(ScoutWindows):
    """K windows from a saliency map, read by CNN_l together.

    - The scout and the windows: `ScoutWindows`. The scout is taught by the image label alone:
      the image's logit is the mean of the top `t` share of s's cells (top-t% pooling), loss
      BCE(top_t(s), y); no teacher pass of CNN_l. With `heads` > 1 each head has that loss of
      its own, and the windows come from the head whose running loss is lowest: a head whose
      top cells settled on the background from its initialisation does not reach a low loss,
      and another head does (study3/README.md, "The scout").
    - CNN_l reads each window's crop; gated attention MIL pools the k crop features into one,
      which CNN_l's classifier turns into the local score S_l, fused with S_g as in the paper.
      CNN_l trains on that pooled score, the attention with it.

    `locate` is the scout's best window; the model's box (KALMOutput.boxes) is the window the
    attention weighs most, and all k windows come with their weights (`crops`, `attention`).
    """

    def __init__(
        self, height: int, width: int, channels: int, t: float = 0.05, hidden: int = 128, **windows
    ) -> None:
        """`windows`: `ScoutWindows`' options (k, half, grid, scout_width, scout, heads, lr)."""
        super().__init__(height, width, channels, **windows)
        check_number("localizer.t", t, 0, 1, exclusive_minimum=True)
        check_number("localizer.hidden", hidden, 1, integer=True)
        self.t = float(t)
        self.attention = GatedAttention(channels, hidden)

    def pool(
        self, features: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention(features)  # the gated attention's own weights; no scale

    def training_crops(self, inputs: LocalizerInputs, scorer: Scorer, epoch: int) -> TrainingCrops:
        if inputs.labels is None:
            raise ValueError("localizer=multicrop trains on the labels of the batch")
        maps = self.maps(inputs)
        logits = top_pooling(maps.flatten(2), self.t)  # [B, heads]
        target = inputs.labels.float()[:, None].expand_as(logits)
        losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0)
        self.head_loss.copy_(running_loss(self.head_loss, losses.detach()))
        return TrainingCrops(
            self.windows_of(self.chosen(maps.detach())),
            losses.sum(),  # each head learns from its own loss alone
            {"train/scout_loss": self.head_loss.min()},
            together=True,
        )
