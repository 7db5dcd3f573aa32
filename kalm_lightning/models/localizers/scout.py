"""The scout: a low-capacity CNN that reads an image at full resolution and gives a score map at
stride 16, the part of `navigator` (reads=source|view), `multicrop` and `sampling` that decides
where to look (GMIC's global module, Shen et al. 2021, at a few percent of a ResNet18)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kalm_lightning.errors import check_choice

# What a cell of the map may depend on: `local` (its receptive field alone) or `group` (the whole
# image, through GroupNorm: what every scout was before the option, and what a checkpoint that
# does not record it holds).
SCOUTS = ("local", "group")
RECORDED_BEFORE = {"scout": "group"}  # the scout of a checkpoint written before the option
SLOPE = 0.1  # the local scout's LeakyReLU


def make_scout(width: int, kind: str = "local", heads: int = 1) -> nn.Sequential:
    """Four stride-2 3x3 convolutions (width / 2, width, 2 width, 2 width channels) and a 1x1
    convolution to one channel: a score map at stride 16 whose cells see 31 px each.
    heads > 1: that many such scouts side by side, independent (grouped convolutions; each
    initialised as a scout of its own), one map each: [B, heads, h, w].

    kind="local": each convolution pads by replicating the image's border and has a bias, nothing
    is normalised, so every cell depends on its own 31 px alone (the tests'
    `test_only_a_local_scouts_cells_see_their_receptive_field_alone`), with LeakyReLU (slope
    0.1): with ReLU and nothing normalised, units died (in one of study 3's pilots 34 of the 64
    last channels never fired and the map stayed flat). Trained from scratch, it learns at a rate
    of its own (`localizer.lr`, 3e-3 in multicrop.yaml and sampling.yaml). From some
    initialisations its top cells settle on the background and it never finds the lesion,
    whatever the rate: `multicrop` therefore trains `heads` of them and reads the best
    (study3/README.md, "The scout").
    kind="group": zero padding, GroupNorm and ReLU after each convolution. GroupNorm's statistics
    pool the whole map, so a lesion anywhere shifts every cell, and zero padding lifts the
    border's cells above the rest. Taught through top-t% pooling (`multicrop`), such a scout
    classified from the border and answered a lesion with a strongly negative cell: its windows
    avoided the lesion while their placement still told CNN_l the label
    (`experiments/localizers/study3/group-scout/`).
    Neither uses BatchNorm: trained from scratch in a few hundred steps, its running statistics
    lag the weights, and a navigator then pointed elsewhere at inference than in training."""
    check_choice("localizer.scout", kind, SCOUTS)
    layers: list[nn.Module] = []
    channels, groups = 3, 1  # the first convolution's heads all read the same 3 channels
    for out in (width // 2, width, 2 * width, 2 * width):
        out *= heads
        if kind == "local":
            conv = nn.Conv2d(channels, out, 3, 2, 1, groups=groups, padding_mode="replicate")
            layers += [conv, nn.LeakyReLU(SLOPE, inplace=True)]
        else:
            conv = nn.Conv2d(channels, out, 3, 2, 1, groups=groups, bias=False)
            layers += [conv, nn.GroupNorm(min(8, out // heads) * heads, out), nn.ReLU(inplace=True)]
        channels, groups = out, heads
    return nn.Sequential(*layers, nn.Conv2d(channels, heads, 1, groups=heads))


def run_head(
    scout: nn.Sequential, heads: int, image: torch.Tensor, head: torch.Tensor
) -> torch.Tensor:
    """[B, 1, h, w]: the map of one head (`head`, a one-element index tensor, read on the device)
    of a `make_scout(..., heads)`, computing that head alone: at inference a scout of many heads
    costs what one costs."""
    x = image
    for layer in scout:
        if isinstance(layer, nn.Conv2d):
            weight = layer.weight.unflatten(0, (heads, -1)).index_select(0, head)[0]
            bias = (
                None if layer.bias is None else layer.bias.view(heads, -1).index_select(0, head)[0]
            )
            if layer.padding_mode == "replicate":
                x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, bias, layer.stride)
            else:
                x = F.conv2d(x, weight, bias, layer.stride, layer.padding)
        elif isinstance(layer, nn.GroupNorm):
            weight = layer.weight.view(heads, -1).index_select(0, head)[0]
            bias = layer.bias.view(heads, -1).index_select(0, head)[0]
            x = F.group_norm(x, layer.num_groups // heads, weight, bias, layer.eps)
        else:
            x = layer(x)
    return x
