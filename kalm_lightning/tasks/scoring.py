"""Scoring uploaded radiographs: bytes in, a study's answer out, on the path `predict` takes.

The server (`tasks/serve.py`) and the DICOM node hand this module the bytes a client sent; it
decodes them as `predict` decodes files (`data.images.decode_image`), resizes them to the source
size the checkpoint carries, normalises them on the device (`data.transfer.model_input`) and runs
the stage's own `predict_step`; the prediction table's owner (`evaluation/predictions.py`) turns
the outputs into probabilities, calls and boxes. So a served image gets predict's numbers."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
import torch

from kalm_lightning.data.geometry import to_original_map
from kalm_lightning.data.images import BadImageError, decode_image, resize_square
from kalm_lightning.data.transfer import model_input
from kalm_lightning.evaluation.figures import overlay_image
from kalm_lightning.evaluation.predictions import decided, original_boxes
from kalm_lightning.evaluation.studies import GLOBAL, LOCAL, abnormal, study_means
from kalm_lightning.stages.base import StageModule


@dataclass
class Upload:
    """One file of a request, as bytes (nothing a client sends is opened as a path)."""

    name: str
    data: bytes


@dataclass
class Decoded:
    """An upload decoded: its pixels at the source size and its own size, or why it failed."""

    name: str
    pixels: np.ndarray | None = None  # uint8 [H, W], the original
    square: torch.Tensor | None = None  # uint8 [1, S, S]
    error: str | None = None


@dataclass
class ImageResult:
    name: str
    prob: float | None = None
    prob_global: float | None = None
    prob_local: float | None = None
    box: list[float] | None = None
    error: str | None = None
    overlay_png: str | None = None


@dataclass
class StudyResult:
    prob: float | None
    label: int | None
    threshold: float
    aggregation: str
    images: list[ImageResult] = field(default_factory=list)


class StudyScorer:
    """A loaded stage that scores uploads: `decode` each file, `score` a batch of studies."""

    def __init__(self, module: StageModule, device: torch.device, aggregation: str) -> None:
        self.module = module.to(device).eval()
        self.device, self.aggregation = device, aggregation
        self.size = module.preprocessing.source_size
        self.resize = module.preprocessing.resize
        self.mean, self.std = module.preprocessing.mean, module.preprocessing.std

    def decode(self, upload: Upload) -> Decoded:
        """The upload's pixels, or its error: an undecodable, empty, unsupported or oversized
        file is this image's answer, never the request's."""
        try:
            pixels = decode_image(upload.data, upload.name)
        except BadImageError as error:
            return Decoded(upload.name, error=str(error))
        square = torch.from_numpy(resize_square(pixels, self.size, self.resize))[None]
        return Decoded(upload.name, pixels, square)

    @torch.no_grad()
    def outputs(self, squares: list[torch.Tensor], chunk: int) -> dict[str, torch.Tensor]:
        """`predict_step`'s outputs for uint8 [1, S, S] images, at most `chunk` at a time."""
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(squares), chunk):
            images = torch.stack(squares[start : start + chunk]).to(self.device)
            batch = model_input({"image": images}, self.mean, self.std)
            batch["image_id"] = torch.arange(start, start + len(images))
            for key, value in self.module.predict_step(batch, 0).items():
                parts.setdefault(key, []).append(value.cpu())
        return {key: torch.cat(values) for key, values in parts.items()}

    def score(
        self, studies: list[list[Decoded]], chunk: int, overlays: list[bool]
    ) -> list[StudyResult]:
        """Each study's answer: its images' results and the study's probability and call."""
        good = [
            (s, i)
            for s, study in enumerate(studies)
            for i, d in enumerate(study)
            if d.error is None
        ]
        outputs = self.outputs([studies[s][i].square for s, i in good], chunk) if good else {}
        operating = self.module.operating
        columns = decided(outputs, self.module.selection_score, operating) if good else {}
        boxes = None
        if "boxes" in outputs:
            sizes = [studies[s][i].pixels.shape for s, i in good]
            boxes = original_boxes(outputs["boxes"], sizes, self.size, self.resize)
        results = [[ImageResult(d.name, error=d.error) for d in study] for study in studies]
        for row, (s, i) in enumerate(good):
            result = results[s][i]
            result.prob = float(columns["prob"][row])
            result.prob_global = float(columns[f"prob_{GLOBAL}"][row])
            if f"prob_{LOCAL}" in columns:
                result.prob_local = float(columns[f"prob_{LOCAL}"][row])
            if boxes is not None:
                result.box = [float(v) for v in boxes[row]]
            if overlays[s]:
                result.overlay_png = self.overlay(
                    studies[s][i], result, float(operating["threshold"])
                )
        return [self.study(images) for images in results]

    def study(self, images: list[ImageResult]) -> StudyResult:
        """The study's probability from its scored images (mean or max), called at the model's
        threshold; None where no image could be scored."""
        threshold = float(self.module.operating["threshold"])
        scored = [r.prob for r in images if r.prob is not None]
        if not scored:
            return StudyResult(None, None, threshold, self.aggregation, images)
        prob = torch.tensor(scored, dtype=torch.float64)
        studies = study_means(
            prob,
            torch.zeros(len(scored), dtype=torch.long),
            torch.zeros(len(scored), dtype=torch.long),
            self.aggregation,
        )
        value = float(studies.prob[0])
        return StudyResult(
            value, int(abnormal(value, threshold)), threshold, self.aggregation, images
        )

    @torch.no_grad()
    def overlay(self, decoded: Decoded, result: ImageResult, threshold: float) -> str:
        """predict's overlay of one image (box, both heatmaps, caption) as base64 PNG."""
        images = model_input({"image": decoded.square[None].to(self.device)}, self.mean, self.std)
        maps = self.module.heatmaps(self.module.prepare_images(images["image"]))
        height, width = decoded.pixels.shape
        heat = {
            name: to_original_map(m[0].float().cpu().numpy(), height, width, self.size, self.resize)
            for name, m in maps.items()
        }
        verdict = "abnormal" if abnormal(result.prob, threshold) else "normal"
        image = overlay_image(
            decoded.pixels, result.box, f"p={result.prob:.3f} {verdict}", heatmaps=heat
        )
        buffer = io.BytesIO()
        image.save(buffer, format="png")
        return base64.b64encode(buffer.getvalue()).decode()
