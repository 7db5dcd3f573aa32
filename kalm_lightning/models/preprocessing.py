"""The preprocessing a trained model carries, as timm models carry their `pretrained_cfg`.

Every checkpoint records how its input was made: the CNN input size, the source size the crop
samples from, how a radiograph became a square (`resize`), the normalisation and the input
channels. Evaluate, predict and export read it from the checkpoint; a value given on the command
line that contradicts it is refused in one line naming both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kalm_lightning.errors import UserError
from kalm_lightning.settings import check

# What a command line may repeat (as data.<key>); the rest follows from the backbone.
GIVEN = ("image_size", "source_size", "resize")


@dataclass(frozen=True)
class Preprocessing:
    image_size: int  # the CNN input: the global view is the source resized to this
    source_size: int  # the square image the local crop samples from
    resize: str  # stretch | pad: how a radiograph becomes a source_size square
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    in_chans: int = 3  # the grey channel repeated

    def __post_init__(self) -> None:
        for key in GIVEN:
            check(f"data.{key}", getattr(self, key))
        if self.image_size > self.source_size:
            raise UserError(
                f"data.image_size={self.image_size} exceeds data.source_size={self.source_size}: "
                "the local crop samples from the larger source image"
            )

    @classmethod
    def from_dict(cls, given: Mapping[str, Any]) -> Preprocessing:
        values = dict(given)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    def steps(self) -> list[str]:
        """How to make the model's input from a radiograph, in words (model.onnx.json)."""
        square = (
            "stretched to the square, bilinear"
            if self.resize == "stretch"
            else "its longer side scaled to it, bilinear, and padded with black to a square, centred"
        )
        return [
            "decode to 8-bit greyscale (DICOM: modality LUT, VOI LUT or window, MONOCHROME1 inverted)",
            f"resize to {self.source_size}x{self.source_size} ({square}; data.resize={self.resize})",
            "scale to [0, 1] (divide by 255)",
            f"repeat the grey channel {self.in_chans} times",
            f"subtract mean {list(self.mean)} and divide by std {list(self.std)} per channel",
        ]

    def refuse_contradictions(self, given: Mapping[str, Any], checkpoint: str) -> None:
        """One line for a data.<key> set on the command line to another value than the
        checkpoint's (None: not given, the checkpoint's is used)."""
        for key in GIVEN:
            value = given.get(key)
            if value is not None and value != getattr(self, key):
                raise UserError(
                    f"data.{key}={value} contradicts {checkpoint}, which was trained with "
                    f"data.{key}={getattr(self, key)}; leave data.{key} out: the checkpoint "
                    "carries its preprocessing"
                )
