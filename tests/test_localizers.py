"""The localizers beyond the paper's, each against an independent computation: anchors, box
pooling, the navigator's teacher and policy, the MIL ceiling, the controls, and building one from
its config node."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kalm_lightning.config import config_dir
from kalm_lightning.errors import UserError
from kalm_lightning.models import KALMNet, Navigator, RandomAnchor
from kalm_lightning.models.kalm import crop, resize_view
from kalm_lightning.models.localizers.base import (
    LocalizerInputs,
    TrainingCrops,
    anchor_grid,
    box_pooling,
    build_localizer,
    crop_pooling,
)


def node(name: str, **options) -> dict:
    """conf/localizer/<name>.yaml as a config node, with options."""
    yaml = OmegaConf.load(config_dir() / "localizer" / f"{name}.yaml")
    return {**OmegaConf.to_container(yaml), **options}


def net_with(name: str, **options) -> KALMNet:
    torch.manual_seed(0)
    return KALMNet("resnet18", image_size=64, source_size=128, localizer=node(name, **options))


def test_anchor_grids_cover_the_image_at_each_size() -> None:
    anchors = anchor_grid([3, 5], [0.5, 0.3])
    assert anchors.shape == (9 + 25, 4)
    assert anchors[:9, 2:].eq(0.5).all() and torch.allclose(anchors[9:, 2:], torch.tensor(0.3))
    for size in (slice(0, 9), slice(9, None)):
        boxes = anchors[size]
        points = torch.rand(500, 2) * 2 - 1
        inside = (points[:, None] - boxes[None, :, :2]).abs() <= boxes[None, :, 2:]
        assert inside.all(dim=2).any(dim=1).all()  # every point lies in some anchor of each size


def test_box_pooling_is_the_average_of_the_map_inside_the_box() -> None:
    torch.manual_seed(1)
    score = torch.randn(2, 8, 6)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # the whole map
            [-0.5, -0.25, 0.5, 0.75],
            [1 / 3, 0.25, 1 / 3, 0.25],  # not aligned with the cells: area-weighted
        ]
    )
    pooled = score.flatten(1) @ box_pooling(boxes, 8, 6).T
    torch.testing.assert_close(pooled[:, 0], score.mean(dim=(1, 2)))
    # box 2 spans x in [-1, 0] (columns 0-2 of 6) and y in [-1, 0.5] (rows 0-5 of 8)
    torch.testing.assert_close(pooled[:, 1], score[:, 0:6, 0:3].mean(dim=(1, 2)))
    # box 3 spans x in [0, 2/3] (columns 3, 4) and y in [0, 0.5] (rows 4, 5), exactly whole cells
    torch.testing.assert_close(pooled[:, 2], score[:, 4:6, 3:5].mean(dim=(1, 2)))
    # on the boxes' device: the navigator's teacher pools anchors on a GPU with no CPU tensor
    assert box_pooling(boxes.to("meta"), 8, 6).device.type == "meta"


@pytest.mark.parametrize("reads", ["map", "view", "source"])
@pytest.mark.parametrize("score", ["label", "abnormal"])
def test_the_navigator_learns_every_anchors_teacher_score_and_trains_cnn_l_on_the_best(
    reads: str, score: str
) -> None:
    net = net_with("navigator", reads=reads, warmup_epochs=1, grid=3, teacher_score=score)
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1])
    anchors = net.localizer.anchors
    abnormal = net.pooled_scores(images, anchors.expand(4, -1, -1))  # computed here, on its own
    if score == "label":  # p(y | A_k): p(normal) in the normal images, p(abnormal) in the others
        teacher = torch.where(labels[:, None] == 1, abnormal, 1 - abnormal)
    else:
        teacher = abnormal
    net.train()
    logits, crops = net.training_outputs(images, 1, torch.Generator().manual_seed(3), labels)
    best = teacher.argmax(dim=1)
    assert torch.equal(crops.boxes[:, 0], anchors[best])  # CNN_l trains on the best anchor...
    assert crops.boxes.shape == (4, 2, 4) and logits.shape == (4, 2, 2)  # ...and a drawn one
    assert all(any(torch.equal(b, a) for a in anchors) for b in crops.boxes[:, 1])
    nav_logits = net.localizer.anchor_logits(net.inputs(images))
    # every anchor's score, K soft labels per image
    torch.testing.assert_close(crops.loss, F.binary_cross_entropy_with_logits(nav_logits, teacher))
    crops.loss.backward()
    assert all(p.grad is not None for p in net.localizer.head.parameters())
    if score == "label":
        with pytest.raises(ValueError, match="teacher_score=label needs the labels"):
            net.training_outputs(images, 1, torch.Generator().manual_seed(3))


def test_the_cheaper_teacher_sees_the_crops_scale_and_cnn_l_one_crop_per_image() -> None:
    """teacher_size=crops: the teacher's pass over the source resized to 64 / (2 x 0.4) = 80 px;
    train_crops=1: the best anchor in images 0 and 2, a drawn one in images 1 and 3."""
    options = {"grid": 3, "half": 0.4, "teacher_size": "crops", "train_crops": 1}
    net = net_with("navigator", warmup_epochs=0, **options)
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1])
    anchors = net.localizer.anchors
    seen = F.interpolate(images, size=(80, 80), mode="bilinear", antialias=True)
    abnormal = net.pooled_scores(seen, anchors.expand(4, -1, -1))  # computed here, on its own
    teacher = torch.where(labels[:, None] == 1, abnormal, 1 - abnormal)
    net.train()
    drawn_with = torch.Generator().manual_seed(3)
    logits, crops = net.training_outputs(images, 0, drawn_with, labels)
    assert crops.boxes.shape == (4, 1, 4) and logits.shape == (4, 1, 2)
    best = anchors[teacher.argmax(dim=1)]
    assert torch.equal(crops.boxes[0::2, 0], best[0::2])
    drawn = anchors[torch.randint(len(anchors), (4,), generator=torch.Generator().manual_seed(3))]
    assert torch.equal(crops.boxes[1::2, 0], drawn[1::2])
    nav_logits = net.localizer.anchor_logits(net.inputs(images))
    torch.testing.assert_close(crops.loss, F.binary_cross_entropy_with_logits(nav_logits, teacher))


def test_the_teacher_on_the_taught_images_gives_their_crops_and_teaches_from_them_alone() -> None:
    """teacher_images=taught: CNN_l's crops are those of teacher_images=all, bit for bit (the best
    anchor in images 0, 2 and 4, a drawn one in 1 and 3), the teacher's pass runs on those three
    images only, and the navigator distils from their scores alone."""
    images = torch.randn(5, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 1])
    nets = {
        teach: net_with(
            "navigator", warmup_epochs=0, grid=3, half=0.4, train_crops=1, teacher_images=teach
        )
        for teach in ("all", "taught")
    }
    nets["taught"].load_state_dict(nets["all"].state_dict())
    net = nets["taught"]  # its teacher, computed here on its own before training updates BN
    abnormal = net.pooled_scores(images[0::2], net.localizer.anchors.expand(3, -1, -1))
    teacher = torch.where(labels[0::2, None] == 1, abnormal, 1 - abnormal)
    seen: dict[str, list[int]] = {}
    for teach, net in nets.items():
        net.train()
        stem = next(m for m in net.local_cnn.modules() if isinstance(m, torch.nn.Conv2d))
        hook = stem.register_forward_hook(  # every pass of CNN_l: teacher's, crops'
            lambda _m, args, _o, teach=teach: seen.setdefault(teach, []).append(len(args[0]))
        )
        _, crops = net.training_outputs(images, 0, torch.Generator().manual_seed(3), labels)
        hook.remove()
        if teach == "all":
            every = crops
    assert torch.equal(crops.boxes, every.boxes) and crops.boxes.shape == (5, 1, 4)
    # the teacher's pass over 5 images (all) or 3 (taught), then CNN_l on one crop per image
    assert seen == {"all": [5, 5], "taught": [3, 5]}
    nav_logits = net.localizer.anchor_logits(net.inputs(images))[0::2]
    torch.testing.assert_close(crops.loss, F.binary_cross_entropy_with_logits(nav_logits, teacher))
    with pytest.raises(
        UserError, match=r"^localizer\.teacher_images=taught needs localizer\.train_crops=1"
    ):
        net_with("navigator", teacher_images="taught")


@pytest.mark.parametrize("train_crops", [1, 2])
def test_the_teacher_from_the_crops_runs_no_pass_and_teaches_the_anchors_cnn_l_trained_on(
    train_crops: int,
) -> None:
    """teacher_from=crops: CNN_l runs once, on the navigator's choice and a drawn anchor (one
    crop: the choice in images 0, 2, 4, the drawn anchor in 1, 3), and its p(label) of those very
    crops are the navigator's soft labels for their anchors."""
    net = net_with(
        "navigator",
        warmup_epochs=0,
        grid=3,
        half=0.4,
        train_crops=train_crops,
        teacher_from="crops",
    )
    images = torch.randn(5, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 1])
    anchors = net.localizer.anchors
    net.train()
    nav_logits = net.localizer.anchor_logits(net.inputs(images))
    greedy = nav_logits.argmax(dim=1)
    drawn = torch.randint(len(anchors), (5,), generator=torch.Generator().manual_seed(3))
    chosen = torch.stack([greedy, drawn], 1) if train_crops == 2 else greedy[:, None].clone()
    if train_crops == 1:
        chosen[1::2, 0] = drawn[1::2]
    stem = next(m for m in net.local_cnn.modules() if isinstance(m, torch.nn.Conv2d))
    passes: list[int] = []
    hook = stem.register_forward_hook(lambda _m, args, _o: passes.append(len(args[0])))
    logits, crops = net.training_outputs(images, 0, torch.Generator().manual_seed(3), labels)
    hook.remove()
    assert passes == [5 * train_crops]  # CNN_l on the crops, and no teacher's pass
    assert torch.equal(crops.boxes, anchors[chosen])
    abnormal = logits.detach().softmax(-1)[..., 1]
    teacher = torch.where(labels[:, None] == 1, abnormal, 1 - abnormal)
    expected = F.binary_cross_entropy_with_logits(nav_logits.gather(1, chosen), teacher)
    torch.testing.assert_close(crops.loss, expected)
    crops.loss.backward()
    assert all(p.grad is not None for p in net.localizer.head.parameters())
    assert all(p.grad is None for p in net.local_cnn.parameters())  # q is detached


def test_crop_pooling_is_box_pooling_in_the_crops_own_frame() -> None:
    """A box's shares of a crop's cells: the whole image's crop is the image (box_pooling); a
    crop of the box itself spreads it evenly over every cell; a box half out of the crop sums to
    one half."""
    boxes = torch.tensor([[0.2, -0.1, 0.3, 0.5], [-0.6, 0.6, 0.4, 0.4]])
    whole = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    torch.testing.assert_close(crop_pooling(boxes, whole, 4, 3)[0, 0], box_pooling(boxes, 4, 3))
    itself = crop_pooling(boxes, boxes[None], 4, 4)  # crop m = box m
    torch.testing.assert_close(itself[0, 0, 0], torch.full((16,), 1 / 16))
    torch.testing.assert_close(itself[0, 1, 1], torch.full((16,), 1 / 16))
    shifted = torch.tensor([[[0.5, -0.1, 0.3, 0.5]]])  # box 0 moved right by its half-extent
    torch.testing.assert_close(crop_pooling(boxes, shifted, 5, 5)[0, 0, 0].sum(), torch.tensor(0.5))


def test_cnn_l_cells_average_to_its_crop_scores() -> None:
    """local_readout: the classifier on each cell of a crop's map; their mean is the crop's S_l
    (eq. 3 is linear), as local_logits gives it."""
    net = net_with("navigator", grid=3, half=0.4).eval()
    images = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    boxes = net.localizer.anchors[torch.tensor([[0, 4], [8, 2], [5, 5]])]
    logits, cells = net.local_readout(images, boxes)
    assert cells.shape[:3] == (3, 2, 2) and not cells.requires_grad
    torch.testing.assert_close(logits, net.local_logits(images, boxes))
    torch.testing.assert_close(cells.mean(dim=(3, 4)), logits.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seen", [0.5, 0.2])
def test_the_teacher_from_the_maps_teaches_every_anchor_the_crops_show(seen: float) -> None:
    """teacher_from=maps: the crops of teacher_from=crops, one pass of CNN_l, and each anchor the
    crop shows enough of is taught by CNN_l's cells inside it. 3x3 anchors of half 0.4 are 0.6
    apart: a neighbour shows 0.25 of itself in a crop (a diagonal one 0.0625), so at
    teacher_seen=0.5 a crop teaches its own anchor alone, at 0.2 its neighbours across too."""
    options = dict(warmup_epochs=0, grid=3, half=0.4, train_crops=1, teacher_seen=seen)
    net = net_with("navigator", **options, teacher_from="maps")
    images = torch.randn(5, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 1])
    anchors = net.localizer.anchors
    net.train()
    nav_logits = net.localizer.anchor_logits(net.inputs(images))
    stem = next(m for m in net.local_cnn.modules() if isinstance(m, torch.nn.Conv2d))
    passes: list[int] = []
    hook = stem.register_forward_hook(lambda _m, args, _o: passes.append(len(args[0])))
    logits, crops = net.training_outputs(images, 0, torch.Generator().manual_seed(3), labels)
    hook.remove()
    assert passes == [5]  # CNN_l on one crop per image, and no teacher's pass
    from_crops = net_with("navigator", **options, teacher_from="crops").train()
    _, same = from_crops.training_outputs(images, 0, torch.Generator().manual_seed(3), labels)
    assert torch.equal(crops.boxes, same.boxes)  # the crops of teacher_from=crops
    chosen = (crops.boxes[:, 0, None, :] == anchors[None]).all(-1).float().argmax(dim=1)
    # the cells again, on their own: CNN_l (train mode, the same batch) on the same crops
    features = net.local_cnn.forward_features(crop(images, crops.boxes[:, 0], 64)).detach()
    cells = torch.einsum("bchw,oc->bohw", features, net.local_cnn.fc.weight)
    cells = (cells + net.local_cnn.fc.bias[:, None, None])[:, None]
    teacher, taught = net.localizer.seen_scores([crops.boxes], [cells], labels)
    neighbours = (anchors[:, None, :2] - anchors[None, :, :2]).abs()  # [K, K, 2]
    across = ((neighbours.sum(-1) - 0.6).abs() < 1e-4) & (neighbours.min(-1).values < 1e-4)
    expected = torch.eye(len(anchors)) + (across.float() if seen < 0.25 else 0)
    assert torch.equal(taught, expected[chosen])
    abnormal = logits.detach().softmax(-1)[:, 0, 1]  # a crop's own anchor: the crop's p(label)
    own = torch.where(labels == 1, abnormal, 1 - abnormal)
    torch.testing.assert_close(teacher.gather(1, chosen[:, None])[:, 0], own, atol=1e-5, rtol=0)
    # the neighbour to the right lies over the right half of the crop (1.5 to the right in the
    # crop's frame, of half 1): its share, the crop's right column of cells (2 x 2 here)
    right = (chosen % 3 < 2).nonzero()[:, 0]
    assert len(right) > 0
    column = cells[right, 0, :, :, 1].mean(dim=-1).softmax(-1)[:, 1]
    column = torch.where(labels[right] == 1, column, 1 - column)
    torch.testing.assert_close(teacher[right, chosen[right] + 1], column, atol=1e-5, rtol=0)
    each = F.binary_cross_entropy_with_logits(nav_logits, teacher, reduction="none")
    torch.testing.assert_close(crops.loss, (each * taught).sum() / taught.sum())
    assert torch.equal(crops.logs["train/navigator_taught"], taught.sum(1).mean())
    crops.loss.backward()
    assert all(p.grad is not None for p in net.localizer.head.parameters())
    assert all(p.grad is None for p in net.local_cnn.parameters())  # q is detached
    with pytest.raises(UserError, match=r"^localizer\.teacher_seen"):
        net_with("navigator", teacher_seen=0)


@pytest.mark.parametrize("every", [0, 3])
def test_drawn_every_sets_which_images_crop_a_drawn_anchor(every: int) -> None:
    """teacher_from=maps, one crop per image: the navigator's choice, and a drawn anchor in every
    `drawn_every`-th image (0: none); refused where the teacher's pass picks the crops."""
    options = dict(warmup_epochs=0, grid=3, half=0.4, train_crops=1, teacher_from="maps")
    net = net_with("navigator", **options, drawn_every=every).train()
    images = torch.randn(6, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    greedy = net.localizer.anchor_logits(net.inputs(images)).argmax(dim=1)
    drawn = torch.randint(9, (6,), generator=torch.Generator().manual_seed(3))
    _, crops = net.training_outputs(
        images, 0, torch.Generator().manual_seed(3), torch.tensor([0, 1, 0, 1, 1, 0])
    )
    expected = greedy.clone()
    if every:
        expected[every - 1 :: every] = drawn[every - 1 :: every]
    assert torch.equal(crops.boxes[:, 0], net.localizer.anchors[expected])
    with pytest.raises(
        UserError, match=r"^localizer\.drawn_every=0 needs localizer\.train_crops=1"
    ):
        net_with("navigator", drawn_every=0)


@pytest.mark.parametrize("teacher", ["maps", "crops"])
def test_teacher_crops_2_teaches_from_both_crops_while_cnn_l_trains_on_one(teacher: str) -> None:
    """teacher_crops=2: CNN_l trains on train_crops=1's crops (the navigator's choice in images
    0, 2, 4, a drawn anchor in 1, 3) and looks at the other of the two in a second pass, without
    gradients; the teacher reads both, as train_crops=2's does: with CNN_l's batch statistics
    fixed (eval mode) the two teach the navigator the same loss. Refused with the teacher's pass
    or two training crops."""
    options = dict(warmup_epochs=0, grid=3, half=0.4, teacher_from=teacher)
    images = torch.randn(5, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 1])

    def step(net: KALMNet) -> tuple[torch.Tensor, TrainingCrops]:
        return net.training_outputs(images, 0, torch.Generator().manual_seed(3), labels)

    looks = net_with("navigator", **options, train_crops=1, teacher_crops=2).train()
    stem = next(m for m in looks.local_cnn.modules() if isinstance(m, torch.nn.Conv2d))
    passes: list[tuple[int, bool]] = []
    hook = stem.register_forward_hook(
        lambda _m, args, _o: passes.append((len(args[0]), torch.is_grad_enabled()))
    )
    logits, crops = step(looks)
    hook.remove()
    assert passes == [(5, True), (5, False)]  # the training crops, then the looked-at ones
    assert logits.shape == (5, 1, 2)
    _, one = step(net_with("navigator", **options, train_crops=1).train())
    assert torch.equal(crops.boxes, one.boxes)
    _, two = step(net_with("navigator", **options, train_crops=2).train())
    both = torch.cat([crops.boxes, crops.extra], dim=1)  # per image: [choice, drawn] or reversed
    assert torch.equal(both[0::2], two.boxes[0::2]) and torch.equal(
        both[1::2], two.boxes[1::2].flip(1)
    )
    crops.loss.backward()
    assert all(p.grad is not None for p in looks.localizer.head.parameters())
    assert all(p.grad is None for p in looks.local_cnn.parameters())  # q is detached
    fixed = [
        step(net_with("navigator", **options, **crops_of).eval())[1].loss
        for crops_of in ({"train_crops": 1, "teacher_crops": 2}, {"train_crops": 2})
    ]
    torch.testing.assert_close(fixed[0], fixed[1])
    assert not torch.allclose(
        fixed[0], step(net_with("navigator", **options, train_crops=1).eval())[1].loss
    )
    refused = (  # the teacher's pass; fewer crops to teach than CNN_l trains on
        {"train_crops": 1, "teacher_crops": 2},
        {"train_crops": 2, "teacher_crops": 1, "teacher_from": teacher},
    )
    for options in refused:
        with pytest.raises(
            UserError,
            match=rf"^localizer\.teacher_crops={options['teacher_crops']} needs localizer\.train_crops=1 and",
        ):
            net_with("navigator", **options)


@pytest.mark.parametrize("teacher", ["maps", "crops"])
def test_drawn_scale_reads_the_drawn_crop_smaller_and_trains_on_both(teacher: str) -> None:
    """drawn_scale (two crops per image): CNN_l trains on the navigator's choice at its own size
    and on the drawn anchor at that fraction of it, both with gradients, and the teacher reads
    both; at scale 1 it is train_crops=2 itself (the same S_l and the same navigator loss).
    Refused with one training crop."""
    options = dict(warmup_epochs=0, grid=3, half=0.4, teacher_from=teacher, train_crops=2)
    images = torch.randn(5, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 1])

    def step(net: KALMNet) -> tuple[torch.Tensor, TrainingCrops]:
        return net.training_outputs(images, 0, torch.Generator().manual_seed(3), labels)

    small = net_with("navigator", **options, drawn_scale=0.5).train()
    stem = next(m for m in small.local_cnn.modules() if isinstance(m, torch.nn.Conv2d))
    passes: list[tuple[int, int, bool]] = []
    hook = stem.register_forward_hook(
        lambda _m, args, _o: passes.append((*args[0].shape[::3], torch.is_grad_enabled()))
    )
    logits, crops = step(small)
    hook.remove()
    assert passes == [(5, 64, True), (5, 32, True)]  # the choice at 64 px, the drawn one at 32
    assert logits.shape == (5, 2, 2) and logits.requires_grad
    _, two = step(net_with("navigator", **options).train())
    assert torch.equal(torch.cat([crops.boxes, crops.extra], dim=1), two.boxes)
    whole = [  # scale 1 against two crops at one size, CNN_l's batch statistics fixed
        step(net_with("navigator", **options, **scale).eval())
        for scale in ({"drawn_scale": 1.0}, {})
    ]
    torch.testing.assert_close(whole[0][0], whole[1][0])
    torch.testing.assert_close(whole[0][1].loss, whole[1][1].loss)
    with pytest.raises(
        UserError, match=r"^localizer\.drawn_scale=0\.5 needs localizer\.train_crops=2 and"
    ):
        net_with("navigator", **{**options, "train_crops": 1}, drawn_scale=0.5)


def test_a_navigator_node_with_a_removed_option_loads_at_its_one_value_or_is_refused() -> None:
    old = {"teacher": "pooled", "target": "scores", "inference": "navigator"}
    assert isinstance(net_with("navigator", **old).localizer, Navigator)
    with pytest.raises(UserError, match=r"^localizer\.target=best was removed"):
        net_with("navigator", target="best")
    with pytest.raises(UserError, match=r"unexpected keyword argument 'nope'"):
        net_with("navigator", nope=1)


def test_the_teachers_crops_and_pooled_scores_agree_on_the_whole_image() -> None:
    net = net_with("navigator").eval()
    images = torch.randn(2, 3, 128, 128)
    whole = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]).expand(2, 1, 4)
    # pooled over the whole map is CNN_l's GAP on the source; a crop of the whole image is the
    # source resized to the input size: both are CNN_l's p(abnormal), at two scales
    pooled = net.pooled_scores(images, whole)[:, 0]
    direct = net.local_cnn(images).float().softmax(-1)[:, 1]
    torch.testing.assert_close(pooled, direct, atol=1e-5, rtol=1e-4)
    crops = net.crop_scores(images, whole)[:, 0]
    resized = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        crops, net.local_cnn(resized).float().softmax(-1)[:, 1], atol=2e-2, rtol=0
    )


def test_warm_up_trains_cnn_l_on_one_drawn_anchor_and_no_navigator_loss() -> None:
    net = net_with("navigator", warmup_epochs=2).train()
    images = torch.randn(3, 3, 128, 128)
    _, crops = net.training_outputs(images, epoch=1, generator=torch.Generator().manual_seed(0))
    assert crops.boxes.shape == (3, 1, 4) and crops.loss is None


def test_reinforce_trains_on_the_sampled_and_the_greedy_anchor() -> None:
    net = net_with("navigator", policy="reinforce", warmup_epochs=0, distill_epochs=1).train()
    images, labels = torch.randn(4, 3, 128, 128), torch.tensor([0, 1, 1, 0])
    generator = torch.Generator().manual_seed(4)
    _, distilled = net.training_outputs(images, 0, generator, labels)
    assert "train/navigator_agrees" in distilled.logs  # epoch 0: still distilling
    _, crops = net.training_outputs(images, 1, generator, labels)
    greedy = net.localizer.anchors[net.localizer.anchor_logits(net.inputs(images)).argmax(1)]
    assert torch.equal(crops.boxes[:, 1], greedy) and crops.boxes.shape == (4, 2, 4)
    assert torch.isfinite(crops.loss) and "train/navigator_advantage" in crops.logs
    crops.loss.backward()
    assert any(p.grad.abs().sum() > 0 for p in net.localizer.head.parameters())


@pytest.mark.parametrize("name", ["navigator", "random"])
def test_mil_keeps_the_candidate_cnn_l_finds_most_abnormal(name: str) -> None:
    net = net_with(name, grid=3).eval()
    images = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    anchors = net.localizer.anchors
    with torch.no_grad():
        out = net.mil(images)
        every = net.crop_scores(images, anchors.expand(3, -1, -1))
    torch.testing.assert_close(out.local_prob, every.max(dim=1).values)
    assert torch.equal(out.boxes, anchors[every.argmax(dim=1)])
    assert net(images).boxes.shape == (3, 4)  # locate: one box per image, always


def test_a_localizer_that_computes_its_box_has_no_candidates() -> None:
    for name in ("kalm", "fixed", "full"):
        with pytest.raises(ValueError, match="has no candidate boxes"):
            net_with(name).mil(torch.randn(1, 3, 128, 128))


def test_the_navigator_uses_one_crop_at_inference() -> None:
    net = net_with("navigator", grid=3).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = net(images)
        chosen = net.localizer.anchor_logits(net.inputs(images)).argmax(dim=1)
    assert torch.equal(out.boxes, net.localizer.anchors[chosen])


def test_random_anchor_draws_uniformly_from_the_grid_and_repeats_at_inference() -> None:
    localizer = build_localizer(node("random", grid=2), 2, 2, 8)
    source = torch.zeros(400, 3, 8, 8)  # what it is drawn for; it reads nothing of it
    inputs = LocalizerInputs(torch.zeros(400, 8, 2, 2), torch.zeros(8), source, source)
    first, again = localizer.locate(inputs), localizer.locate(inputs)
    assert torch.equal(first, again)  # an evaluation is repeatable
    counts = torch.stack([(first == a).all(dim=1).sum() for a in localizer.anchors])
    assert counts.sum() == 400 and counts.min() > 60  # each of the 4 anchors about 100 times
    seeded = LocalizerInputs(*vars(inputs).values())
    seeded.generator = torch.Generator().manual_seed(7)
    assert not torch.equal(localizer.locate(seeded), first)  # training draws from its step


def test_the_brightest_anchor_is_the_one_over_the_bright_blob() -> None:
    """A bright square in one corner of the view, another in the opposite corner of a second
    image: each image's box is the anchor over its own square, chosen from the view alone."""
    localizer = build_localizer(node("brightest", grid=3, half=1 / 3), 2, 2, 8)
    view = torch.zeros(2, 3, 12, 12)
    view[0, :, 0:4, 8:12] = 1.0  # top right
    view[1, :, 8:12, 0:4] = 1.0  # bottom left
    inputs = LocalizerInputs(torch.zeros(2, 8, 2, 2), torch.zeros(8), view, view)
    boxes = localizer.locate(inputs)
    third = 2 / 3
    assert torch.allclose(boxes[0], torch.tensor([third, -third, 1 / 3, 1 / 3]))
    assert torch.allclose(boxes[1], torch.tensor([-third, third, 1 / 3, 1 / 3]))
    assert localizer.candidates(inputs).shape == (2, 9, 4)


def test_a_node_that_names_anything_but_a_localizer_is_refused() -> None:
    with pytest.raises(UserError, match=r"localizer\._target_=os\.system is not a localizer"):
        build_localizer({"_target_": "os.system", "command": "true"}, 4, 4, 8)
    with pytest.raises(UserError, match=r"not a localizer"):
        build_localizer({"_target_": "kalm_lightning.models.kalm.crop"}, 4, 4, 8)
    built = build_localizer(node("random", grid=3), 4, 4, 8)
    assert isinstance(built, RandomAnchor) and len(built.anchors) == 9
    assert isinstance(build_localizer(node("navigator"), 4, 4, 8), Navigator)


def test_bad_localizer_options_give_one_line() -> None:
    with pytest.raises(
        UserError, match=r"^localizer\.reads='eyes' is not one of map, view, source$"
    ):
        net_with("navigator", reads="eyes")
    with pytest.raises(UserError, match=r"^localizer\.train_crops=3 is not one of 2, 1$"):
        net_with("navigator", train_crops=3)
    with pytest.raises(UserError, match=r"^localizer\.half=1\.5 must be > 0 and <= 1$"):
        net_with("fixed", half=1.5)
    with pytest.raises(UserError, match=r"unexpected keyword argument 'nope'"):
        net_with("full", nope=1)


@pytest.mark.parametrize(
    ("name", "options", "passes"),
    [
        ("navigator", {"reads": "source"}, 0),
        ("navigator", {"reads": "map"}, 1),
        ("kalm", {}, 1),
        ("multicrop", {"k": 2}, 0),
    ],
)
def test_a_training_step_runs_cnn_g_only_for_a_localizer_that_reads_its_map(
    name: str, options: dict, passes: int
) -> None:
    """Stage 2 trains CNN_l on its crops; frozen CNN_g's feature map is computed when a
    localizer first reads it, so a localizer that reads the source costs no CNN_g pass, and the
    step's outputs are those of a step given the map computed beforehand."""
    net = (
        net_with(name, warmup_epochs=0, **options)
        if name == "navigator"
        else net_with(name, **options)
    )
    net.train()
    net.global_cnn.eval()  # as stage 2 holds it
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1])
    twin = copy.deepcopy(net)  # a step moves CNN_l's BatchNorm statistics: the other step's twin
    first_conv = next(m for m in net.global_cnn.modules() if isinstance(m, torch.nn.Conv2d))
    calls = []
    hook = first_conv.register_forward_hook(lambda *_: calls.append(1))
    lazy, crops = net.training_outputs(images, 1, torch.Generator().manual_seed(0), labels)
    hook.remove()
    assert len(calls) == passes
    with torch.no_grad():
        features = twin.global_cnn.forward_features(resize_view(images, 64))
    given, given_crops = twin.training_outputs(
        images, 1, torch.Generator().manual_seed(0), labels, features
    )
    assert torch.equal(lazy, given) and torch.equal(crops.boxes, given_crops.boxes)
