"""The paper's CNN (eq. 1-3): a timm model's last feature map, global average pooling, Linear(C, 2)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from torch import nn

from kalm_lightning.errors import UserError, check_choice

HUB_HOST = ("huggingface.co", 443)
OUTPUT_STRIDES = (8, 16, 32)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the weights hub answers within timeout; timm would otherwise retry for ~45 s."""
    if hub_offline():
        return False
    with ThreadPoolExecutor(1) as pool:
        attempt = pool.submit(socket.create_connection, HUB_HOST, timeout)
        try:
            attempt.result(timeout=timeout + 0.5).close()
            return True
        except (OSError, FutureTimeout):
            return False


def cached_weights(name: str) -> Path | None:
    """timm's weights for `name` in the local Hugging Face cache (where timm's own download puts
    them: its `pretrained_cfg`'s hub id, safetensors before the pickle-free .bin), or None."""
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # not a timm model: create_model says so in one line
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    names = (
        [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    )
    for filename in names:
        found = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def create_feature_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    output_stride: int | None = None,
) -> nn.Module:
    """A timm model without its classifier, loading weights from a local file or the hub.

    output_stride (8 or 16, where the timm model supports it) dilates the last stages instead of
    striding them: a finer feature map with the same weights."""
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    if output_stride is not None:
        check_choice("backbone.output_stride", output_stride, OUTPUT_STRIDES)
        kwargs["output_stride"] = output_stride
    if checkpoint_path:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise UserError(f"backbone.checkpoint_path={checkpoint_path} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
        pretrained = True
    elif pretrained and (cached := cached_weights(name)) is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(cached)}  # no network asked
    elif pretrained and not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the weights hub cannot be reached"
        raise UserError(
            f"backbone.pretrained=true: no weights for {name} in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {why}; put them there (timm.create_model('{name}', "
            "pretrained=True) on a connected machine), set backbone.checkpoint_path=FILE, "
            "or set backbone.pretrained=false"
        )
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        if "output_stride" not in str(error):
            raise
        raise UserError(
            f"backbone.output_stride={output_stride}: timm's {name} has no output_stride option; "
            "leave backbone.output_stride=null"
        ) from error
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise UserError(
                f"backbone.name={name} is not a timm model: see timm.list_models()"
            ) from error
        raise UserError(
            f"cannot load weights for {name} ({error}); check backbone.checkpoint_path "
            "or set backbone.pretrained=false"
        ) from error
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load weights for {name} ({error}); set backbone.checkpoint_path=FILE "
            "to a local .pth/.safetensors file, or backbone.pretrained=false"
        ) from error


def _drop_unused_children(model: nn.Module, probe_size: int = 96) -> None:
    """Replace the parts forward_features never calls (VGG's 120M-parameter fc6/fc7) by Identity."""
    used: set[str] = set()
    hooks = [
        child.register_forward_hook(lambda *_, name=name: used.add(name))
        for name, child in model.named_children()
    ]
    was_training = model.training
    with torch.no_grad():
        model.eval().forward_features(torch.zeros(1, 3, probe_size, probe_size))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    for name, child in list(model.named_children()):
        if name not in used and any(True for _ in child.parameters()):
            setattr(model, name, nn.Identity())


def backbone_node(backbone: str | Mapping[str, Any], **given: Any) -> dict[str, Any]:
    """The backbone's settings (name, pretrained, checkpoint_path, output_stride) from its config
    node or its name, with the keyword arguments that are set taking precedence."""
    node = {"name": backbone} if isinstance(backbone, str) else dict(backbone)
    node = {k: v for k, v in node.items() if not k.startswith("_")}
    node.update({k: v for k, v in given.items() if v is not None})
    return node


class Backbone(nn.Module):
    """CNN_g or CNN_l: conv (timm's forward_features) -> GAP -> Linear(C, 2), as eq. (1)-(3)."""

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.conv = create_feature_model(name, pretrained, checkpoint_path, output_stride)
        _drop_unused_children(self.conv)
        self.num_features = self.conv.num_features
        self.fc = nn.Linear(self.num_features, 2)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The mean and std the timm model's weights expect, from its `pretrained_cfg`
        (ImageNet's for ResNet and VGG, 0.5 for Inception)."""
        cfg = getattr(self.conv, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", IMAGENET_DEFAULT_MEAN)
        std = cfg.get("std", IMAGENET_DEFAULT_STD)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def feature_size(self, image_size: int) -> tuple[int, int]:
        """(H, W) of the feature map at an input of image_size, refusing a size too small for it."""
        was_training = self.training
        try:
            with torch.no_grad():
                probe = torch.zeros(1, 3, image_size, image_size)
                shape = self.eval().forward_features(probe).shape
        except RuntimeError as error:
            raise UserError(
                f"data.image_size={image_size} is too small for {self.name} ({error})"
            ) from error
        finally:
            self.train(was_training)
        return int(shape[2]), int(shape[3])

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """F = conv(I): the last feature map before pooling, [B, C, H, W]."""
        return self.conv.forward_features(images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """S = FC(GAP(F)): two logits (normal, abnormal)."""
        return self.fc(features.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))
