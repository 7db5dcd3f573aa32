"""The export command: a trained stage as one ONNX or TorchScript graph, with its preprocessing.

The graph takes the normalised source image [N, 3, S, S] (N free) and returns, for a stage-2
checkpoint, `prob` (KALM's fused probability), `prob_global`, `prob_local` and `boxes` (x, y, w, h
in [-1, 1] units, see `kalm_lightning.data.geometry`); for a stage-1 checkpoint `prob` and `prob_global`.
`<file>.json` beside it says how to make the input from a radiograph.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from kalm_lightning.errors import UserError, check_choice
from kalm_lightning.evaluation.studies import THRESHOLD
from kalm_lightning.models.kalm import KALMNet, resize_view
from kalm_lightning.stages import load_stage
from kalm_lightning.stages.base import StageModule

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class ExportedModel(nn.Module):
    """A trained stage's networks as a plain module (no Lightning): images in, a tuple out."""

    def __init__(self, stage: StageModule) -> None:
        super().__init__()
        self.net = stage.net.eval()
        self.image_size = stage.preprocessing.image_size
        self.two_stage = isinstance(self.net, KALMNet)
        self.outputs = (
            ["prob", "prob_global", "prob_local", "boxes"]
            if self.two_stage
            else ["prob", "prob_global"]
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.two_stage:
            out = self.net(images)
            return out.prob, out.global_prob, out.local_prob, out.boxes
        # GlobalStage.forward and .score: CNN_g on the resized view, softmax's abnormal column.
        prob = self.net(resize_view(images, self.image_size)).float().softmax(dim=1)[:, 1]
        return prob, prob


def preprocessing(stage: StageModule, outputs: list[str]) -> dict:
    """What a deployer needs to reproduce the input and read the outputs: the checkpoint's own
    preprocessing, in words and in numbers."""
    carried = stage.preprocessing
    return {
        "input": "images",
        "shape": ["N", carried.in_chans, carried.source_size, carried.source_size],
        "steps": carried.steps(),
        **carried.to_dict(),
        "outputs": outputs,
        "threshold": THRESHOLD,
        "backbone": stage.backbone_name,
        "stage": stage.stage,
    }


def export_onnx(model: ExportedModel, example: torch.Tensor, path: Path, opset: int) -> None:
    if importlib.util.find_spec("onnxscript") is None:  # torch's exporter needs it
        raise UserError("format=onnx needs the export extra: pip install 'kalm-lightning[export]'")
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=model.outputs,
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def export_torchscript(model: ExportedModel, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
    traced.save(str(path))


def run_export(cfg: DictConfig) -> Path:
    check_choice("format", cfg.format, FORMATS)
    stage = load_stage(cfg.ckpt_path)
    model = ExportedModel(stage)
    path = (
        Path(cfg.output) if cfg.output else Path(cfg.paths.run_dir) / f"model{FORMATS[cfg.format]}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    size = stage.preprocessing.source_size
    example = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        if cfg.format == "onnx":
            export_onnx(model, example, path, cfg.opset)
        else:
            export_torchscript(model, example, path)
    meta = path.with_suffix(path.suffix + ".json")
    meta.write_text(json.dumps(preprocessing(stage, model.outputs), indent=2) + "\n")
    print(f"{cfg.format} model written to {path}; preprocessing in {meta}")
    return path
