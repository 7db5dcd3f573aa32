"""`localizer=navigator`: where to look, learned from the local branch (NTS-Net's navigator with a
best-of-K teacher, GMIC's scout as an option, self-critical REINFORCE as a refinement)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.errors import UserError, check_choice, check_number
from kalm_lightning.models.localizers.base import (
    Localizer,
    LocalizerInputs,
    Scorer,
    TrainingCrops,
    anchor_grid,
    anchor_means,
)
from kalm_lightning.models.localizers.crop_teacher import CropTeacher
from kalm_lightning.models.localizers.scout import RECORDED_BEFORE, make_scout

READS = ("map", "view", "source")
TEACHER_SCORES = ("label", "abnormal")
POLICIES = ("distill", "reinforce")
TEACHER_SIZES = ("source", "crops")  # the teacher's pass: at the source size, or the crops' scale
TRAIN_CROPS = (2, 1)  # CNN_l's crops per image in a distillation step
# the teacher: a pass over the source, CNN_l's scores of its training crops, or of their maps' cells
TEACHER_FROM = ("pass", "crops", "maps")
TEACHER_IMAGES = ("all", "taught")  # the images the teacher scores: all, or those it teaches CNN_l
# Options of earlier releases that backed no result of the localizer study, removed: a checkpoint
# that recorded them at the one value that remains still loads; any other value is refused.
REMOVED = {"teacher": "pooled", "target": "scores", "inference": "navigator"}


class Navigator(CropTeacher, Localizer):
    """A best-of-K teacher distilled into a navigator; one crop at inference.

    Anchors A_1..A_K: `grid` x `grid` centres per half-extent `half` (`anchor_grid`). The navigator
    reads the source image (`reads=source`: a scout CNN at full resolution, GMIC's idea), the
    global view (`view`: the scout on what CNN_g saw) or CNN_g's frozen feature map (`map`: a
    1x1-conv head, nothing else to run), and makes a score map s; anchor k's logit is s averaged
    over A_k, z_k = mean_{A_k} s (`box_pooling`), so the same pattern scores alike wherever it lies.

    Training, at epoch e:
    - e < `warmup_epochs`: CNN_l trains on one uniformly drawn anchor per image, so that its scores
      mean something before they teach; the navigator does not learn yet.
    - `policy=distill`: the teacher q_k, CNN_l's score of every anchor without gradients, all K
      from one pass of CNN_l over the source image averaged inside each anchor
      (`KALMNet.pooled_scores`). `teacher_score=label`: q_k = p_l(y | A_k) of the image's label y
      (NTS-Net's), so a normal image teaches where it looks most normal and an abnormal one where
      it looks most abnormal; `abnormal`: q_k = p_l(abnormal | A_k) in every image. Where normal
      images carry a decoy of the lesion's look, p(abnormal) sends the navigator towards the
      decoy's look in abnormal images and away from it in normal ones, and a navigator that cannot
      tell them apart learns neither (the localizer study's ablation). k* = argmax_k q_k; CNN_l
      trains on A_k* and one drawn anchor (so that it does not see only its own favourites;
      `train_crops=1`: A_k* in every other image of the batch, the drawn anchor in the others,
      one crop per image), and the navigator on every anchor's score, sum_k BCE(sigmoid(z_k), q_k):
      K soft labels per image. `teacher_size=crops`: the teacher's pass over the source resized to
      image_size / (2 x the anchors' mean half-extent), where an anchor is seen at the scale CNN_l
      reads its crop at (for half 0.4 at 224 / 448: 280 px, 0.39x the pixels of the source).
      `teacher_images=taught` (with `train_crops=1`): the teacher scores only the images whose crop
      is its best anchor (every other one), and the navigator distils from those: the same crops
      for CNN_l at half the teacher's cost.
    - `teacher_from=crops` (with `policy=distill`): no teacher's pass. CNN_l trains on the
      navigator's own choice g = argmax z and a drawn anchor d (`train_crops=1`: g in every
      other image, d in the others), and its scores of those crops in the training step itself,
      q = p_l(y | A) (detached), teach the navigator: BCE(sigmoid(z_k), q_k) for the crops' anchors
      only. A step costs CNN_l's crops and the scout, what inference costs plus the backward.
    - `teacher_from=maps`: the same crops; CNN_l's classifier on each cell of a crop's feature map
      (`KALMNet.local_readout`), averaged inside anchor k where a crop shows at least
      `teacher_seen` of it (`crop_pooling`), gives q_k as the teacher's pass does from the source,
      at the crops' scale; loss: the mean BCE(sigmoid(z_k), q_k) over the anchors so taught (the
      crop's own gets the crop's score). `drawn_every` (`train_crops=1`): the drawn anchor is the
      crop of every n-th image (2: every other, as above; 0: none). `teacher_crops=2` (with
      `train_crops=1`): CNN_l also scores the other of g and d in each image, without gradients
      (a forward, no backward), so the teacher reads both crops of every image, as with
      `train_crops=2`, while CNN_l trains on one (`crop_teacher.py`). `drawn_scale` (with
      `train_crops=2`): CNN_l reads the drawn anchor's crop at that fraction of its own side.
    - `policy=reinforce` (after `distill_epochs` epochs of distillation past the warm-up): draw
      k ~ pi_mix = (1 - explore) softmax(z) + explore / K, reward r = q_k, baseline b = q_g of the
      greedy anchor g = argmax z (self-critical); loss -(r - b) log pi_mix(k) - entropy * H(softmax z).
      CNN_l trains on A_k and A_g: two crops, no teacher pass.

    Inference: A_{argmax z}, one crop. Its anchors are its `candidates`: `evaluate inference=mil`
    scores all K with CNN_l and keeps the most abnormal, the ceiling a perfect navigator could
    reach, at K crops.

    Defaults: the variant the localizer study found best (the source, 6x6 anchors of half 0.4,
    p(label)); `conf/localizer/navigator.yaml` holds the same.
    """

    recorded_before = RECORDED_BEFORE  # a checkpoint without `scout` has the GroupNorm scout

    def __init__(
        self,
        height: int,
        width: int,
        channels: int,
        grid: int | Sequence[int] = 6,
        half: float | Sequence[float] = 0.4,
        reads: str = "source",
        scout_width: int = 32,
        scout: str = "local",
        warmup_epochs: int = 1,
        teacher_score: str = "label",
        policy: str = "distill",
        distill_epochs: int = 1,
        explore: float = 0.2,
        entropy: float = 0.01,
        lr: float | None = None,
        teacher_size: str = "source",
        train_crops: int = 2,
        teacher_images: str = "all",
        teacher_from: str = "pass",
        teacher_seen: float = 0.5,
        drawn_every: int = 2,
        teacher_crops: int | None = None,
        drawn_scale: float | None = None,
        **removed: str,
    ) -> None:
        super().__init__(height, width, channels, lr)
        for key, value in removed.items():
            if key not in REMOVED:
                raise TypeError(f"Navigator got an unexpected keyword argument '{key}'")
            if value != REMOVED[key]:
                raise UserError(
                    f"localizer.{key}={value} was removed (it backed no result); this version "
                    f"has {key}={REMOVED[key]} only: train again without it"
                )
        check_choice("localizer.reads", reads, READS)
        check_choice("localizer.teacher_score", teacher_score, TEACHER_SCORES)
        check_choice("localizer.policy", policy, POLICIES)
        check_choice("localizer.teacher_size", teacher_size, TEACHER_SIZES)
        check_choice("localizer.train_crops", train_crops, TRAIN_CROPS)
        check_choice("localizer.teacher_images", teacher_images, TEACHER_IMAGES)
        if teacher_images == "taught" and train_crops != 1:
            raise UserError(
                "localizer.teacher_images=taught needs localizer.train_crops=1 (with 2 crops "
                "every image is taught): set localizer.train_crops=1 or teacher_images=all"
            )
        self.teacher_size, self.train_crops = teacher_size, int(train_crops)
        self.teacher_images = teacher_images
        check_choice("localizer.teacher_from", teacher_from, TEACHER_FROM)
        self.teacher_from = teacher_from
        check_number("localizer.teacher_seen", teacher_seen, 0, 1, exclusive_minimum=True)
        self.teacher_seen = float(teacher_seen)
        check_number("localizer.drawn_every", drawn_every, 0, integer=True)
        if drawn_every != 2 and (teacher_from == "pass" or train_crops != 1):
            raise UserError(
                f"localizer.drawn_every={drawn_every} needs localizer.train_crops=1 and "
                "localizer.teacher_from=crops|maps (the teacher's pass draws every other image): "
                "set them, or leave drawn_every at 2"
            )
        self.drawn_every = int(drawn_every)
        teacher_crops = train_crops if teacher_crops is None else teacher_crops
        check_choice("localizer.teacher_crops", teacher_crops, TRAIN_CROPS)
        if teacher_crops != train_crops and (train_crops != 1 or teacher_from == "pass"):
            raise UserError(
                f"localizer.teacher_crops={teacher_crops} needs localizer.train_crops=1 and "
                "localizer.teacher_from=crops|maps (the teacher reads CNN_l's training crop and "
                "the other one beside it): set them, or leave teacher_crops at null"
            )
        self.teacher_crops = int(teacher_crops)
        if drawn_scale is not None:
            check_number("localizer.drawn_scale", drawn_scale, 0, 1, exclusive_minimum=True)
            if train_crops != 2 or teacher_from == "pass":
                raise UserError(
                    f"localizer.drawn_scale={drawn_scale} needs localizer.train_crops=2 and "
                    "localizer.teacher_from=crops|maps (the drawn anchor is a crop of its own): "
                    "set them, or leave drawn_scale at null"
                )
        self.drawn_scale = None if drawn_scale is None else float(drawn_scale)
        check_number("localizer.scout_width", scout_width, 2, integer=True)
        check_number("localizer.warmup_epochs", warmup_epochs, 0, integer=True)
        check_number("localizer.distill_epochs", distill_epochs, 0, integer=True)
        check_number("localizer.explore", explore, 0, 1)
        check_number("localizer.entropy", entropy, 0)
        self.reads, self.policy, self.teacher_score = reads, policy, teacher_score
        self.warmup_epochs, self.distill_epochs = warmup_epochs, distill_epochs
        self.explore, self.entropy = float(explore), float(entropy)
        self.register_buffer("anchors", anchor_grid(grid, half), persistent=False)
        self.mean_half = float(self.anchors[:, 2:].mean())  # once, here: no sync in a step
        if reads == "map":
            self.head = nn.Sequential(
                nn.Conv2d(channels, 64, 1), nn.ReLU(inplace=True), nn.Conv2d(64, 1, 1)
            )
        else:
            self.head = make_scout(scout_width, scout)
        self._pooling: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def anchor_logits(self, inputs: LocalizerInputs) -> torch.Tensor:
        """z [B, K]: the score map averaged inside each anchor."""
        if self.reads == "map":
            seen = inputs.features.detach().float()
        else:
            seen = inputs.view if self.reads == "view" else inputs.source
        score = self.head(seen.to(self.head[0].weight.dtype)).float()
        return anchor_means(self.anchors, score, self._pooling)

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        return self.anchors[self.anchor_logits(inputs).argmax(dim=1)]

    def candidates(self, inputs: LocalizerInputs) -> torch.Tensor:
        # size(0), not len(): a symbolic batch under torch.export
        return self.anchors.expand(inputs.source.size(0), -1, -1)

    def _drawn(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else self.anchors.device
        pick = torch.randint(len(self.anchors), (batch,), generator=generator, device=device)
        return pick.to(self.anchors.device)

    def taught(self, abnormal: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The teacher's q [B, K] from CNN_l's p(abnormal) [B, K] (`teacher_score`)."""
        if self.teacher_score == "abnormal":
            return abnormal
        if labels is None:
            raise ValueError("localizer.teacher_score=label needs the labels of the batch")
        abnormal_image = labels.to(abnormal.dtype)[:, None]
        return abnormal_image * abnormal + (1 - abnormal_image) * (1 - abnormal)

    def teacher_pixels(self, inputs: LocalizerInputs) -> int | None:
        """The side the teacher's pass sees the source at (None: the source's own)."""
        if self.teacher_size == "source":
            return None
        return min(inputs.source.shape[-1], round(inputs.view.shape[-1] / (2 * self.mean_half)))

    def training_crops(self, inputs: LocalizerInputs, scorer: Scorer, epoch: int) -> TrainingCrops:
        batch, anchors = len(inputs.source), self.anchors
        pick = self._drawn(batch, inputs.generator)
        drawn = anchors[pick]
        if epoch < self.warmup_epochs:
            return TrainingCrops(drawn[:, None])
        logits = self.anchor_logits(inputs)
        if self.policy == "distill" and self.teacher_from != "pass":
            return self.taught_by_crops(logits, pick, inputs.labels, inputs.view.shape[-1])
        if self.policy == "distill" or epoch < self.warmup_epochs + self.distill_epochs:
            # the images the teacher scores: all, or the taught ones (every other image)
            rows = slice(None) if self.teacher_images == "all" else slice(0, None, 2)
            labels = None if inputs.labels is None else inputs.labels[rows]
            every = anchors.expand(len(logits[rows]), -1, -1)
            size = self.teacher_pixels(inputs)
            scores = self.taught(scorer(every, pooled=True, size=size, rows=rows), labels)
            best = scores.argmax(dim=1)
            loss = F.binary_cross_entropy_with_logits(logits[rows], scores)  # K soft labels each
            agrees = (logits[rows].argmax(dim=1) == best).float().mean()
            if self.train_crops == 2:
                crops = torch.stack([anchors[best], drawn], dim=1)
            else:  # the best anchor in every other image, a drawn one in the others
                crops = drawn.clone()
                crops[0::2] = (
                    anchors[best] if self.teacher_images == "taught" else anchors[best[0::2]]
                )
                crops = crops[:, None]
            return TrainingCrops(
                crops,
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
