"""DICOM radiographs to 8-bit greyscale, as a viewer shows them (PS3.3 C.11): modality LUT (rescale
slope and intercept), then the VOI stage through pydicom's `apply_voi_lut` (a VOI LUT, or a window
with its VOILUTFunction: LINEAR, LINEAR_EXACT or SIGMOID) scaled by its output range, then one
inversion when the image is MONOCHROME1 or its PresentationLUTShape is INVERSE (both say the same
thing, so never twice). Needs the `dicom` extra."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

try:  # optional: pip install 'kalm-lightning[dicom]'
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pragma: no cover - exercised only without the extra
    pydicom = None

DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom_bytes(data: bytes, name: str = "") -> bool:
    """An uploaded file's bytes are DICOM: its name ends .dcm/.dicom, or 'DICM' is at byte 128."""
    return Path(name).suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM"


def is_dicom(path: str | Path) -> bool:
    """A .dcm/.dicom file, or any file with DICOM's 'DICM' marker at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_size(path: str | Path) -> tuple[int, int]:
    """(Rows, Columns) from the header, without reading the pixel data."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.Rows), int(ds.Columns)


def voi_range(ds) -> tuple[float, float]:
    """The range the VOI stage maps onto: a VOI LUT's [0, 2^n - 1] (n from its LUTDescriptor); for a
    window, the modality stage's output range, as pydicom's `apply_windowing` takes it (the stored
    bits, signed or not, or a modality LUT's, through the rescale)."""
    if "VOILUTSequence" in ds:
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        low, high = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    elif ds.get("PixelRepresentation", 0) == 0:
        low, high = 0, 2 ** int(ds.BitsStored) - 1
    else:
        low, high = -(2 ** (int(ds.BitsStored) - 1)), 2 ** (int(ds.BitsStored) - 1) - 1
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return float(low), float(high)


def inverted(ds) -> bool:
    """MONOCHROME1 (low values bright) or a Presentation LUT of shape INVERSE: one inversion."""
    return (
        ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1"
        or str(ds.get("PresentationLUTShape", "IDENTITY")).upper() == "INVERSE"
    )


def read_dicom(path: str | Path | BinaryIO) -> np.ndarray:
    """uint8 [H, W] pixels of a DICOM image; ValueError (with the reason) when it has none to show."""
    if pydicom is None:
        raise ValueError("reading DICOM needs pydicom: pip install 'kalm-lightning[dicom]'")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as error:
        raise ValueError(f"not a DICOM file ({error})") from error
    if "PixelData" not in ds:
        raise ValueError("the DICOM file holds no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises several types for missing or failing decoders
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise ValueError(
            f"cannot decode its pixel data (transfer syntax {name}: {error}); "
            "pip install 'kalm-lightning[dicom]' brings the decoders for compressed DICOM"
        ) from error
    if ds.get("SamplesPerPixel", 1) > 1:  # colour: luminance as PIL's "L" computes it
        pixels = pixels[0] if pixels.ndim == 4 else pixels
        pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
    elif pixels.ndim == 3:  # several frames: the first
        pixels = pixels[0]
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        if "VOILUTSequence" in ds:  # a LUT is indexed by integer values
            values = np.rint(values).astype(np.int64)
        try:
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        except ValueError as error:  # a window width below what its VOI function allows, ...
            raise ValueError(f"its VOI LUT / window cannot be applied ({error})") from error
        low, high = voi_range(ds)
        scaled = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else values * 0
    else:  # no VOI: the full range of the image
        scaled = _minmax(values)
    if inverted(ds):
        scaled = 1.0 - scaled
    return np.round(scaled * 255).astype(np.uint8)


def _minmax(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)
