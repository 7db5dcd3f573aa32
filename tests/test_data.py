"""MURA index, decoding, Dataset, DataModule and cache on generated MURA-layout trees."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from PIL import Image
from scipy import ndimage

from kalm_lightning.config import compose_config
from kalm_lightning.data.blobs import BLOB_CONTRAST, Blobs, render_blob_view, texture_kept
from kalm_lightning.data.cache import ImageCache
from kalm_lightning.data.images import BadImageError, load_grayscale, resize_square
from kalm_lightning.data.mura import (
    BODY_PARTS,
    MURADataModule,
    MURADataset,
    collate_skipping_bad,
    read_mura_index,
)
from kalm_lightning.data.synthetic import (
    SyntheticSettings,
    ensure_synthetic_mura,
    generate_synthetic_mura,
    main,
)
from kalm_lightning.data.transfer import model_input
from kalm_lightning.errors import UserError


def write_tree(
    root: Path, studies: dict[str, int], images: list[str], split: str = "train"
) -> Path:
    """A hand-made MURA-v1.1 tree: study path -> label, and image rows (written as 8x8 PNGs)."""
    base = root / "MURA-v1.1"
    base.mkdir(parents=True, exist_ok=True)
    for name in images:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if not name.startswith(("/", "..")) and ".." not in name:
            Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / name)
    (base / f"{split}_labeled_studies.csv").write_text(
        "".join(f"{s},{y}\n" for s, y in studies.items())
    )
    (base / f"{split}_image_paths.csv").write_text("".join(f"{i}\n" for i in images))
    other = "valid" if split == "train" else "train"
    (base / f"{other}_labeled_studies.csv").write_text("")
    (base / f"{other}_image_paths.csv").write_text("")
    return root


P = "MURA-v1.1/train/XR_{}/patient00001/study1_{}/"


def test_generator_counts_read_back(tmp_path: Path) -> None:
    counts = generate_synthetic_mura(
        tmp_path,
        SyntheticSettings(train_studies=30, valid_studies=8, seed=1, max_size=64),
        workers=1,
    )
    for split in ("train", "valid"):
        index = read_mura_index(tmp_path, split)
        assert len(index) == counts[split]["images"]
        assert index["study"].nunique() == counts[split]["studies"]
        per_part = index.drop_duplicates("study")["body_part"].value_counts().to_dict()
        assert per_part == counts[split]["studies_by_body_part"]
        assert index.drop_duplicates("study")["label"].sum() == counts[split]["abnormal_studies"]
        assert set(index["body_part"]) <= set(BODY_PARTS)


def test_generator_is_deterministic_and_has_lesion_boxes(tmp_path: Path) -> None:
    settings = SyntheticSettings(train_studies=6, valid_studies=2, seed=5, max_size=64)
    generate_synthetic_mura(tmp_path / "a", settings, workers=1)
    generate_synthetic_mura(tmp_path / "b", settings, workers=1)
    for name in ("train_image_paths.csv", "lesion_boxes.csv"):
        assert (tmp_path / "a/MURA-v1.1" / name).read_text() == (
            tmp_path / "b/MURA-v1.1" / name
        ).read_text()
    first = pd.read_csv(tmp_path / "a/MURA-v1.1/train_image_paths.csv", header=None)[0][0]
    assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()
    boxes = pd.read_csv(tmp_path / "a/MURA-v1.1/lesion_boxes.csv")
    index = read_mura_index(tmp_path / "a", "train")
    abnormal = set(index.loc[index.label == 1, "image"])
    assert set(boxes["image"]) <= abnormal and len(boxes) > 0
    assert ((boxes.x1 > boxes.x0) & (boxes.y1 > boxes.y0)).all()


def test_generator_cli_refuses_existing_output(tmp_path: Path, capsys) -> None:
    main(["--out", str(tmp_path), "--studies", "4", "--max-size", "48"])
    assert json.loads(capsys.readouterr().out)["train"]["studies"] == 4
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--studies", "4"])


@pytest.mark.parametrize("decoys", [0, 3])
def test_every_blob_view_carries_its_blob_and_its_decoys(decoys: int) -> None:
    """Each view drawn at cue 0.5 and at cue 0 with the same random draws: the difference is 1 + D
    discs of the blob's contrast, in normal and lesioned views alike, and a lesion's box is centred
    on one of them. (Blobs of 12% of the side, so that the bones leave room to keep them apart.)"""
    for part in BODY_PARTS:
        for seed, lesion in itertools.product(range(2), (None, "texture")):
            (shown, box), (plain, _) = (
                render_blob_view(
                    part,
                    320,
                    256,
                    lesion,
                    0.0,
                    np.random.default_rng(seed),
                    0.3,
                    Blobs(cue, decoys, size=0.12),
                )
                for cue in (0.5, 0.0)
            )
            lift = (shown.astype(float) - plain) / 255
            discs, count = ndimage.label(lift > 0.75 * 0.5 * BLOB_CONTRAST)
            assert count == 1 + decoys, (part, seed, lesion)
            assert lift.max() <= 0.5 * BLOB_CONTRAST + 1 / 255  # no blob drawn over another
            if lesion is None:
                assert box is None
            else:
                x0, y0, x1, y1 = box
                assert discs[(y0 + y1) // 2, (x0 + x1) // 2] > 0


def test_the_generator_honours_cue_and_decoys_and_draws_texture_in_lesioned_views_only(
    tmp_path: Path,
) -> None:
    """`data.synthetic.cue=0.5 data.synthetic.decoys=3` composed on the study's preset, generated
    as prepare_data does. Against the same tree drawn without its lesions (conspicuity 0), a
    lesioned view differs only inside its lesion's box, with no change of the box's mean
    brightness, and every other view, normal studies' included, not at all. Against the tree at
    cue 0, every view carries the blob's contrast."""

    def tree(name: str, *overrides: str) -> Path:
        cfg = compose_config(
            "train",
            [
                "experiment=localizer",
                "data.synthetic.cue=0.5",
                "data.synthetic.decoys=3",
                "data.synthetic.train_studies=10",
                "data.synthetic.valid_studies=2",
                "data.synthetic.max_size=96",
                *overrides,
            ],
        )
        synthetic = OmegaConf.to_container(cfg.data.synthetic)
        return ensure_synthetic_mura(tmp_path / name, **synthetic)

    tree_ = tree("blobs")
    assert json.loads((tree_ / "MURA-v1.1/synthetic.json").read_text())["decoys"] == 3
    unlesioned, uncued = (
        tree("no-lesions", "data.synthetic.conspicuity=0"),
        tree("cue0", "data.synthetic.cue=0"),
    )
    boxes = pd.read_csv(tree_ / "MURA-v1.1/lesion_boxes.csv").set_index("image")
    index = pd.concat([read_mura_index(tree_, split) for split in ("train", "valid")])
    assert set(boxes.index) <= set(index.loc[index.label == 1, "image"])
    assert (
        index.loc[index.label == 1, "study"].nunique()
        == index.loc[index.image.isin(boxes.index), "study"].nunique()
    )  # every abnormal study has a lesioned view
    for image in index["image"]:
        pixels = load_grayscale(tree_ / image).astype(float)
        texture = pixels - load_grayscale(unlesioned / image)
        lift = (pixels - load_grayscale(uncued / image)) / 255
        assert lift.max() >= 0.9 * 0.5 * BLOB_CONTRAST, image
        if image in boxes.index:
            x0, y0, x1, y1 = boxes.loc[image, ["x0", "y0", "x1", "y1"]]
            inside = texture[y0:y1, x0:x1]
            assert (np.abs(inside) > 20).mean() > 0.2, image
            assert abs(inside.mean()) < 2, image  # the texture adds no mean brightness
            texture[y0:y1, x0:x1] = 0
        assert not texture.any(), image


def test_a_bright_blob_leaves_the_texture_less_headroom() -> None:
    """texture_kept measures what the headroom rule leaves of the texture's amplitude: some of it
    always, all of it never (the bone's dark and bright parts cut it), and less in a blob of cue 1
    than of cue 0.5, which lifts the bone towards the ceiling."""
    kept = {cue: texture_kept(Blobs(cue), 96, 1.0, 0.3, views=14) for cue in (0.5, 1.0)}
    assert 0.2 < kept[1.0] < kept[0.5] < 1.0, kept


def test_a_fixed_texture_amplitude_holds_whatever_the_cue() -> None:
    """data.synthetic.texture_amplitude decouples the cue from the lesion's strength: every view is
    compressed to leave room for the stripes, so all of their amplitude is there at c = 0 and at
    c = 1 alike, and the lesion is no fainter where the blob is bright."""
    kept = {
        cue: texture_kept(Blobs(cue, texture_amplitude=0.12), 96, 1.0, 0.3, views=14)
        for cue in (0.0, 0.5, 1.0)
    }
    assert all(abs(k - 1.0) < 0.02 for k in kept.values()), kept


def test_first_row_labels_and_both_root_forms(tmp_path: Path) -> None:
    studies = {P.format("WRIST", "positive"): 1, P.format("ELBOW", "negative"): 0}
    images = [
        P.format("WRIST", "positive") + "image1.png",
        P.format("ELBOW", "negative") + "image1.png",
    ]
    write_tree(tmp_path, studies, images)
    for root in (tmp_path, tmp_path / "MURA-v1.1"):
        index = read_mura_index(root, "train")
        assert len(index) == 2  # no row lost to a header
        assert index["label"].tolist() == [1, 0]
        assert index["body_part"].tolist() == ["XR_WRIST", "XR_ELBOW"]
        assert index["patient"].tolist() == ["patient00001", "patient00001"]
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in index["path"])
        assert "MURA-v1.1/MURA-v1.1" not in index["path"][0]


def test_same_patient_and_study_number_in_two_body_parts_stay_distinct(tmp_path: Path) -> None:
    studies = {P.format("WRIST", "positive"): 1, P.format("HAND", "negative"): 0}
    images = [s + "image1.png" for s in studies] + [s + "image2.png" for s in studies]
    write_tree(tmp_path, studies, images)
    index = read_mura_index(tmp_path, "train")
    assert index["study"].nunique() == 2
    assert index.groupby("study")["label"].first().to_dict() == studies


@pytest.mark.parametrize(
    ("studies", "images", "message"),
    [
        (
            {P.format("WRIST", "positive"): 0},
            [P.format("WRIST", "positive") + "image1.png"],
            "train_labeled_studies.csv row 1: label contradicts the study folder name",
        ),
        (
            {P.format("WRIST", "positive"): 1},
            [P.format("HAND", "positive") + "image1.png"],
            "train_image_paths.csv row 1: image's study is not in train_labeled_studies.csv",
        ),
        (
            {P.format("WRIST", "positive"): 1},
            ["MURA-v1.1/train/../../etc/passwd"],
            "train_image_paths.csv row 1: path escapes the dataset root",
        ),
        (
            {P.format("WRIST", "positive"): 1},
            ["/etc/passwd"],
            "train_image_paths.csv row 1: path escapes the dataset root",
        ),
    ],
)
def test_bad_index_rows_are_named(
    tmp_path: Path, studies: dict, images: list, message: str
) -> None:
    write_tree(tmp_path, studies, images)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_mura_index(tmp_path, "train")


def test_missing_csv_and_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"holds no MURA-v1\.1/ folder"):
        read_mura_index(tmp_path, "train")
    (tmp_path / "MURA-v1.1").mkdir()
    with pytest.raises(UserError, match=r"train_image_paths\.csv is missing"):
        read_mura_index(tmp_path, "train")


def test_missing_images_error_or_skip(tmp_path: Path) -> None:
    study = P.format("WRIST", "positive")
    write_tree(
        tmp_path, {study: 1}, [study + "image1.png", study + "image2.png", study + "image3.png"]
    )
    (tmp_path / study / "image2.png").unlink()
    with pytest.raises(
        UserError,
        match=r"1 image\(s\) listed in .* are missing on disk: .*image2.png; .*data.on_missing=skip",
    ):
        read_mura_index(tmp_path, "train")
    assert (
        read_mura_index(tmp_path, "train", on_missing="skip")["path"]
        .str.endswith(("image1.png", "image3.png"))
        .all()
    )


def test_every_png_mode_decodes_to_8bit_grey(tmp_path: Path) -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([grey, grey, grey], axis=-1)
    cases = {
        "L": Image.fromarray(grey),
        "LA": Image.merge("LA", (Image.fromarray(grey), Image.new("L", (16, 16), 128))),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full((16, 16), 255, np.uint8)])),
        "P": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
    }
    for mode, image in cases.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        image.save(path)
        decoded = load_grayscale(path)
        assert decoded.dtype == np.uint8 and decoded.shape == (16, 16), mode
        assert np.abs(decoded.astype(int) - grey).max() <= 1, mode
    # 16-bit data is scaled to 8 bits, not clipped: 65535 -> 255, 32896 -> 128.
    Image.fromarray(np.array([[65535, 32896, 0]], np.uint16)).save(tmp_path / "wide.png")
    assert load_grayscale(tmp_path / "wide.png").tolist() == [[255, 128, 0]]


def test_bad_images_are_named_or_skipped_and_listed(tmp_path: Path) -> None:
    study = P.format("WRIST", "positive")
    write_tree(tmp_path, {study: 1}, [study + f"image{i}.png" for i in (1, 2, 3)])
    good = (tmp_path / study / "image1.png").read_bytes()
    (tmp_path / study / "image2.png").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / study / "image3.png").write_bytes(b"")  # empty
    index = read_mura_index(tmp_path, "train")
    with pytest.raises(BadImageError, match=r"image2\.png"):
        MURADataset(index, source_size=32)[1]
    log_file = tmp_path / "run" / "skipped_images.csv"
    dataset = MURADataset(index, source_size=32, on_bad_image="skip", skipped_log=log_file)
    assert dataset[0] is not None and dataset[1] is None and dataset[2] is None
    skipped = pd.read_csv(log_file)
    assert [Path(p).name for p in skipped["path"]] == ["image2.png", "image3.png"]


def test_images_over_the_pixel_limit_are_refused(tmp_path: Path, monkeypatch) -> None:
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImageError, match=r"big\.png: 40x40 pixels is over PIL's limit of 1000"):
        load_grayscale(tmp_path / "big.png")


def test_pad_keeps_the_aspect_ratio() -> None:
    pixels = np.full((20, 40), 200, np.uint8)
    padded = resize_square(pixels, 40, "pad")
    assert padded.shape == (40, 40) and padded[:10].max() == 0 and padded[10:30].min() == 200
    assert resize_square(pixels, 40, "stretch").min() == 200


def test_datamodule_batch_has_documented_keys_shapes_dtypes(mura_root: Path) -> None:
    datamodule = MURADataModule(
        str(mura_root), image_size=32, source_size=64, batch_size=4, num_workers=0
    )
    datamodule.setup("fit")
    sent = next(iter(datamodule.train_dataloader()))  # what crosses from the workers: uint8 grey
    assert sent["image"].shape == (4, 1, 64, 64) and sent["image"].dtype == torch.uint8
    batch = datamodule.on_after_batch_transfer(sent, 0)  # what the training step sees
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1}
    assert batch["image_id"].dtype == torch.int64 and batch["study_id"].dtype == torch.int64
    assert len(batch["body_part"]) == 4 and set(batch["body_part"]) <= set(BODY_PARTS)
    # normalised: the background of a radiograph sits well below zero after ImageNet normalisation
    assert batch["image"].min() < -1.0
    assert len(datamodule.dataset("val")) == len(read_mura_index(mura_root, "valid"))


@pytest.mark.parametrize("augment", [{}, {"hflip": 0.5, "rotate_degrees": 10}])
def test_device_transforms_give_the_documented_dataset_output(mura_root: Path, augment) -> None:
    """uint8 pixels + the drawn augmentation, finished batched by model_input, equal MURADataset's
    documented output made image by image in the workers (same seed, epoch and images)."""
    index = read_mura_index(mura_root, "train").head(12)
    kwargs = {"source_size": 64, "train": True, "augment": augment, "seed": 7}
    documented, pixels = MURADataset(index, **kwargs), MURADataset(index, **kwargs, pixels=True)
    keys = [(i, 3) for i in range(len(index))]
    expected = collate_skipping_bad([documented[k] for k in keys])
    sent = collate_skipping_bad([pixels[k] for k in keys])
    assert sent["image"].dtype == torch.uint8
    assert set(sent) - set(expected) == ({"hflip", "angle"} if augment else set())
    got = model_input(sent, documented.mean.flatten(), documented.std.flatten())
    assert got["image"].shape == expected["image"].shape
    assert torch.allclose(got["image"], expected["image"], atol=1e-4)
    assert torch.equal(got["label"], expected["label"])


def test_patient_disjoint_holdout(mura_root: Path) -> None:
    datamodule = MURADataModule(str(mura_root), val_from_train=0.3, num_workers=0)
    datamodule.setup("fit")
    train, val = datamodule.indexes["train"], datamodule.indexes["val"]
    assert len(val) > 0 and not set(train["patient"]) & set(val["patient"])
    assert len(datamodule.indexes["test"]) == len(read_mura_index(mura_root, "valid"))


def test_cache_matches_decoding_and_rebuilds_on_new_settings(
    mura_root: Path, tmp_path: Path
) -> None:
    paths = read_mura_index(mura_root, "valid")["path"].tolist()
    cache = ImageCache(tmp_path, paths, 48, "stretch")
    assert not cache.ready
    assert cache.build() == [] and cache.ready
    for i in (0, len(paths) - 1):
        pixels, shape = cache.get(i)
        assert torch.equal(pixels, torch.from_numpy(resize_square(load_grayscale(paths[i]), 48)))
        assert shape == load_grayscale(paths[i]).shape
    assert not ImageCache(tmp_path, paths, 48, "pad").ready
    assert not ImageCache(tmp_path, paths[:-1], 48, "stretch").ready
    assert ImageCache(tmp_path, paths, 48, "stretch").ready


def _collect_val_ids(rank: int, world: int, root: str, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    datamodule = MURADataModule(root, batch_size=4, num_workers=0, source_size=32, image_size=32)
    datamodule.setup("validate")
    ids = [i for batch in datamodule.val_dataloader() for i in batch["image_id"].tolist()]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, ids)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_evaluation_sees_every_image_once(mura_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "odd"
    shutil.copytree(mura_root, root)
    valid = root / "MURA-v1.1" / "valid_image_paths.csv"
    rows = valid.read_text().splitlines()
    if len(rows) % 2 == 0:
        valid.write_text("\n".join(rows[:-1]) + "\n")
    total = len(read_mura_index(root, "valid"))
    assert total % 2 == 1
    out = tmp_path / "ids.json"
    port = 29500 + (hash(str(tmp_path)) % 1000)
    mp.spawn(_collect_val_ids, args=(2, str(root), port, str(out)), nprocs=2, join=True)
    per_rank = json.loads(out.read_text())
    seen = sorted(i for ids in per_rank for i in ids)
    assert seen == list(range(total))
    assert all(len(ids) > 0 for ids in per_rank)
