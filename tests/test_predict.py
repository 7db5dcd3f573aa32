"""The predict command on new radiographs, and its CSV read back by evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
import pydicom
import pytest
import torch
from conftest import TINY_RUN, check, dicom_dataset, run_cli, shared
from PIL import Image

from kalm_lightning.data.geometry import PIXEL_BOX
from kalm_lightning.data.images import load_grayscale
from kalm_lightning.stages import load_stage

DATA = [arg for arg in TINY_RUN if arg.startswith("data.")]


@pytest.mark.slow
def test_predict_then_evaluate_gives_the_checkpoint_figures(trained: dict[str, Path]) -> None:
    work = trained["work"]
    best = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
    root = work / "data/synthetic"
    check(
        run_cli(
            "predict",
            [f"ckpt_path={best}", f"images={root}", "paths.output_root=pred", "num_workers=0"],
            work,
        )
    )
    run = next((work / "pred/predict").iterdir())
    predictions = pd.read_csv(run / "predictions_images.csv")
    assert {"path", "prob", "prob_global", "prob_local", "box_x0", "error"} <= set(
        predictions.columns
    )
    assert predictions["error"].isna().all()
    assert predictions["path"].str.startswith("MURA-v1.1/valid/").all()
    submission = pd.read_csv(run / "submission.csv", header=None, names=["study", "label"])
    assert submission["study"].nunique() == len(submission) and set(submission["label"]) <= {0, 1}
    check(
        run_cli(
            "evaluate",
            [
                f"predictions={run / 'predictions_images.csv'}",
                f"data.root={root}",
                "paths.output_root=pred_eval",
            ],
            work,
        )
    )
    check(run_cli("evaluate", [f"ckpt_path={best}", "paths.output_root=ckpt_eval", *DATA], work))
    from_csv = json.loads(next((work / "pred_eval").rglob("metrics.json")).read_text())[
        "predictions"
    ]
    from_ckpt = json.loads(next((work / "ckpt_eval").rglob("metrics.json")).read_text())["kalm"]
    for level in ("image", "study"):
        for name in ("accuracy", "auroc", "kappa", "n"):
            assert from_csv[level][name] == pytest.approx(from_ckpt[level][name], abs=1e-5), (
                level,
                name,
            )


def test_predict_on_a_missing_folder_gives_one_line(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    best = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    result = run_cli("predict", [f"ckpt_path={best}", f"images={tmp_path / 'nowhere'}"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
        "nowhere does not exist"
    )


@pytest.fixture(scope="module")
def new_images(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder tree of new radiographs: two studies of PNGs, a JPEG, a corrupt and an empty file."""
    source = trained["work"] / "data/synthetic/MURA-v1.1/valid"
    folder = tmp_path_factory.mktemp("new")
    pngs = sorted(source.rglob("*.png"))[:4]
    for i, png in enumerate(pngs):
        target = folder / f"patient{i // 2}" / "study1" / f"view{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
    Image.open(pngs[0]).convert("L").save(folder / "patient0" / "study1" / "view9.jpg", quality=95)
    (folder / "patient1" / "study1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "patient1" / "study1" / "empty.png").write_bytes(b"")
    return folder


def predict(ckpt: str, images: Path, out: Path, *extra: str):
    return run_cli(
        "predict",
        [f"ckpt_path={ckpt}", f"images={images}", f"output={out}", "num_workers=0", *extra],
        out.parent,
    )


def test_folder_tree_with_bad_files_gets_a_row_per_file_and_a_nonzero_exit(
    trained: dict[str, Path], new_images: Path, tmp_path: Path
) -> None:
    best = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
    out = tmp_path / "pred"
    result = predict(best, new_images, out, "overlays=true")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("kalm-predict: 2 of 7 files could not")
    assert "5 of 7 files scored" in result.stdout.replace("\n", " ")
    rows = pd.read_csv(out / "predictions_images.csv")
    assert len(rows) == 7
    bad = rows.set_index(rows["path"].map(lambda p: Path(p).name)).loc[["corrupt.png", "empty.png"]]
    assert bad["prob"].isna().all()
    assert "cannot decode" in bad.loc["corrupt.png", "error"]
    assert bad.loc["empty.png", "error"].endswith("empty.png: the file is empty (0 bytes)")
    good = rows[~rows["path"].str.endswith(("corrupt.png", "empty.png"))]
    assert good["error"].isna().all() and good["prob"].between(0, 1).all()
    assert (good["box_x1"] > good["box_x0"]).all()
    studies = pd.read_csv(out / "predictions_studies.csv")
    assert list(studies.columns) == ["study", "images", "prob", "call"]  # no truth: no label
    assert sorted(studies["images"]) == [
        2,
        3,
    ]  # patient0: two PNGs and the JPEG; patient1: two PNGs
    submission = pd.read_csv(out / "submission.csv", header=None, names=["study", "label"])
    assert len(submission) == 2
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == 5
    scored = rows[rows["prob"].notna()]
    assert sorted(out / name for name in scored["overlay"]) == overlays
    for name, path in zip(scored["overlay"], scored["path"], strict=True):
        (file,) = new_images.rglob(Path(path).name)  # each view's name is unique in the tree
        with Image.open(out / name) as image, Image.open(file) as radiograph:
            pixels = np.asarray(image.convert("RGB")).astype(int)
            # CNN_g's and CNN_l's panels side by side, then the 44 px colour scale
            assert image.width == 2 * radiograph.width + 44 and image.height == radiograph.height
            assert (pixels[..., 0] != pixels[..., 2]).mean() > 0.5  # coloured by the map
    # Nothing already in the output folder is overwritten without overwrite=true.
    again = predict(best, new_images, out)
    assert again.returncode == 2 and "already holds" in again.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "predictions_images.csv",
            "predictions_studies.csv",
            "submission.csv",
            "skipped_images.csv",
            "overlays",
        ]
    )


@pytest.mark.slow
def test_one_image_a_study_folder_and_a_csv(
    trained: dict[str, Path], new_images: Path, tmp_path: Path
) -> None:
    best = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
    one = new_images / "patient0" / "study1" / "view0.png"
    check(predict(best, one, tmp_path / "one"))
    single = pd.read_csv(tmp_path / "one" / "predictions_images.csv")
    check(predict(best, one.parent, tmp_path / "study"))
    study = pd.read_csv(tmp_path / "study" / "predictions_images.csv")
    assert len(single) == 1 and len(study) == 3
    listed = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(one), "patient0/study1/view1.png"]}).to_csv(listed, index=False)
    shutil.copytree(new_images / "patient0", tmp_path / "patient0")
    check(predict(best, listed, tmp_path / "csv"))
    from_csv = pd.read_csv(tmp_path / "csv" / "predictions_images.csv")
    assert from_csv["path"].tolist() == [str(one), "patient0/study1/view1.png"]
    same = study.set_index(study["path"].str.rsplit("/", n=1).str[-1])["prob"]
    assert from_csv["prob"].tolist() == pytest.approx(
        [same["view0.png"], same["view1.png"]], abs=1e-6
    )
    assert single["prob"].iloc[0] == pytest.approx(same["view0.png"], abs=1e-6)


@pytest.mark.slow
def test_hflip_averages_with_the_mirror_and_max_takes_the_most_abnormal_image(
    trained: dict[str, Path], new_images: Path, tmp_path: Path
) -> None:
    """One study of an image, its mirror (made here) and another image: without TTA, then with
    tta=hflip study_aggregation=max."""
    best = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
    study = tmp_path / "in" / "study1"
    study.mkdir(parents=True)
    image = Image.open(new_images / "patient0" / "study1" / "view0.png")
    image.save(study / "a.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(study / "a_mirrored.png")
    shutil.copy(new_images / "patient0" / "study1" / "view1.png", study / "b.png")
    check(predict(best, study, tmp_path / "plain"))
    check(predict(best, study, tmp_path / "tta", "tta=hflip", "study_aggregation=max"))
    plain = pd.read_csv(tmp_path / "plain" / "predictions_images.csv")
    tta = pd.read_csv(tmp_path / "tta" / "predictions_images.csv")
    for frame in (plain, tta):
        frame.index = [Path(p).name for p in frame["path"]]
    for column in ("prob_global", "prob_local", "prob"):
        mirrored = (plain.loc["a.png", column] + plain.loc["a_mirrored.png", column]) / 2
        assert tta.loc["a.png", column] == pytest.approx(mirrored, abs=1e-4), column
        assert tta.loc["a_mirrored.png", column] == pytest.approx(mirrored, abs=1e-4), column
    studies = pd.read_csv(tmp_path / "tta" / "predictions_studies.csv")
    assert studies["prob"].item() == pytest.approx(tta["prob"].max(), abs=1e-6)
    means = pd.read_csv(tmp_path / "plain" / "predictions_studies.csv")
    assert means["prob"].item() == pytest.approx(plain["prob"].mean(), abs=1e-6)


@pytest.mark.slow
def test_stage1_checkpoint_gives_the_global_score_and_empty_boxes(
    trained: dict[str, Path], new_images: Path, tmp_path: Path
) -> None:
    best = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    check(predict(best, new_images / "patient0", tmp_path / "s1"))
    rows = pd.read_csv(tmp_path / "s1" / "predictions_images.csv")
    assert rows["prob"].tolist() == rows["prob_raw"].tolist() == rows["prob_global"].tolist()
    assert not {"prob_local", "prob_kalm", "box_x0", "box_area"} & set(rows.columns)  # no CNN_l


def write_dicom(
    path: Path, pixels: np.ndarray, monochrome1: bool, bits: int, windowed: bool
) -> None:
    """A DICOM that a viewer shows exactly as `pixels` (uint8): rescaled, windowed, maybe inverted."""
    shown = 255 - pixels.astype(np.int64) if monochrome1 else pixels.astype(np.int64)
    photometric = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds = dicom_dataset(path, *pixels.shape, bits, photometric)
    if windowed:  # stored = 8 * shown + 50, real = 2 * stored - 100 = 16 * shown; window maps 16 * shown to shown
        ds.RescaleSlope, ds.RescaleIntercept = 2, -100
        ds.WindowCenter, ds.WindowWidth = 2040.5, 4081
        stored = (8 * shown + 50).astype(np.uint16)
    else:
        stored = shown.astype(np.uint8 if bits == 8 else np.uint16)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


DICOM_KINDS = [(False, 8, False), (True, 8, False), (False, 16, True), (True, 16, True)]


def dicom_name(monochrome1: bool, bits: int, windowed: bool) -> str:
    return f"{'mono1' if monochrome1 else 'mono2'}-{bits}bit{'-windowed' if windowed else ''}"


@pytest.fixture(scope="module")
def dicom_predictions(
    trained: dict[str, Path], new_images: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, pd.DataFrame]:
    """One predict run over a folder of DICOMs: each kind beside the PNG exported from it, and
    one DICOM without pixel data. Returns the exit code and the rows by file name."""
    built = shared(
        tmp_path_factory, "dicoms", lambda work: predict_dicoms(trained, new_images, work)
    )
    rows = pd.read_csv(built["csv"])
    return int(built["code"]), rows.set_index(rows["path"].map(lambda p: Path(p).name))


def predict_dicoms(trained: dict[str, Path], new_images: Path, work: Path) -> dict[str, str]:
    png = new_images / "patient0" / "study1" / "view0.png"
    pixels = np.asarray(Image.open(png).convert("L")).copy()
    pixels[0, 0], pixels[0, 1] = 0, 255  # the full range: an unwindowed DICOM is shown min to max
    folder = work / "in"
    folder.mkdir()
    for kind in DICOM_KINDS:
        Image.fromarray(pixels).save(folder / f"{dicom_name(*kind)}.png")
        write_dicom(folder / f"{dicom_name(*kind)}.dcm", pixels, *kind)
        assert (load_grayscale(folder / f"{dicom_name(*kind)}.dcm") == pixels).all()
    # a JPEG whose EXIF orientation turns it upright (6: a quarter turn clockwise), beside the
    # same radiograph stored upright; not square, so a box mapped back unturned would show
    upright = pixels[:, : pixels.shape[1] * 2 // 3]
    Image.fromarray(upright).save(folder / "upright.jpg", quality=100)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright)))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(folder / "turned.jpg", quality=100, exif=exif.tobytes())
    write_dicom(folder / "nopixels.dcm", pixels, False, 8, False)
    ds = pydicom.dcmread(folder / "nopixels.dcm")
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    best = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
    result = predict(best, folder, work / "out")
    return {"code": result.returncode, "csv": work / "out" / "predictions_images.csv"}


@pytest.mark.parametrize(("monochrome1", "bits", "windowed"), DICOM_KINDS)
def test_dicom_and_the_png_exported_from_it_agree(
    dicom_predictions: tuple[int, pd.DataFrame], monochrome1: bool, bits: int, windowed: bool
) -> None:
    _, rows = dicom_predictions
    name = dicom_name(monochrome1, bits, windowed)
    assert pd.isna(rows.loc[f"{name}.dcm", "error"])
    assert abs(rows.loc[f"{name}.dcm", "prob"] - rows.loc[f"{name}.png", "prob"]) < 1e-4


def test_a_jpeg_is_scored_and_boxed_upright_as_its_exif_orientation_says(
    dicom_predictions: tuple[int, pd.DataFrame],
) -> None:
    _, rows = dicom_predictions
    turned, upright = rows.loc["turned.jpg"], rows.loc["upright.jpg"]
    assert pd.isna(turned["error"]) and pd.isna(upright["error"])
    probs = ["prob", "prob_global", "prob_local"]  # as the DICOMs and their PNGs: 1e-4
    np.testing.assert_allclose(turned[probs].astype(float), upright[probs].astype(float), atol=1e-4)
    assert turned[PIXEL_BOX].tolist() == upright[PIXEL_BOX].tolist()  # in the upright pixels


def test_dicom_without_pixel_data_gets_its_own_error(
    dicom_predictions: tuple[int, pd.DataFrame],
) -> None:
    code, rows = dicom_predictions
    assert code == 2
    assert "no pixel data" in rows.loc["nopixels.dcm", "error"]
    assert rows["error"].notna().sum() == 1  # every other DICOM and PNG was scored


@pytest.mark.parametrize(
    ("fmt", "model"),
    [
        # The quick tier exports KALM to ONNX in test_contracts (its probabilities against
        # evaluate's) and checks every ONNX output against eager here with multicrop's.
        pytest.param("onnx", "kalm", marks=pytest.mark.slow),
        ("export", "kalm"),
        ("onnx", "multicrop"),
        pytest.param("onnx", "sampling", marks=pytest.mark.slow),
        pytest.param("onnx", "navigator", marks=pytest.mark.slow),  # trains the Table 1 kit
    ],
)
def test_export_matches_eager_pytorch(
    request: pytest.FixtureRequest, tmp_path: Path, fmt: str, model: str
) -> None:
    if model in ("kalm", "multicrop", "sampling"):
        stage2 = request.getfixturevalue("trained" if model == "kalm" else model)["stage2"]
        best = json.loads((stage2 / "result.json").read_text())["best_ckpt"]
    else:  # a navigator trained in experiment=paper (the Table 1 fixture)
        sweep = request.getfixturevalue("navigator_pipeline")
        best = json.loads(next(sweep.rglob("stage2/result.json")).read_text())["best_ckpt"]
    target = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    check(run_cli("export", [f"ckpt_path={best}", f"format={fmt}", f"output={target}"], tmp_path))
    meta = json.loads(target.with_suffix(target.suffix + ".json").read_text())
    windows = ["crops", "attention"] if model in ("multicrop", "sampling") else []
    assert meta["outputs"] == ["prob", "prob_global", "prob_local", "boxes", *windows]
    size = meta["source_size"]
    module = load_stage(best)
    for batch in (1, 3):
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            eager = module.score(images)
        expected = [eager[k] for k in ("kalm", "global", "local", "boxes", *windows)]
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(str(target))
            got = [torch.from_numpy(v) for v in session.run(None, {"images": images.numpy()})]
        else:
            got = list(torch.export.load(str(target)).module()(images))  # torch.export
        for value, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(value, reference, atol=1e-4, rtol=0)
