"""Decoding radiographs (PNG of any mode, JPEG, DICOM) to 8-bit greyscale, and resizing them to the source size."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kalm_lightning.data.dicom import dicom_size, is_dicom, is_dicom_bytes, read_dicom
from kalm_lightning.data.geometry import fit_geometry
from kalm_lightning.errors import UserError
from kalm_lightning.settings import check

EXIF_ORIENTATION = 0x0112  # the EXIF tag: 1 upright; 5-8 transpose the width and height


class BadImageError(UserError):
    """An image that cannot be decoded: corrupt, truncated, empty or too large."""


def to_grayscale(image: Image.Image) -> np.ndarray:
    """8-bit greyscale pixels of a decoded image; 16-bit data is scaled to 0-255, never clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image).astype(np.float64)
        if image.mode == "I" and pixels.max(initial=0) > 65535:
            raise ValueError(f"32-bit pixel values up to {pixels.max():.0f} are not a radiograph")
        return np.round(pixels / 257.0).clip(0, 255).astype(np.uint8)
    if image.mode == "F":
        return np.asarray(image).clip(0, 255).round().astype(np.uint8)
    if image.mode == "LA":
        return np.asarray(image.getchannel("L"))
    if image.mode in ("RGBA", "PA", "P"):
        image = image.convert("RGBA").convert("RGB")
    return np.asarray(image.convert("L"))


def load_grayscale(path: str | Path) -> np.ndarray:
    """Read one image (PNG, JPEG, any format PIL reads, or DICOM) as uint8 [H, W]; any failure
    raises BadImageError naming the file."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise BadImageError(f"{path}: the file is empty (0 bytes)")
    return _decode(path, str(path), is_dicom(path))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An uploaded file's bytes decoded exactly as `load_grayscale` decodes a file (the server's
    path): uint8 [H, W], or BadImageError naming the upload. Nothing but the bytes is read."""
    if not data:
        raise BadImageError(f"{name}: the file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, is_dicom_bytes(data, name))


def _decode(source: str | Path | BinaryIO, name: str, dicom: bool) -> np.ndarray:
    if dicom:
        try:
            pixels = read_dicom(source)
        except Exception as error:  # pydicom's parser and decoders raise many types
            raise BadImageError(f"{name}: cannot read DICOM image ({error})") from error
        if pixels.size == 0:
            raise BadImageError(f"{name}: the image has no pixels")
        return pixels
    try:
        with Image.open(source) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                raise BadImageError(
                    f"{name}: {width}x{height} pixels is over PIL's limit of {limit}; "
                    "downscale the image or raise PIL.Image.MAX_IMAGE_PIXELS"
                )
            image.load()
            # upright as a viewer shows it: a camera's or scanner's EXIF orientation applied
            pixels = to_grayscale(ImageOps.exif_transpose(image))
    except BadImageError:
        raise
    except Image.DecompressionBombError as error:  # PIL refuses these before reading the size out
        raise BadImageError(
            f"{name}: more than twice PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels, refused as a "
            "possible decompression bomb; downscale the image or raise PIL.Image.MAX_IMAGE_PIXELS"
        ) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the upload", str(error))
        raise BadImageError(f"{name}: cannot decode image ({why})") from error
    if pixels.size == 0:
        raise BadImageError(f"{name}: the image has no pixels")
    return pixels


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image upright (its EXIF orientation applied, as `load_grayscale`
    decodes it), from its header, without decoding the pixels."""
    if is_dicom(path):
        return dicom_size(path)
    with Image.open(path) as image:
        turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn
        return (image.width, image.height) if turned else (image.height, image.width)


def resize_square(pixels: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """Resize uint8 [H, W] to [size, size]: stretched, or padded with black to keep the aspect."""
    check("data.resize", mode)
    image = Image.fromarray(pixels)
    if mode == "stretch":
        return np.array(image.resize((size, size), Image.BILINEAR))
    height, width = pixels.shape
    scale_x, scale_y, left, top = fit_geometry(height, width, size, mode)
    new_w, new_h = max(1, round(width * scale_x)), max(1, round(height * scale_y))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(image.resize((new_w, new_h), Image.BILINEAR), (round(left), round(top)))
    return np.array(canvas)
