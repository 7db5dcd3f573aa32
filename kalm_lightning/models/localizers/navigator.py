"""`localizer=navigator`: where to look, learned from the local branch (NTS-Net's navigator with a
best-of-K teacher, GMIC's scout as an option, self-critical REINFORCE as a refinement)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.errors import check_choice, check_number
from kalm_lightning.models.localizer import (
    Localizer,
    LocalizerInputs,
    Scorer,
    TrainingCrops,
    anchor_grid,
    box_pooling,
)

READS = ("map", "view", "source")
TEACHERS = ("pooled", "crops")
TEACHER_SCORES = ("abnormal", "label", "confidence")
TARGETS = ("scores", "best")
POLICIES = ("distill", "reinforce")
INFERENCES = ("navigator", "mil")


def scout(width: int) -> nn.Sequential:
    """A low-capacity CNN: four stride-2 3x3 convolutions (width / 2, width, 2 width, 2 width
    channels) to a one-channel score map at stride 16, a few percent of a ResNet18 at the same size.
    GroupNorm, not BatchNorm: trained from scratch in a few hundred steps, a BatchNorm's running
    statistics lag its weights, and the navigator then points elsewhere at inference than in
    training (seen: 5% of lesions hit in eval mode where train mode hit 90%)."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (width // 2, width, 2 * width, 2 * width):
        layers += [
            nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(min(8, out), out),
            nn.ReLU(inplace=True),
        ]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, 1, 1))


class Navigator(Localizer):
    """A best-of-K teacher distilled into a navigator; one crop at inference.

    Anchors A_1..A_K: `grid` x `grid` centres per half-extent `half` (`anchor_grid`). The navigator
    reads CNN_g's frozen feature map (`reads=map`: a 1x1-conv head, nothing else to run), the global
    view (`view`: a scout CNN of its own) or the source image (`source`: the scout at full
    resolution, GMIC's idea), and makes a score map s; anchor k's logit is s averaged over A_k,
    z_k = mean_{A_k} s (`box_pooling`), so the same pattern scores alike wherever it lies.

    Training, at epoch e:
    - e < `warmup_epochs`: CNN_l trains on one uniformly drawn anchor per image, so that its scores
      mean something before they teach; the navigator does not learn yet.
    - `policy=distill`: the teacher q_k = p_l(abnormal | A_k), CNN_l's score of every anchor without
      gradients, in normal and abnormal images alike (a normal image's most abnormal-looking place
      is where an abnormality would be; p(true label) would teach the navigator to look away), and
      k* = argmax_k q_k. CNN_l trains on A_k* and one drawn anchor (so that it does not see only its
      own favourites). The navigator learns from the teacher's scores of every anchor,
      `target=scores`: sum_k BCE(sigmoid(z_k), q_k), K soft labels per image; or from its best
      anchor alone, `target=best`: CE(z, k*), NTS-Net's way, one hard label per image.
      `teacher=pooled` scores all K from one pass of CNN_l over the source image
      (`KALMNet.pooled_scores`); `crops`: K crops. What q_k is, `teacher_score`: `abnormal`,
      p_l(abnormal | A_k) (the default); `label`, p_l(y | A_k) of the image's label y (NTS-Net's);
      `confidence`, max(p, 1 - p), where CNN_l can decide. Where normal images carry a decoy of
      the lesion's look, p(abnormal) sends the navigator away from the decoy in normal images and
      towards the lesion in abnormal ones, and the view, which cannot tell them apart, learns
      neither; `label` and `confidence` send it to both.
    - `policy=reinforce` (after `distill_epochs` epochs of distillation past the warm-up): draw
      k ~ pi_mix = (1 - explore) softmax(z) + explore / K, reward r = q_k, baseline b = q_g of the
      greedy anchor g = argmax z (self-critical); loss -(r - b) log pi_mix(k) - entropy * H(softmax z).
      CNN_l trains on A_k and A_g: two crops, no teacher pass.

    Inference: `inference=navigator`: A_{argmax z}, one crop. `inference=mil`: every anchor, and
    KALMNet keeps the one CNN_l finds most abnormal: the ceiling a perfect navigator could reach,
    at K crops.
    """

    def __init__(
        self,
        height: int,
        width: int,
        channels: int,
        grid: int | Sequence[int] = 5,
        half: float | Sequence[float] = 0.5,
        reads: str = "map",
        scout_width: int = 32,
        warmup_epochs: int = 1,
        teacher: str = "pooled",
        teacher_score: str = "abnormal",
        target: str = "scores",
        policy: str = "distill",
        distill_epochs: int = 1,
        explore: float = 0.2,
        entropy: float = 0.01,
        inference: str = "navigator",
        lr: float | None = None,
    ) -> None:
        super().__init__(height, width, channels, lr)
        check_choice("localizer.reads", reads, READS)
        check_choice("localizer.teacher", teacher, TEACHERS)
        check_choice("localizer.teacher_score", teacher_score, TEACHER_SCORES)
        check_choice("localizer.target", target, TARGETS)
        check_choice("localizer.policy", policy, POLICIES)
        check_choice("localizer.inference", inference, INFERENCES)
        check_number("localizer.scout_width", scout_width, 2, integer=True)
        check_number("localizer.warmup_epochs", warmup_epochs, 0, integer=True)
        check_number("localizer.distill_epochs", distill_epochs, 0, integer=True)
        check_number("localizer.explore", explore, 0, 1)
        check_number("localizer.entropy", entropy, 0)
        self.reads, self.teacher, self.policy, self.inference = reads, teacher, policy, inference
        self.target, self.teacher_score = target, teacher_score
        self.warmup_epochs, self.distill_epochs = warmup_epochs, distill_epochs
        self.explore, self.entropy = float(explore), float(entropy)
        self.register_buffer("anchors", anchor_grid(grid, half), persistent=False)
        if reads == "map":
            self.head = nn.Sequential(
                nn.Conv2d(channels, 64, 1), nn.ReLU(inplace=True), nn.Conv2d(64, 1, 1)
            )
        else:
            self.head = scout(scout_width)
        self._pooling: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def anchor_logits(self, inputs: LocalizerInputs) -> torch.Tensor:
        """z [B, K]: the score map averaged inside each anchor."""
        if self.reads == "map":
            seen = inputs.features.detach().float()
        else:
            seen = inputs.view if self.reads == "view" else inputs.source
        score = self.head(seen.to(self.head[0].weight.dtype)).float()
        _, _, height, width = score.shape
        key = (height, width, score.device)
        if key not in self._pooling:
            self._pooling[key] = box_pooling(self.anchors.cpu(), height, width).to(score.device)
        return score.flatten(1) @ self._pooling[key].T

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        if self.inference == "mil":  # size(0), not len(): a symbolic batch under torch.export
            return self.anchors.expand(inputs.source.size(0), -1, -1)
        return self.anchors[self.anchor_logits(inputs).argmax(dim=1)]

    def _drawn(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else self.anchors.device
        pick = torch.randint(len(self.anchors), (batch,), generator=generator, device=device)
        return pick.to(self.anchors.device)

    def taught(self, abnormal: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The teacher's q [B, K] from CNN_l's p(abnormal) [B, K] (`teacher_score`)."""
        if self.teacher_score == "abnormal":
            return abnormal
        if self.teacher_score == "confidence":
            return torch.maximum(abnormal, 1 - abnormal)
        if labels is None:
            raise ValueError("localizer.teacher_score=label needs the labels of the batch")
        abnormal_image = labels.to(abnormal.dtype)[:, None]
        return abnormal_image * abnormal + (1 - abnormal_image) * (1 - abnormal)

    def training_crops(self, inputs: LocalizerInputs, scorer: Scorer, epoch: int) -> TrainingCrops:
        batch, anchors = len(inputs.source), self.anchors
        drawn = anchors[self._drawn(batch, inputs.generator)]
        if epoch < self.warmup_epochs:
            return TrainingCrops(drawn[:, None])
        logits = self.anchor_logits(inputs)
        if self.policy == "distill" or epoch < self.warmup_epochs + self.distill_epochs:
            every = anchors.expand(batch, -1, -1)
            scores = self.taught(scorer(every, pooled=self.teacher == "pooled"), inputs.labels)
            best = scores.argmax(dim=1)
            if self.target == "best":
                loss = F.cross_entropy(logits, best)
            else:  # every anchor's score: K soft labels per image instead of one hard one
                loss = F.binary_cross_entropy_with_logits(logits, scores)
            agrees = (logits.argmax(dim=1) == best).float().mean()
            return TrainingCrops(
                torch.stack([anchors[best], drawn], dim=1),
                loss,
                {"train/navigator_loss": loss.detach(), "train/navigator_agrees": agrees},
            )
        policy = logits.softmax(dim=1)
        mixed = (1 - self.explore) * policy + self.explore / len(anchors)
        sampled = torch.multinomial(mixed.detach(), 1, generator=inputs.generator).squeeze(1)
        greedy = logits.argmax(dim=1)
        chosen = torch.stack([anchors[sampled], anchors[greedy]], dim=1)
        reward, baseline = self.taught(scorer(chosen), inputs.labels).unbind(dim=1)
        rows = torch.arange(batch, device=logits.device)
        log_prob = mixed[rows, sampled].clamp_min(1e-12).log()
        entropy = -(policy * policy.clamp_min(1e-12).log()).sum(dim=1).mean()
        loss = -((reward - baseline).detach() * log_prob).mean() - self.entropy * entropy
        return TrainingCrops(
            chosen,
            loss,
            {
                "train/navigator_loss": loss.detach(),
                "train/navigator_advantage": (reward - baseline).mean(),
            },
        )
