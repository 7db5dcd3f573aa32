"""KALM's equations (4)-(9) against independent computations, gradients, backbones and weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import check
from omegaconf import OmegaConf
from safetensors.torch import save_file

from kalm_lightning.config import config_dir
from kalm_lightning.models import Backbone, KALMNet, KeyAreaLocalizer, crop


def node(name: str, **options) -> dict:
    """conf/localizer/<name>.yaml as the config node KALMNet is built from, with options."""
    return {
        **OmegaConf.to_container(OmegaConf.load(config_dir() / "localizer" / f"{name}.yaml")),
        **options,
    }


def reference_boxes(fmap: np.ndarray, fc_w, fc_h, centre: str) -> np.ndarray:
    """Eq. (4)-(7) written out with numpy loops, one image at a time."""
    boxes = []
    for f in fmap:
        agg = f.sum(axis=0)
        height, width = agg.shape
        v_w = np.array([agg[:, j].sum() for j in range(width)])
        v_h = np.array([agg[i, :].sum() for i in range(height)])
        v_w = (v_w - v_w.min()) / (v_w.max() - v_w.min())
        v_h = (v_h - v_h.min()) / (v_h.max() - v_h.min())
        offset = 0.5 if centre == "cell" else 0.0
        x = (int(np.argmax(v_w)) + offset) / width * 2 - 1
        y = (int(np.argmax(v_h)) + offset) / height * 2 - 1
        sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
        w = sigmoid(fc_w.weight.detach().numpy() @ v_w + fc_w.bias.detach().numpy())[0]
        h = sigmoid(fc_h.weight.detach().numpy() @ v_h + fc_h.bias.detach().numpy())[0]
        boxes.append([x, y, w, h])
    return np.array(boxes)


@pytest.mark.parametrize("centre", ["paper", "cell"])
@pytest.mark.parametrize(("height", "width"), [(7, 7), (5, 5), (4, 6), (14, 9)])
def test_localizer_matches_equations(centre: str, height: int, width: int) -> None:
    torch.manual_seed(height * width)
    localizer = KeyAreaLocalizer(height, width, centre)
    fmap = torch.randn(3, 16, height, width).relu()
    expected = reference_boxes(
        fmap.double().numpy(), localizer.fc_w.double(), localizer.fc_h.double(), centre
    )
    localizer.float()
    np.testing.assert_allclose(localizer(fmap).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_localizer_gradients_reach_w_and_h_only() -> None:
    localizer = KeyAreaLocalizer(5, 5)
    fmap = torch.randn(2, 8, 5, 5, requires_grad=True)
    boxes = localizer(fmap)
    grads = torch.autograd.grad(
        boxes[:, :2].sum(), [fmap, localizer.fc_w.weight], allow_unused=True, retain_graph=True
    )
    assert all(g is None or not g.any() for g in grads)  # x, y: argmax, no gradient
    boxes[:, 2:].sum().backward()
    assert localizer.fc_w.weight.grad.abs().sum() > 0 and localizer.fc_h.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fill", [0.0, 3.5])
def test_constant_feature_maps_give_finite_boxes(fill: float) -> None:
    boxes = KeyAreaLocalizer(7, 7)(torch.full((2, 4, 7, 7), fill))
    assert torch.isfinite(boxes).all()
    assert boxes[:, :2].eq(-1).all()  # argmax of an all-zero vector is its first cell


def test_crop_is_an_exact_slice_for_whole_pixel_boxes() -> None:
    images = torch.randn(2, 3, 448, 448, dtype=torch.float64)
    half = crop(
        images,
        torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, -0.5, 0.5, 0.5]], dtype=torch.float64),
        224,
    )
    np.testing.assert_allclose(half[0].numpy(), images[0, :, 112:336, 112:336].numpy(), atol=1e-9)
    np.testing.assert_allclose(half[1].numpy(), images[1, :, 0:224, 224:448].numpy(), atol=1e-9)


def test_full_box_crop_is_a_resize() -> None:
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    full = crop(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64), 64)
    np.testing.assert_allclose(full.numpy(), images.numpy(), atol=1e-5)
    resized = crop(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64), 32)
    expected = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resized.numpy(), expected.numpy(), atol=1e-5)


def test_crop_gradcheck_in_w_and_h() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    centres = torch.tensor([[0.1, -0.2], [-0.3, 0.25]], dtype=torch.float64)
    sizes = torch.tensor([[0.43, 0.61], [0.37, 0.52]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda wh: crop(images, torch.cat([centres, wh], 1), 6), (sizes,)
    )


SHAPES = {"resnet18": (512, 7, 7), "vgg16": (512, 7, 7), "inception_v4": (1536, 5, 5)}


@pytest.mark.parametrize("name", list(SHAPES))
def test_paper_backbones_feature_shapes_and_heads(name: str) -> None:
    backbone = Backbone(name).eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.zeros(1, 3, 224, 224))
    assert tuple(features.shape[1:]) == SHAPES[name]
    assert backbone.fc.in_features == SHAPES[name][0] and backbone.fc.out_features == 2
    if name == "vgg16":  # fc6/fc7 (timm's pre_logits, ~120M parameters) are not the paper's CNN
        assert sum(p.numel() for p in backbone.parameters()) < 16e6


@pytest.mark.parametrize(
    ("name", "image", "source"),
    [("resnet18", 64, 128), ("vgg16", 64, 96), ("inception_v4", 80, 112)],
)
def test_kalmnet_forward_backward(name: str, image: int, source: int) -> None:
    torch.manual_seed(0)
    net = KALMNet(name, image_size=image, source_size=source)
    out = net(torch.randn(2, 3, source, source))
    assert out.global_logits.shape == out.local_logits.shape == (2, 2)
    assert out.boxes.shape == (2, 4) and out.prob.shape == (2,)
    expected = (out.global_logits.softmax(1)[:, 1] + out.local_logits.softmax(1)[:, 1]) / 2
    torch.testing.assert_close(out.prob, expected)
    F.cross_entropy(out.local_logits, torch.tensor([0, 1])).backward()
    if net.localizer.width > 1:
        assert net.localizer.fc_w.weight.grad.abs().sum() > 0
        assert net.localizer.fc_h.weight.grad.abs().sum() > 0


def test_resnet18_kalmnet_gives_nonzero_box_gradients() -> None:
    torch.manual_seed(1)
    net = KALMNet("resnet18", image_size=96, source_size=192)
    out = net(torch.randn(3, 3, 192, 192))
    F.cross_entropy(out.local_logits, torch.tensor([0, 1, 1])).backward()
    assert (
        net.localizer.fc_w.weight.grad.abs().sum() > 0
        and net.localizer.fc_h.weight.grad.abs().sum() > 0
    )


def test_local_init_global_copies_cnn_g() -> None:
    net = KALMNet("resnet18", image_size=64, source_size=128, local_init="global")
    for (name, a), b in zip(
        net.global_cnn.state_dict().items(), net.local_cnn.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_local_file_without_network(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(7)
    source = timm.create_model("resnet18", pretrained=False)  # its 1000-class head included
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    backbone = Backbone("resnet18", checkpoint_path=str(path))
    loaded = backbone.conv.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert backbone.fc.out_features == 2


LOAD_PRETRAINED = """
import sys, torch
from kalm_lightning.models import Backbone
torch.save(Backbone("resnet18", pretrained=True).conv.state_dict(), sys.argv[1])
"""


def test_pretrained_weights_come_from_the_hub_cache_offline(tmp_path: Path) -> None:
    """backbone.pretrained=true with HF_HUB_OFFLINE=1: refused in one line naming the cache while it
    is empty; once timm's weights sit where timm's download puts them, loaded from there."""
    cache = tmp_path / "hub"
    cache.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    command = [sys.executable, "-c", LOAD_PRETRAINED, str(tmp_path / "loaded.pt")]
    empty = subprocess.run(command, env=env, capture_output=True, text=True)
    assert empty.returncode != 0
    line = empty.stderr.strip().splitlines()[-1]
    assert str(cache) in line and "backbone.checkpoint_path" in line, line
    # The cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/file}.
    torch.manual_seed(3)
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    repo = cache / "models--timm--resnet18.a1_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file(weights, repo / "snapshots" / revision / "model.safetensors")
    check(subprocess.run(command, env=env, capture_output=True, text=True))
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert loaded and all(torch.equal(value, weights[key]) for key, value in loaded.items())


def test_channels_last_gives_the_same_scores() -> None:
    """hardware=gpu turns on channels_last; the CPU runs the same code path."""
    from kalm_lightning.stages import KALMStage

    torch.manual_seed(0)
    net, sizes = {"backbone": "resnet18"}, {"image_size": 64, "source_size": 128}
    plain = KALMStage(net, sizes).eval()
    fast = KALMStage(net, sizes, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    fast.configure_model()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected, got = plain.score(images), fast.score(fast.prepare_images(images))
    assert fast.net.global_cnn.conv.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for name in ("global", "local", "kalm", "boxes"):
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4)


def test_cam_aggregation_weights_channels_by_the_classifier() -> None:
    """aggregation=cam: the box follows sum_c (W[1, c] - W[0, c]) F_c, not the plain channel sum."""
    torch.manual_seed(0)
    fmap = torch.zeros(1, 2, 4, 4)
    fmap[0, 0, 0, 0] = 5.0  # a strong channel the classifier calls normal
    fmap[0, 1, 3, 2] = 1.0  # a weak channel the classifier calls abnormal
    weights = torch.tensor([-1.0, 1.0])
    plain = KeyAreaLocalizer(4, 4, "cell")(fmap)
    cam = KeyAreaLocalizer(4, 4, "cell", "cam")(fmap, weights)
    assert plain[0, :2].tolist() == [-0.75, -0.75]  # the bright normal channel's cell
    assert cam[0, :2].tolist() == [0.25, 0.75]  # column 2, row 3: the abnormal evidence


def test_soft_centre_has_a_gradient_and_tends_to_the_argmax() -> None:
    torch.manual_seed(1)
    fmap = torch.randn(2, 8, 5, 5).relu()
    learned = KeyAreaLocalizer(5, 5, "soft", "learned", channels=8, temperature=10.0)
    learned(fmap)[:, :2].sum().backward()
    assert learned.channel_weights.grad.abs().sum() > 0  # the centre now learns
    sharp = KeyAreaLocalizer(5, 5, "soft", temperature=1e4)(fmap)
    cell = KeyAreaLocalizer(5, 5, "cell")(fmap)
    torch.testing.assert_close(sharp[:, :2], cell[:, :2])


def test_box_init_and_the_controls_give_the_documented_boxes() -> None:
    torch.manual_seed(2)
    fmap = torch.randn(3, 8, 4, 4)
    boxes = KeyAreaLocalizer(4, 4, box_init=0.3)(fmap)
    torch.testing.assert_close(boxes[:, 2:], torch.full((3, 2), 0.3))
    images = torch.randn(3, 3, 128, 128)
    full = KALMNet("resnet18", image_size=64, source_size=128, localizer=node("full")).eval()
    assert full(images).boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3
    fixed = KALMNet("resnet18", image_size=64, source_size=128, localizer=node("fixed", half=0.25))
    assert fixed.eval()(images).boxes.tolist() == [[0.0, 0.0, 0.25, 0.25]] * 3


def test_output_stride_gives_the_localizer_a_finer_map() -> None:
    coarse = KALMNet("resnet18", image_size=112, source_size=224)
    fine = KALMNet("resnet18", image_size=112, source_size=224, output_stride=16)
    assert (coarse.localizer.height, fine.localizer.height) == (4, 7)
    fine.local_cnn.load_state_dict(coarse.local_cnn.state_dict())  # same weights, same layers
