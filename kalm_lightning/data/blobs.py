"""The localizer study's data regimes: a coarse blob that can be found at the CNN input size, and a
lesion inside it that can only be decided at the source size.

Every view carries one blob of contrast `cue` (`data.synthetic.cue=c`, c in [0, 1]; 1 is about as
plain at the input size as the demo's implants) and `decoys` more of the same kind. In a lesioned
view the first blob holds the lesion: for `texture` lesions the fine stripes fill it, other kinds
are drawn at its centre; in every other view it is a decoy without a lesion. `attribute` > 0 makes
the lesion's blob brighter than the decoys by that fraction: a faint coarse sign of the abnormal
blob, so that a global CNN at the input size can do better than chance without deciding alone.
Blob centres are drawn uniformly over the bone pixels (away from the border), blobs apart from each
other. cue=None keeps the drawing of the demo and the first localizer study.

The texture never changes a region's mean brightness, so that nothing of it survives averaging to
the input size. By default its amplitude is cut where the image has less headroom than that, so a
bright blob (a high cue) holds a fainter texture. `texture_amplitude=a` (the third study) decouples
the cue from the lesion's strength instead: every view, lesioned or not, is first compressed into
[FLOOR + a, CEILING - a], which leaves room for stripes of amplitude a x conspicuity everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kalm_lightning.data.index import BODY_PARTS
from kalm_lightning.data.radiographs import draw_lesion, draw_limb, finish, stripes

BLOB_CONTRAST = 0.35  # what cue=1 adds inside a blob
TEXTURE_AMPLITUDE = 0.25  # of the stripes, as in the first study, times the conspicuity
FLOOR, CEILING = 0.06, 0.94  # the texture stays within these, so that noise is not clipped away


@dataclass(frozen=True)
class Blobs:
    cue: float  # contrast of every blob, in [0, 1]
    decoys: int = 0  # blobs besides the one that holds the lesion (or stands in for it)
    attribute: float = 0.0  # the lesion's blob is (1 + attribute) times as bright
    size: float = 0.3  # blob diameter as a fraction of the shorter side
    texture_amplitude: float | None = None  # None: the headroom rule | a: room made for it

    def amplitude(self, conspicuity: float) -> float:
        """The texture's nominal amplitude at this conspicuity."""
        return conspicuity * (self.texture_amplitude or TEXTURE_AMPLITUDE)


def blob_centres(
    bone_mask: np.ndarray, count: int, radius: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """count centres drawn uniformly over bone pixels at least radius from the border, each at
    least 1.8 radius from the others where the bones leave room (20 draws each, then the last)."""
    h, w = bone_mask.shape
    allowed = bone_mask.copy()
    margin = int(np.ceil(radius))
    allowed[:margin], allowed[h - margin :] = False, False
    allowed[:, :margin], allowed[:, w - margin :] = False, False
    if not allowed.any():  # a limb shifted far out: the middle of the image
        allowed[h // 2, w // 2] = True
    candidates = np.flatnonzero(allowed)
    centres: list[tuple[float, float]] = []
    for _ in range(count):
        for _ in range(20):
            flat = int(candidates[rng.integers(len(candidates))])
            point = (flat // w + 0.5, flat % w + 0.5)
            if all(np.hypot(point[0] - y, point[1] - x) >= 1.8 * radius for y, x in centres):
                break
        centres.append(point)
    return centres


def render_blob_view(
    part: str,
    h: int,
    w: int,
    lesion: str | None,
    conspicuity: float,
    rng: np.random.Generator,
    layout_jitter: float,
    blobs: Blobs,
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """One radiograph of the blob regime as uint8 [h, w], and its lesion box when it has one (the
    blob's box for a texture lesion)."""
    image, bones, bone_mask = draw_limb(part, h, w, rng, layout_jitter)
    radius = blobs.size * min(h, w) / 2 * rng.uniform(0.85, 1.15)
    centres = blob_centres(bone_mask, 1 + blobs.decoys, radius, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i, (cy, cx) in enumerate(centres):
        distance = np.hypot(yy - cy, xx - cx)
        plateau = np.clip((radius - distance) / (0.3 * radius), 0, 1)  # soft-edged disc
        boost = 1 + blobs.attribute if i == 0 and lesion is not None else 1.0
        image += blobs.cue * BLOB_CONTRAST * boost * plateau
    if blobs.texture_amplitude is not None:  # every view alike, so the room tells nothing
        room = blobs.texture_amplitude
        image = FLOOR + room + np.clip(image, 0, 1) * (CEILING - FLOOR - 2 * room)
    if lesion is None:
        return finish(image, rng), None
    cy, cx = centres[0]
    if lesion == "texture":
        inside = np.clip(radius - np.hypot(yy - cy, xx - cx), 0, 1)
        room = np.minimum(image - FLOOR, CEILING - image).clip(0)
        amplitude = np.minimum(blobs.amplitude(conspicuity), room) * inside
        image += amplitude * stripes(h, w, rng)
        box = (
            max(0, int(cx - radius - 2)),
            max(0, int(cy - radius - 2)),
            min(w, int(np.ceil(cx + radius + 2))),
            min(h, int(np.ceil(cy + radius + 2))),
        )
    else:
        nearest = min(bones, key=lambda b: _distance_to_segment((cy, cx), b))
        side = np.sqrt(rng.uniform(0.01, 0.03) * h * w)
        box = draw_lesion(image, lesion, (cy, cx), side, nearest, conspicuity, rng)
    return finish(image, rng), box


def texture_kept(
    blobs: Blobs, size: int, conspicuity: float, layout_jitter: float, views: int = 48
) -> float:
    """The share of the texture's nominal amplitude (`Blobs.amplitude`) that the generator leaves
    in the lesion's blob, over `views` lesioned views of size x 0.8 size (each body
    part in turn). Each view is drawn twice with the same random draws, with and without its
    texture; the difference, inside 0.8 of the blob's radius, is the texture that was drawn. Under
    the headroom rule a bright blob on bone leaves little room under CEILING, so the texture fades
    as the cue grows; with `texture_amplitude` it does not."""
    kept = []
    for i in range(views):
        part, h, w = BODY_PARTS[i % len(BODY_PARTS)], size, round(0.8 * size)
        drawn = [
            render_blob_view(
                part, h, w, "texture", c, np.random.default_rng(i), layout_jitter, blobs
            )
            for c in (conspicuity, 0.0)
        ]
        (textured, (x0, y0, x1, y1)), (plain, _) = drawn
        cy, cx, radius = (y0 + y1) / 2, (x0 + x1) / 2, min(x1 - x0, y1 - y0) / 2 - 2
        yy, xx = np.mgrid[0:h, 0:w]
        disc = np.hypot(yy - cy, xx - cx) < 0.8 * radius
        kept.append(np.abs(textured[disc] / 255 - plain[disc] / 255).mean())
    return float(np.mean(kept) / blobs.amplitude(conspicuity))


def _distance_to_segment(point: tuple[float, float], bone: tuple) -> float:
    p0, p1 = np.asarray(bone[0], float), np.asarray(bone[1], float)
    d = p1 - p0
    t = np.clip(((np.asarray(point) - p0) @ d) / max(float(d @ d), 1e-9), 0, 1)
    return float(np.hypot(*(np.asarray(point) - (p0 + t * d))))
