"""The export command: a trained stage as one ONNX graph or one `torch.export` program (.pt2),
with its preprocessing, its operating point and a model card beside it.

The graph takes the normalised source image [N, 3, S, S] (N free) and returns, for a stage-2
checkpoint, `prob` (KALM's fused probability, calibrated at the model's temperature when it has
one), `prob_global`, `prob_local` and `boxes` (x, y, w, h in [-1, 1] units, see
`kalm_lightning.data.geometry`), and where CNN_l reads K windows (`localizer=multicrop`) `crops`
[N, K, 4] and their `attention` weights [N, K]; for a stage-1 checkpoint `prob` and `prob_global`.
`<file>.json` beside it says how to make the input from a radiograph; ONNX files carry the same in
their `metadata_props`. TorchScript is gone: `torch.jit.trace` is deprecated in PyTorch 2.14
(it warns), and torch.export is its successor; prefer ONNX to serve, .pt2 to stay in PyTorch.
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
from kalm_lightning.evaluation.operating import EPSILON
from kalm_lightning.models.kalm import KALMNet, resize_view
from kalm_lightning.runs import write_atomic
from kalm_lightning.stages import load_stage
from kalm_lightning.stages.base import StageModule
from kalm_lightning.tasks.model_card import write_model_card

FORMATS = {"onnx": ".onnx", "export": ".pt2"}


class ExportedModel(nn.Module):
    """A trained stage's networks as a plain module (no Lightning): images in, a tuple out."""

    def __init__(self, stage: StageModule) -> None:
        super().__init__()
        self.net = stage.net.eval()
        self.image_size = stage.preprocessing.image_size
        self.two_stage = isinstance(self.net, KALMNet)
        self.temperature = float(stage.operating["temperature"])
        self.windowed = self.two_stage and self.net.localizer.windowed
        self.outputs = (
            ["prob", "prob_global", "prob_local", "boxes"]
            if self.two_stage
            else ["prob", "prob_global"]
        ) + (["crops", "attention"] if self.windowed else [])

    def calibrated(self, prob: torch.Tensor) -> torch.Tensor:
        """operating.calibrate in the graph: sigmoid(logit(p) / T)."""
        if self.temperature == 1.0:
            return prob
        p = prob.clamp(EPSILON, 1 - EPSILON)
        return torch.sigmoid((torch.log(p) - torch.log1p(-p)) / self.temperature)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.two_stage:
            out = self.net(images)
            main = self.calibrated(out.prob), out.global_prob, out.local_prob, out.boxes
            return (*main, out.crops, out.attention) if self.windowed else main
        # GlobalStage.forward and .score: CNN_g on the resized view, softmax's abnormal column.
        prob = self.net(resize_view(images, self.image_size)).float().softmax(dim=1)[:, 1]
        return self.calibrated(prob), prob


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
        "threshold": float(stage.operating["threshold"]),  # a study is abnormal at mean prob >= it
        "temperature": float(stage.operating["temperature"]),  # already applied to `prob`
        "operating_rule": stage.operating["rule"],
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


def export_program(model: ExportedModel, example: torch.Tensor, path: Path) -> None:
    """torch.export: the whole network as one program, loaded with torch.export.load."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, str(path))


def add_onnx_metadata(path: Path, meta: dict) -> None:
    """The preprocessing and the operating point in the ONNX file's own metadata_props."""
    import onnx

    model = onnx.load(str(path))
    entries = {
        "kalm.preprocessing": json.dumps(
            {
                k: meta[k]
                for k in (
                    "shape",
                    "steps",
                    "mean",
                    "std",
                    "image_size",
                    "source_size",
                    "resize",
                    "in_chans",
                )
            }
        ),
        "kalm.threshold": str(meta["threshold"]),
        "kalm.temperature": str(meta["temperature"]),
        "kalm.operating_rule": meta["operating_rule"],
        "kalm.outputs": ",".join(meta["outputs"]),
        "kalm.backbone": meta["backbone"],
    }
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


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
    meta = preprocessing(stage, model.outputs)
    with torch.no_grad():
        if cfg.format == "onnx":
            export_onnx(model, example, path, cfg.opset)
            add_onnx_metadata(path, meta)
        else:
            export_program(model, example, path)
    meta_file = path.with_suffix(path.suffix + ".json")
    write_atomic(meta_file, json.dumps(meta, indent=2) + "\n")
    card = write_model_card(stage, cfg.ckpt_path, meta, path, cfg.get("metrics"))
    print(f"{cfg.format} model written to {path}; preprocessing in {meta_file}; model card {card}")
    return path
