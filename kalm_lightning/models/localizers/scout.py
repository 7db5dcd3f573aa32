"""The scout: a low-capacity CNN that reads an image at full resolution and gives a score map at
stride 16, the part of `navigator` (reads=source|view), `multicrop` and `sampling` that decides
where to look (GMIC's global module, Shen et al. 2021, at a few percent of a ResNet18)."""

from __future__ import annotations

from torch import nn

from kalm_lightning.errors import check_choice

# What a cell of the map may depend on: `local` (its receptive field alone) or `group` (the whole
# image, through GroupNorm: what every scout was before the option, and what a checkpoint that
# does not record it holds).
SCOUTS = ("local", "group")
RECORDED_BEFORE = {"scout": "group"}  # the scout of a checkpoint written before the option
SLOPE = 0.1  # the local scout's LeakyReLU


def make_scout(width: int, kind: str = "local") -> nn.Sequential:
    """Four stride-2 3x3 convolutions (width / 2, width, 2 width, 2 width channels) and a 1x1
    convolution to one channel: a score map at stride 16 whose cells see 31 px each.

    kind="local": each convolution pads by replicating the image's border and has a bias, nothing
    is normalised, so every cell depends on its own 31 px alone (the tests'
    `test_only_a_local_scouts_cells_see_their_receptive_field_alone`), with LeakyReLU (slope
    0.1): with ReLU and nothing normalised, units died (in one of study 3's pilots 34 of the 64
    last channels never fired and the map stayed flat). Trained from scratch, it needs a learning
    rate of its own (`localizer.lr`, 3e-3 in multicrop.yaml and sampling.yaml): at CNN_l's 1e-3,
    whether it left the plateau where its top-t% cells are not on the lesion depended on its seed
    and the order of its batches (study3/README.md, "The scout").
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
    channels = 3
    for out in (width // 2, width, 2 * width, 2 * width):
        if kind == "local":
            conv = nn.Conv2d(channels, out, 3, 2, 1, padding_mode="replicate")
            layers += [conv, nn.LeakyReLU(SLOPE, inplace=True)]
        else:
            conv = nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False)
            layers += [conv, nn.GroupNorm(min(8, out), out), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, 1, 1))
