"""The paper's key area localizer (section 3.2, eq. 4-7), `localizer=kalm`, the default."""

from __future__ import annotations

import math

import torch
from torch import nn

from kalm_lightning.errors import check_choice, check_number
from kalm_lightning.models.localizers.base import Localizer, LocalizerInputs

CENTRES = ("paper", "cell", "soft")
AGGREGATIONS = ("sum", "cam", "learned")


def _minmax(vector: torch.Tensor) -> torch.Tensor:
    low = vector.amin(dim=1, keepdim=True)
    span = vector.amax(dim=1, keepdim=True) - low
    # A constant vector scales to zeros instead of 0/0.
    return (vector - low) / span.clamp_min(torch.finfo(vector.dtype).tiny)


class KeyAreaLocalizer(Localizer):
    """Eq. (4)-(7): a box (x, y, w, h) from a feature map; x, y by argmax, w, h learned.

    Beyond the paper (defaults keep it exact):
    - aggregation="cam": A = sum_c (W_fc[abnormal, c] - W_fc[normal, c]) F_c, the class activation
      map, instead of eq. (4)'s plain channel sum; needs `class_weights` in forward.
    - aggregation="learned": A = sum_c a_c F_c with a learnable a (starts at 1: eq. 4).
    - centre="cell": x = (argmax + 1/2) / W * 2 - 1, the winning cell's centre.
    - centre="soft": x = sum_j softmax(temperature * v_w)_j * ((j + 1/2) / W * 2 - 1), a
      soft-argmax through which x and y get a gradient (the paper's argmax gets none).
    - box_init=s: fc_w and fc_h start with zero weights and bias logit(s), so every box starts with
      half-extent s (PyTorch's default start gives about sigmoid(0) = 0.5 with noise).
    - lr: the localizer's own learning rate (fc_w, fc_h and learned channel weights).
    """

    def __init__(
        self,
        height: int,
        width: int,
        centre: str = "paper",
        aggregation: str = "sum",
        channels: int | None = None,
        temperature: float = 10.0,
        box_init: float | None = None,
        lr: float | None = None,
    ) -> None:
        super().__init__(height, width, channels or 0, lr)
        check_choice("localizer.centre", centre, CENTRES)
        check_choice("localizer.aggregation", aggregation, AGGREGATIONS)
        check_number("localizer.temperature", temperature, 0, exclusive_minimum=True)
        self.centre = centre
        self.aggregation, self.temperature = aggregation, float(temperature)
        self.fc_w = nn.Linear(width, 1)
        self.fc_h = nn.Linear(height, 1)
        if aggregation == "learned":
            if not channels:
                raise ValueError("aggregation='learned' needs the number of channels")
            self.channel_weights = nn.Parameter(torch.ones(channels))
        if box_init is not None:
            check_number("localizer.box_init", box_init, 0.001, 0.999)
            for fc in (self.fc_w, self.fc_h):
                nn.init.zeros_(fc.weight)
                nn.init.constant_(fc.bias, math.log(box_init / (1 - box_init)))

    def aggregate(
        self, feature_map: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq. (4): the map A [B, H, W] whose profiles place the box (see the class docstring)."""
        features = feature_map.float()
        if self.aggregation == "sum":
            return features.sum(dim=1)
        if self.aggregation == "cam":
            if class_weights is None:
                raise ValueError("aggregation='cam' needs the global classifier's class_weights")
            weights = class_weights.float()
        else:
            weights = self.channel_weights.float()
        return torch.einsum("bchw,c->bhw", features, weights)

    def position(self, profile: torch.Tensor, cells: int) -> torch.Tensor:
        """Eq. (7): the centre in [-1, 1] along one axis from its min-max scaled profile [B, cells]."""
        if self.centre == "soft":
            grid = (torch.arange(cells, device=profile.device, dtype=profile.dtype) + 0.5) / cells
            weights = torch.softmax(self.temperature * profile, dim=1)
            return (weights * (grid * 2 - 1)).sum(dim=1)
        offset = 0.5 if self.centre == "cell" else 0.0
        return (profile.argmax(dim=1).float() + offset) / cells * 2 - 1

    def forward(
        self, feature_map: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        aggregated = self.aggregate(feature_map, class_weights)  # (4): [B, H, W]
        v_w = _minmax(aggregated.sum(dim=1))  # (5)-(6): [B, W]
        v_h = _minmax(aggregated.sum(dim=2))  # [B, H]
        x, y = self.position(v_w, self.width), self.position(v_h, self.height)  # (7)
        w = torch.sigmoid(self.fc_w(v_w.to(self.fc_w.weight.dtype))).squeeze(1).float()
        h = torch.sigmoid(self.fc_h(v_h.to(self.fc_h.weight.dtype))).squeeze(1).float()
        return torch.stack([x, y, w, h], dim=1)

    def locate(self, inputs: LocalizerInputs) -> torch.Tensor:
        """The Localizer interface: eq. (4)-(7) on CNN_g's map (its class weights for a CAM)."""
        return self(inputs.features, inputs.class_weights)
