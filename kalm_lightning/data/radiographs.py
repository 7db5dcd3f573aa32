"""Drawing synthetic radiographs: bones shaped like each body part, lesions with known boxes, and
PNGs in the modes MURA's images come in."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image

PNG_MODES = ("L", "RGB", "I;16", "LA", "P")
MODE_WEIGHTS = np.array([0.78, 0.1, 0.06, 0.03, 0.03])
# implant: a bright disc; fracture: a dark line across a bone; texture: a disc of fine stripes
# (period 3 px) that adds no brightness, clear at full size and averaged away at half size.
LESION_KINDS = ("implant", "fracture", "texture")
TEXTURE_PERIOD = 3.0
DEFAULT_LESIONS = ("implant", "fracture")


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _bone_layout(part: str, h: int, w: int, rng: np.random.Generator) -> list[tuple]:
    """(start, end, radius) segments in pixels, roughly shaped like the body part."""
    s = min(h, w)
    jitter = lambda: rng.normal(0, 0.03 * s, 2)  # noqa: E731
    top, bottom = np.array([0.05 * h, w / 2]), np.array([0.95 * h, w / 2])
    if part in ("XR_HUMERUS", "XR_FOREARM"):
        n = 1 if part == "XR_HUMERUS" else 2
        offsets = np.linspace(-0.15, 0.15, n) * w if n > 1 else [0.0]
        return [
            (
                top + np.array([0, o]) + jitter(),
                bottom + np.array([0, o]) + jitter(),
                s * rng.uniform(0.06, 0.1),
            )
            for o in offsets
        ]
    if part in ("XR_FINGER", "XR_HAND"):
        fingers = 1 if part == "XR_FINGER" else 4
        bones = []
        for f in range(fingers):
            x = w * (0.5 if fingers == 1 else 0.2 + 0.6 * f / (fingers - 1))
            joints = np.linspace(0.08 * h, 0.92 * h, 4)
            for a, b in pairwise(joints):
                bones.append(
                    (
                        np.array([a, x]) + jitter(),
                        np.array([b - 0.02 * h, x]) + jitter(),
                        s * rng.uniform(0.04, 0.07),
                    )
                )
        return bones
    if part == "XR_ELBOW":
        joint = np.array([0.5 * h, 0.5 * w]) + jitter()
        return [
            (np.array([0.05 * h, 0.35 * w]), joint, s * 0.09),
            (joint + np.array([0.03 * h, 0]), np.array([0.95 * h, 0.7 * w]), s * 0.07),
        ]
    if part == "XR_SHOULDER":
        head = np.array([0.35 * h, 0.45 * w]) + jitter()
        return [
            (head, head + np.array([0.01, 0.01]), s * 0.18),
            (head, np.array([0.98 * h, 0.55 * w]), s * 0.09),
            (np.array([0.1 * h, 0.05 * w]), np.array([0.25 * h, 0.95 * w]), s * 0.04),
        ]
    # XR_WRIST: radius, ulna and a row of carpal bones.
    bones = [
        (np.array([0.55 * h, x * w]) + jitter(), np.array([0.98 * h, x * w]) + jitter(), s * 0.07)
        for x in (0.38, 0.62)
    ]
    for x in np.linspace(0.3, 0.7, 4):
        centre = np.array([0.42 * h, x * w]) + jitter()
        bones.append((centre, centre + np.array([0.01, 0.01]), s * 0.05))
    return bones


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((w, h), Image.BICUBIC))


def draw_limb(
    part: str, h: int, w: int, rng: np.random.Generator, layout_jitter: float = 0.0
) -> tuple[np.ndarray, list[tuple], np.ndarray]:
    """Background, soft tissue and bones of one view: the image (float, about 0.06-0.8), the bone
    segments (start, end, radius) and the mask of bone pixels.

    layout_jitter > 0 shifts the whole limb by up to that fraction of the height and width, so that
    lesions spread over the image instead of gathering around its centre."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = 0.06 + 0.05 * _smooth_noise(h, w, 4, rng)
    bones = _bone_layout(part, h, w, rng)
    if layout_jitter > 0:
        shift = rng.uniform(-layout_jitter, layout_jitter, 2) * np.array([h, w])
        bones = [(np.asarray(p0) + shift, np.asarray(p1) + shift, r) for p0, p1, r in bones]
    texture = _smooth_noise(h, w, 24, rng)
    tissue, bone = np.zeros_like(image), np.zeros_like(image)
    for p0, p1, radius in bones:
        d = _segment_distance(yy, xx, np.asarray(p0, np.float32), np.asarray(p1, np.float32))
        np.maximum(tissue, 0.12 * np.clip(1 - d / (radius * 2.2), 0, 1) ** 0.5, out=tissue)
        cortex = np.exp(-(((d - 0.85 * radius) / (0.15 * radius)) ** 2))
        np.maximum(bone, (d < radius) * (0.25 + 0.12 * texture + 0.18 * cortex), out=bone)
    # Overlapping bones take the brighter one, so only lesions stand out as extra-bright spots.
    image += tissue + bone
    return image, bones, bone > 0


def stripes(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """+-1 stripes of period TEXTURE_PERIOD px at a random angle and phase: the texture lesion."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / TEXTURE_PERIOD)
    return np.sign(np.sin(phase + rng.uniform(0, 2 * np.pi)))


def draw_lesion(
    image: np.ndarray,
    lesion: str,
    centre: tuple[float, float],
    side: float,
    bone: tuple,
    conspicuity: float,
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Draw one lesion of about side px at centre (y, x) on bone (start, end, radius), in place;
    returns its box (x0, y0, x1, y1)."""
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = centre
    p0, p1, radius = bone
    if lesion == "implant":
        r = side / 2
        mask = np.clip(r - np.hypot(yy - cy, xx - cx), 0, 1)
        image += conspicuity * 0.55 * mask
    elif lesion == "texture":
        r = side / 2
        mask = np.clip(r - np.hypot(yy - cy, xx - cx), 0, 1)
        image += conspicuity * 0.25 * mask * stripes(h, w, rng)
    else:
        axis = np.asarray(p1, float) - np.asarray(p0, float)
        normal = np.array([-axis[1], axis[0]]) / max(np.linalg.norm(axis), 1e-9)
        half = max(radius * 1.3, side / 2)
        ends = (np.array([cy, cx]) - half * normal, np.array([cy, cx]) + half * normal)
        d = _segment_distance(yy, xx, ends[0].astype(np.float32), ends[1].astype(np.float32))
        mask = np.clip(1.5 + 0.004 * side - d, 0, 1)
        image -= conspicuity * 0.45 * mask * (image > 0.3)
        r = half
    y0, y1 = max(0, int(cy - r - 2)), min(h, int(np.ceil(cy + r + 2)))
    x0, x1 = max(0, int(cx - r - 2)), min(w, int(np.ceil(cx + r + 2)))
    return (x0, y0, x1, y1)


def finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Film noise, then 8-bit pixels."""
    image += rng.normal(0, 0.025, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def render_view(
    part: str,
    h: int,
    w: int,
    lesion: str | None,
    conspicuity: float,
    rng: np.random.Generator,
    layout_jitter: float = 0.0,
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """One radiograph as uint8 [h, w] and its lesion box (x0, y0, x1, y1) when it has a lesion."""
    image, bones, _ = draw_limb(part, h, w, rng, layout_jitter)
    box = None
    if lesion is not None:
        for _ in range(20 if layout_jitter > 0 else 1):
            bone = bones[int(rng.integers(len(bones)))]
            t = rng.uniform(0.1, 0.9) if layout_jitter > 0 else rng.uniform(0.25, 0.75)
            cy, cx = np.asarray(bone[0]) + t * (np.asarray(bone[1]) - np.asarray(bone[0]))
            inside = 0.1 * h <= cy <= 0.9 * h and 0.1 * w <= cx <= 0.9 * w
            central = 0.25 * h <= cy <= 0.75 * h and 0.25 * w <= cx <= 0.75 * w
            # Shifted limbs (the study preset): lesions spread out, the centre no more likely.
            if inside and (not central or rng.random() < 0.4):
                break
        side = np.sqrt(rng.uniform(0.01, 0.03) * h * w)
        box = draw_lesion(image, lesion, (cy, cx), side, bone, conspicuity, rng)
    return finish(image, rng), box


def save_png(pixels: np.ndarray, path: Path, mode: str) -> None:
    """Write 8-bit greyscale pixels in one of the PNG modes MURA-like data arrives in."""
    image = Image.fromarray(pixels, mode="L")
    if mode == "RGB":
        image = image.convert("RGB")
    elif mode == "LA":
        image = Image.merge("LA", (image, Image.new("L", image.size, 255)))
    elif mode == "P":
        image = image.convert("P")
    elif mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257)
    image.save(path)
