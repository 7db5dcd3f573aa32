"""The K-crop localizers: `localizer=multicrop` (K disjoint windows from a scout's saliency map,
read by CNN_l together and pooled by gated attention) and `localizer=sampling` (K windows drawn
from an attention distribution, averaged); through the CLI in stage 2, evaluate, predict and
export (their ONNX parity: test_predict)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_RUN, check, run_cli

from kalm_lightning.data.geometry import PIXEL_BOX, crop_box, crop_weight
from kalm_lightning.errors import UserError
from kalm_lightning.models import KALMNet, MultiCrop
from kalm_lightning.models.localizers import AttentionSampling
from kalm_lightning.models.localizers.base import anchor_grid, build_localizer, node_of
from kalm_lightning.models.localizers.multicrop import greedy_windows, top_pooling
from kalm_lightning.models.localizers.scout import SCOUTS, make_scout
from kalm_lightning.stages.loading import load_stage

DATA = [arg for arg in TINY_RUN if arg.startswith("data.")]


def net(**options) -> KALMNet:
    torch.manual_seed(0)
    return KALMNet("resnet18", 64, 256, localizer=node_of(MultiCrop, **options))


def test_the_greedy_windows_are_the_best_disjoint_anchors_best_first() -> None:
    anchors = anchor_grid(7, 0.25)
    scores = torch.randn(5, len(anchors), generator=torch.Generator().manual_seed(1))
    picked = greedy_windows(scores, anchors, 4)
    assert (picked[:, 0] == scores.argmax(1)).all()
    for row in range(5):
        boxes = anchors[picked[row]]
        for i in range(4):
            for j in range(i):  # no two windows share area
                apart = (boxes[i, :2] - boxes[j, :2]).abs() >= boxes[i, 2:] + boxes[j, 2:] - 1e-6
                assert apart.any()
        chosen = scores[row, picked[row]]
        assert (chosen[:-1] >= chosen[1:]).all()  # each the best of what was left


def test_top_pooling_is_the_mean_of_the_highest_share_of_cells() -> None:
    maps = torch.tensor([[0.0, 1.0, 5.0, 3.0, 2.0, -1.0, 4.0, 0.5, 0.2, 0.1]])
    assert top_pooling(maps, 0.2).item() == pytest.approx(4.5)
    assert top_pooling(maps, 0.01).item() == pytest.approx(5.0)  # at least one cell


def test_cnn_l_reads_k_windows_whose_attention_weighs_them_and_trains_scout_and_attention() -> None:
    model = net(k=3)
    images = torch.randn(2, 3, 256, 256)
    out = model(images)
    assert out.boxes.shape == (2, 4) and out.crops.shape == (2, 3, 4)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2))
    top = out.crops[torch.arange(2), out.attention.argmax(1)]
    assert torch.equal(out.boxes, top)
    assert model.localizer.locate(model.inputs(images)).shape == (2, 4)  # one box, always
    logits, crops = model.training_outputs(images, 0, None, torch.tensor([0, 1]))
    assert logits.shape == (2, 1, 2) and crops.together and crops.loss is not None
    (torch.nn.functional.cross_entropy(logits[:, 0], torch.tensor([0, 1])) + crops.loss).backward()
    for part in (model.localizer.head, model.localizer.attention, model.local_cnn.fc):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert (
        model.local_cnn.conv.conv1.weight.grad.abs().sum() > 0
    )  # (timm zeroes each block's last BN)


def test_each_scout_head_learns_from_its_own_loss_and_the_windows_come_from_the_lowest() -> None:
    """heads=3: three scouts side by side; a step's running losses are each head's own BCE of
    its top-t% logit; the map the windows come from is the head whose running loss is lowest,
    computed alone (`run_head`) equal to that head's map among all of them."""
    model = net(k=2, heads=3)
    localizer = model.localizer
    images, labels = torch.randn(2, 3, 256, 256), torch.tensor([0, 1])
    inputs = model.inputs(images)
    maps = localizer.maps(inputs)
    assert maps.shape[1] == 3 and localizer.head_loss.isnan().all()
    own = [
        torch.nn.functional.binary_cross_entropy_with_logits(
            top_pooling(maps[:, h].flatten(1), localizer.t), labels.float()
        )
        for h in range(3)
    ]
    _, crops = model.training_outputs(images, 0, None, labels)
    torch.testing.assert_close(localizer.head_loss, torch.stack(own).detach())
    crops.loss.backward()  # the sum of the heads' own losses: no head's gradient reaches another
    head0 = localizer.head[0].weight.grad.unflatten(0, (3, -1))
    localizer.zero_grad()
    own[1].backward()
    assert torch.equal(
        localizer.head[0].weight.grad.unflatten(0, (3, -1))[0], torch.zeros_like(head0[0])
    )
    localizer.head_loss.copy_(torch.tensor([0.5, 0.1, 0.9]))
    with torch.no_grad():
        torch.testing.assert_close(localizer.saliency(inputs), localizer.maps(inputs)[:, 1])
        assert torch.equal(model(images).crops, localizer.windows_of(localizer.maps(inputs)[:, 1]))
    with pytest.raises(UserError, match=r"localizer.heads=2: sampling's scout learns from CNN_l"):
        build_localizer(node_of(AttentionSampling, heads=2), 4, 4, 512)


def test_more_windows_than_anchors_are_refused_in_one_line() -> None:
    with pytest.raises(UserError, match=r"localizer.k=10 windows but localizer.grid=3 has 9"):
        build_localizer(node_of(MultiCrop, k=10, grid=3), 4, 4, 512)


def best(run: Path) -> str:
    return json.loads((run / "result.json").read_text())["best_ckpt"]


def test_evaluate_scores_every_window_and_the_one_weighed_most(
    multicrop: dict[str, Path], tmp_path: Path
) -> None:
    check(run_cli("evaluate", [f"ckpt_path={best(multicrop['stage2'])}", *DATA], tmp_path))
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    loc = metrics["localization"]
    assert loc["windows"] == 2 and loc["n"] > 0
    assert loc["hit_rate"] >= loc["hit_rate_top"]
    frame = pd.read_csv(next(tmp_path.rglob("predictions_images.csv")))
    weights = frame[[crop_weight(1), crop_weight(2)]].to_numpy()
    np.testing.assert_allclose(weights.sum(1), 1, atol=1e-5)
    top = np.where(weights[:, :1] >= weights[:, 1:], frame[crop_box(1)], frame[crop_box(2)])
    np.testing.assert_array_equal(frame[PIXEL_BOX].to_numpy(), top)


def test_predict_writes_every_window_and_draws_them(
    multicrop: dict[str, Path], tmp_path: Path
) -> None:
    images = next((multicrop["work"] / "data").rglob("valid/XR_*/*/*"))
    args = [f"ckpt_path={best(multicrop['stage2'])}", f"images={images}", "overlays=true"]
    check(run_cli("predict", [*args, f"output={tmp_path / 'out'}"], tmp_path))
    frame = pd.read_csv(tmp_path / "out" / "predictions_images.csv")
    assert frame["error"].isna().all()
    assert {*crop_box(1), *crop_box(2), crop_weight(1), crop_weight(2), "crops_area"} <= set(frame)
    assert all((tmp_path / "out" / name).is_file() for name in frame["overlay"])


@pytest.mark.parametrize("kind", SCOUTS)
def test_only_a_local_scouts_cells_see_their_receptive_field_alone(kind: str) -> None:
    """Why study 3's first K-crop scout could not find a lesion among decoys: with GroupNorm,
    texture in one corner of the image moves the cells of the opposite corner, so a scout taught
    through top-t% pooling can classify from wherever its map is highest (the border) without
    placing its high cells on the lesion. A local scout's far cells cannot move: each of its cells
    sees 31 px, so its image logit rises only where the lesion is."""
    torch.manual_seed(0)
    scout = make_scout(8, kind).eval()
    image = torch.rand(1, 3, 128, 128)
    textured = image.clone()
    textured[..., :32, :32] += torch.tensor([1.0, -1.0]).repeat(16)  # stripes, top-left corner
    with torch.no_grad():
        moved = (scout(textured) - scout(image))[0, 0].abs()  # [8, 8] cells of 16 px
    assert moved[:2, :2].amax() > 0  # the cells over the texture answer it
    far = moved[4:, 4:]  # cells whose 31 px start at 57 px or more: nothing of the corner
    if kind == "local":
        assert far.amax() == 0
    else:
        assert far.amin() > 0


def test_a_checkpoint_written_before_the_scout_option_loads_its_groupnorm_scout(
    multicrop: dict[str, Path], tmp_path: Path
) -> None:
    """A stage-2 checkpoint whose localizer node has no `scout` nor `heads` (written before the
    options) ran one GroupNorm scout: it loads as that, not as today's default, whose weights it
    lacks."""
    checkpoint = torch.load(best(multicrop["stage2"]), map_location="cpu", weights_only=True)
    node = checkpoint["hyper_parameters"]["net"]["localizer"]
    assert node.pop("scout") == "local"  # what the YAML gives a run of this version
    assert node.pop("heads") > 1  # nor `heads`: one head, with no running losses
    head = "net.localizer.head."
    weights = checkpoint["state_dict"]
    del weights["net.localizer.head_loss"]
    for key in [key for key in weights if key.startswith(head)]:
        del weights[key]
    old = make_scout(node["scout_width"], "group").state_dict()
    weights.update({head + key: value for key, value in old.items()})
    path = tmp_path / "before.ckpt"
    torch.save(checkpoint, path)
    module = load_stage(str(path))
    assert any(isinstance(layer, torch.nn.GroupNorm) for layer in module.net.localizer.head)
    out = module(torch.randn(2, 3, 128, 128))
    assert out.crops.shape == (2, 2, 4)


def sampling_net(**options) -> KALMNet:
    torch.manual_seed(0)
    return KALMNet("resnet18", 64, 256, localizer=node_of(AttentionSampling, **options))


def test_attention_sampling_averages_the_k_best_windows_weighed_by_attention() -> None:
    model = sampling_net(k=3).eval()
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        out = model(images)
        attention = model.localizer.attention(model.inputs(images))
    assert out.crops.shape == (2, 3, 4) and out.boxes.shape == (2, 4)
    picks = greedy_windows(attention, model.localizer.anchors, 3)
    assert torch.equal(out.crops, model.localizer.anchors[picks])  # the K best, disjoint
    chosen = attention.gather(1, picks)
    torch.testing.assert_close(out.attention, chosen / chosen.sum(1, keepdim=True))
    assert torch.equal(out.boxes, out.crops[torch.arange(2), out.attention.argmax(1)])


def test_attention_sampling_draws_from_the_attention_and_its_gradient_reaches_the_scout() -> None:
    model = sampling_net(k=4, entropy=0.0)
    images, labels = torch.randn(2, 3, 256, 256), torch.tensor([0, 1])
    draws = [
        model.localizer.training_crops(
            model.inputs(images, torch.Generator().manual_seed(seed), labels), None, 0
        )
        for seed in (7, 7, 8)
    ]
    assert torch.equal(draws[0].boxes, draws[1].boxes)  # the step's generator decides
    assert not torch.equal(draws[0].boxes, draws[2].boxes)
    crops = draws[0]
    assert crops.together and crops.boxes.shape == (2, 4, 4)
    torch.testing.assert_close(crops.scale, torch.ones(2, 4))  # a / sg(a): the value of a mean
    assert crops.loss.item() == 0.0  # entropy=0: no loss of its own
    logits, _ = model.training_outputs(images, 0, torch.Generator().manual_seed(7), labels)
    torch.nn.functional.cross_entropy(logits[:, 0], labels).backward()
    for part in (model.localizer.head, model.local_cnn.fc):  # the scout learns from CNN_l's loss
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_attention_sampling_refuses_more_windows_than_anchors_in_one_line() -> None:
    with pytest.raises(UserError, match=r"localizer.k=10 windows but localizer.grid=3 has 9"):
        build_localizer(node_of(AttentionSampling, k=10, grid=3), 4, 4, 512)


@pytest.mark.slow
def test_attention_sampling_trains_and_evaluates_through_the_cli(
    sampling: dict[str, Path], tmp_path: Path
) -> None:
    check(run_cli("evaluate", [f"ckpt_path={best(sampling['stage2'])}", *DATA], tmp_path))
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert metrics["localization"]["windows"] == 2 and metrics["localization"]["n"] > 0
    frame = pd.read_csv(next(tmp_path.rglob("predictions_images.csv")))
    np.testing.assert_allclose(frame[[crop_weight(1), crop_weight(2)]].sum(1), 1, atol=1e-5)
