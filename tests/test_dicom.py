"""DICOM as a viewer shows it: each VOI function, a VOI LUT scaled by its range, the Presentation
LUT's inversion, each against pixels computed here from the standard's formulas (PS3.3 C.11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dicom_dataset

from kalm_lightning.data.images import load_grayscale

# A 16-bit ramp over the modality output's values (rescale: real = stored - 1000).
STORED = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
REAL = STORED.astype(np.float64) - 1000
CENTRE, WIDTH = 900.0, 1200.0


def write(path: Path, **tags) -> Path:
    ds = dicom_dataset(path, *STORED.shape, 16, "MONOCHROME2")
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1000
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = STORED.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def as_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8)


def sigmoid_window() -> np.ndarray:  # C.11.2.1.3.1, as a share of the output range
    return 1 / (1 + np.exp(-4 * (REAL - CENTRE) / WIDTH))


def exact_window() -> np.ndarray:  # C.11.2.1.3.2
    return (REAL - CENTRE) / WIDTH + 0.5


def linear_window() -> np.ndarray:  # C.11.2.1.2.1
    return (REAL - (CENTRE - 0.5)) / (WIDTH - 1) + 0.5


def close(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal to the grey level, but for values that sit on a rounding boundary."""
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99


@pytest.mark.parametrize(
    ("function", "expected"),
    [("SIGMOID", sigmoid_window), ("LINEAR_EXACT", exact_window), ("LINEAR", linear_window)],
)
def test_each_voi_function_is_shown_as_the_standard_says(
    tmp_path: Path, function: str, expected
) -> None:
    path = write(
        tmp_path / "x.dcm", WindowCenter=CENTRE, WindowWidth=WIDTH, VOILUTFunction=function
    )
    close(load_grayscale(path), as_uint8(expected()))


def test_sigmoid_is_not_the_linear_window(tmp_path: Path) -> None:
    """What the old linear formula gave a SIGMOID file is far from what a viewer shows."""
    path = write(
        tmp_path / "x.dcm", WindowCenter=CENTRE, WindowWidth=WIDTH, VOILUTFunction="SIGMOID"
    )
    gap = np.abs(load_grayscale(path).astype(int) - as_uint8(linear_window()).astype(int))
    assert gap.max() > 0.1 * 255


def test_presentation_lut_inverse_inverts_once(tmp_path: Path) -> None:
    window = {"WindowCenter": CENTRE, "WindowWidth": WIDTH, "VOILUTFunction": "LINEAR_EXACT"}
    inverse = write(tmp_path / "inverse.dcm", PresentationLUTShape="INVERSE", **window)
    close(load_grayscale(inverse), 255 - as_uint8(exact_window()))
    # MONOCHROME1 with INVERSE (as DX requires) states one inversion, not two.
    both = write(
        tmp_path / "both.dcm",
        PhotometricInterpretation="MONOCHROME1",
        PresentationLUTShape="INVERSE",
        **window,
    )
    close(load_grayscale(both), 255 - as_uint8(exact_window()))


def test_a_voi_lut_is_scaled_by_its_output_range_not_min_max(tmp_path: Path) -> None:
    """A 12-bit VOI LUT whose entries use only the lower half of their range: shown half-bright."""
    entries = 3001  # one per real value from 0 to 3000; those below 0 take the first entry
    lut = (np.linspace(0, 2047, entries)).astype(np.uint16)
    item = pydicom.dataset.Dataset()
    item.LUTDescriptor = [entries, 0, 12]
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData, as 16-bit words
    path = write(tmp_path / "lut.dcm", VOILUTSequence=pydicom.sequence.Sequence([item]))
    expected = lut[np.clip(REAL.astype(int), 0, entries - 1)] / 4095
    close(load_grayscale(path), as_uint8(expected))
    assert load_grayscale(path).max() <= 128
