"""DICOM radiographs to 8-bit greyscale, as a viewer shows them: modality LUT (rescale slope and
intercept), then the VOI LUT or the window, then MONOCHROME1 inverted. Needs the `dicom` extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:  # optional: pip install 'kalm-lightning[dicom]'
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pragma: no cover - exercised only without the extra
    pydicom = None

DICOM_SUFFIXES = (".dcm", ".dicom")


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


def window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM's linear VOI window (PS3.3 C.11.2.1.2) onto [0, 1]."""
    if width < 1:
        raise ValueError(f"window width {width} is below 1")
    return np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def first(value) -> float:
    """WindowCenter and WindowWidth may hold several values: the first is the default view."""
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def read_dicom(path: str | Path) -> np.ndarray:
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
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        scaled = _minmax(values)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        scaled = window(values, first(ds.WindowCenter), first(ds.WindowWidth))
    else:
        scaled = _minmax(values)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        scaled = 1.0 - scaled  # MONOCHROME1: low values are bright
    return np.round(scaled * 255).astype(np.uint8)


def _minmax(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)
