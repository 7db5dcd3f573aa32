"""The navigator's teacher from CNN_l's own training crops (`localizer.teacher_from=crops|maps`):
no pass of CNN_l over the source; its scores of the crops it trains on (the drawn one read smaller
with `localizer.drawn_scale`), and of any crop it only looks at (`localizer.teacher_crops=2`),
teach the navigator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kalm_lightning.models.localizers.base import TrainingCrops, crop_pooling


class CropTeacher:
    """`Navigator`'s crops and teacher where `teacher_from=crops|maps` (its docstring has the
    formulas). A mixin: the navigator holds the anchors and the options read here."""

    anchors: torch.Tensor  # [K, 4]
    train_crops: int
    teacher_crops: int
    teacher_from: str
    teacher_seen: float
    drawn_every: int
    drawn_scale: float | None
    # and `taught(abnormal, labels)`, the teacher's q from CNN_l's p(abnormal) (`teacher_score`)

    def taught_by_crops(
        self, logits: torch.Tensor, pick: torch.Tensor, labels: torch.Tensor | None, side: int
    ) -> TrainingCrops:
        """CNN_l (crops of `side` px) trains on the navigator's choice and a drawn anchor
        (`drawn_scale`: the drawn one read smaller; `train_crops=1`: one of the two per image,
        and with `teacher_crops=2` the other one scored without gradients), and its scores of
        those crops (or of their maps' cells) teach the navigator (`learn`, once CNN_l has
        scored them)."""
        greedy = logits.argmax(dim=1)
        extra = None  # the anchors CNN_l reads after the crops it trains on at its own size
        if self.train_crops == 2:
            chosen = torch.stack([greedy, pick], dim=1)
            if self.drawn_scale is not None:
                chosen, extra = greedy[:, None], pick[:, None]
        else:  # the navigator's choice in every other image, a drawn anchor in the others
            every = self.drawn_every
            place = torch.arange(len(pick), device=pick.device)
            own = place % every != every - 1 if every else torch.ones_like(place, dtype=torch.bool)
            chosen = torch.where(own, greedy, pick)[:, None]
            if self.teacher_crops == 2:
                extra = torch.where(own, pick, greedy)[:, None]
        crops = TrainingCrops(self.anchors[chosen])
        shown, groups = chosen, [crops.boxes]  # what `learn` is given, in its order
        if extra is not None:
            crops.extra = self.anchors[extra]
            if self.drawn_scale is not None:
                crops.extra_size = max(1, round(side * self.drawn_scale))
            crops.extra_trains = self.train_crops == 2
            shown, groups = torch.cat([chosen, extra], dim=1), [crops.boxes, crops.extra]

        def learn(local_logits: torch.Tensor, cells: list[torch.Tensor]) -> torch.Tensor:
            if self.teacher_from == "maps":
                scores, seen = self.seen_scores(groups, cells, labels)
                each = F.binary_cross_entropy_with_logits(logits, scores, reduction="none")
                loss = (each * seen).sum() / seen.sum().clamp_min(1)
                crops.logs["train/navigator_taught"] = seen.sum(dim=1).mean()
            else:
                scores = self.taught(local_logits.float().softmax(-1)[..., 1], labels)
                loss = F.binary_cross_entropy_with_logits(logits.gather(1, shown), scores)
            crops.logs["train/navigator_loss"] = loss.detach()
            return loss

        crops.learn = learn
        return crops

    def seen_scores(
        self,
        boxes: Sequence[torch.Tensor],
        cells: Sequence[torch.Tensor],
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`teacher_from=maps`: q [B, K] from CNN_l's cell logits [B, M, 2, h, w] of the crops
        [B, M, 4], in groups of one size each, each anchor's the mean of
        the cells inside it over every crop that shows it, and which anchors it teaches [B, K]
        (1.0 where one crop sees at least `teacher_seen` of the anchor, else 0.0)."""
        summed, seen = 0, []
        for group, group_cells in zip(boxes, cells, strict=True):
            shares = crop_pooling(self.anchors, group, *group_cells.shape[-2:])
            summed = summed + torch.einsum("bmkn,bmon->bko", shares, group_cells.flatten(3).float())
            seen.append(shares.sum(dim=-1))  # [B, M, K]: the share of each anchor each crop shows
        shown = torch.cat(seen, dim=1)
        pooled = summed / shown.sum(dim=1).clamp_min(1e-6)[..., None]
        taught = (shown.amax(dim=1) >= self.teacher_seen).float()
        return self.taught(pooled.softmax(-1)[..., 1], labels), taught
