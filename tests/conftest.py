"""Shared fixtures: offline environment, tiny generated MURA trees, Hydra compose, the real CLI."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (timm does, through kalm_lightning.data), which reads
# HF_HUB_OFFLINE once at import: set later, a hub call would still retry for 45-100 s here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

import functools
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

from kalm_lightning.data.synthetic import SyntheticSettings, generate_synthetic_mura

TINY = SyntheticSettings(train_studies=24, valid_studies=9, seed=3, max_size=96)
# timm's own test ResNet (0.37 M parameters, 96 channels, stride 32: the paper's CNN in shape):
# the same code paths as ResNet18 at a thirtieth of its checkpoints (4 MB, not 134 MB: a suite
# that trains some sixty runs fits on a small disk) and a third of its steps. The tests that are
# about the paper's CNNs themselves (shapes, weights, a checkpoint's size) name theirs.
TINY_NET = "test_resnet"
RUNS = Path("outputs") / "synthetic" / TINY_NET  # where a tiny run's directories go
# Small enough for a CPU: the tiny ResNet at 64 px on 128-px sources, a few batches.
TINY_RUN = [
    "data.image_size=64",
    "data.source_size=128",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.synthetic.train_studies=24",
    "data.synthetic.valid_studies=9",
    "data.synthetic.seed=3",
    "data.synthetic.max_size=96",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.log_every_n_steps=1",
    "model.optimizer.lr=3e-4",
    "~callbacks.progress_bar",
    f"backbone.name={TINY_NET}",
]


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary files of every process the tests start go under pytest's own folder, which
    pytest prunes: W&B makes two folders in TMPDIR at import, and a run the tests kill (or a
    rank that ends with `os._exit` after a fault) leaves them behind; a fault the tests provoke
    writes its traceback to a file there when the run has no log file of its own."""
    tmp = tmp_path_factory.mktemp("tmp")
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    return tmp


@pytest.fixture(scope="session")
def mura_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MURA-layout tree shared by the read-only tests."""
    root = tmp_path_factory.mktemp("mura")
    generate_synthetic_mura(root, TINY, workers=1)
    return root


def sklearn_scores(prob: np.ndarray, label: np.ndarray) -> dict:
    """The reference figures: scikit-learn on probabilities, abnormal at >= 0.5."""
    pred = (prob >= 0.5).astype(int)
    return {
        "accuracy": accuracy_score(label, pred),
        "auroc": roc_auc_score(label, prob),
        "kappa": cohen_kappa_score(label, pred),
        "n": len(label),
    }


def run_cli(
    module: str, args: list[str], cwd: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `python -m kalm_lightning.<module> args` the way a user does."""
    return subprocess.run(
        [sys.executable, "-m", f"kalm_lightning.{module}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


REPO = Path(__file__).resolve().parents[1]


def run_script(
    script: str, args: list[str], cwd: Path, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts (`experiments/...`) as `make` does."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def run_module(
    module: str, args: list[str], cwd: Path, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run one of the repository's experiment modules (`python -m experiments.X`) as `make`
    does from the repository root, here from anywhere (the root on PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path},
    )


def load_script(script: str):
    """A repository script imported as a module (its constants), without running its main."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def running_trainings(work: Path) -> str:
    """Training processes still alive that run in work (a DDP rank left behind): their pids."""
    found = subprocess.run(["pgrep", "-f", "kalm_lightning.train"], capture_output=True, text=True)
    alive = []
    for pid in found.stdout.split():
        try:
            if Path(f"/proc/{pid}/cwd").resolve() == Path(work).resolve():
                alive.append(pid)
        except OSError:
            continue  # ended meanwhile
    return " ".join(alive)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def shared(
    factory: pytest.TempPathFactory, name: str, build: Callable[[Path], dict[str, str]]
) -> dict[str, str]:
    """What `build(folder)` makes, made once per test session however many pytest-xdist workers
    run it: the first worker to ask builds it under a file lock, the others wait and read what it
    recorded (plain strings: paths, text). A build that fails is tried again by the next asker."""
    root = factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the workers' common
    folder, record = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(record) + ".lock"):
        if not record.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            record.write_text(json.dumps({k: str(v) for k, v in build(folder).items()}))
        return json.loads(record.read_text())


def paths(built: dict[str, str]) -> dict[str, Path]:
    return {key: Path(value) for key, value in built.items()}


def train_both_stages(work: Path) -> dict[str, Path]:
    check(run_cli("train", ["stage=1", "logger=[csv,wandb]", *TINY_RUN], work))
    stage2 = [
        "stage=2",
        "logger=[csv,tensorboard,mlflow]",
        *TINY_RUN,
        "trainer.limit_train_batches=4",
    ]
    check(run_cli("train", stage2, work))
    stage1 = next((work / RUNS / "stage1").iterdir())
    stage2 = next((work / RUNS / "stage2").iterdir())
    return {"work": work, "stage1": stage1, "stage2": stage2}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stage 1, then stage 2 with stage.global_ckpt=auto, through the real command line, once per
    session (the tiny models resume, predict, export, evaluate, the overlays and the server read);
    each logs to CSV and to more loggers (W&B offline; TensorBoard and MLflow) read back."""
    return paths(shared(tmp_path_factory, "train", train_both_stages))


def train_multicrop(work: Path, stage1_ckpt: str, localizer: str = "multicrop") -> dict[str, Path]:
    args = [
        "stage=2",
        f"stage.global_ckpt={stage1_ckpt}",
        f"localizer={localizer}",
        "localizer.k=2",
        *TINY_RUN,
        "trainer.limit_train_batches=4",
    ]
    check(run_cli("train", args, work))
    stage2 = next((work / RUNS / "stage2").iterdir())
    return {"work": work, "stage2": stage2}


@pytest.fixture(scope="session")
def multicrop(
    trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Stage 2 with `localizer=multicrop` (k = 2) on the shared stage-1 run, through the real
    command line, once per session."""
    stage1 = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    return paths(shared(tmp_path_factory, "multicrop", lambda work: train_multicrop(work, stage1)))


@pytest.fixture(scope="session")
def sampling(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stage 2 with `localizer=sampling` (k = 2) on the shared stage-1 run (the slow tier)."""
    stage1 = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    train = functools.partial(train_multicrop, stage1_ckpt=stage1, localizer="sampling")
    return paths(shared(tmp_path_factory, "sampling", train))


def table1_variant(work: Path) -> dict[str, Path]:
    sweep = work / "table1" / "variant"
    args = [
        "-m",
        "experiment=paper",
        "data=synthetic",
        "backbone=resnet18",
        "backbone.pretrained=false",
        "localizer=navigator",
        "localizer.grid=3",
        "localizer.warmup_epochs=0",  # one epoch: the teacher teaches from the first step
        *TINY_RUN,
        "evaluate.bootstrap=5",
        f"hydra.sweep.dir={sweep}",
        "paths.data_root=generated",
    ]
    check(run_cli("train", args, work))
    return {"sweep": sweep}


@pytest.fixture(scope="session")
def navigator_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`experiment=paper` with `localizer=navigator` as a multirun through the real command line,
    as `make table1` adds a row (tiny sizes, no weights to fetch): the sweep directory."""
    return paths(shared(tmp_path_factory, "table1", table1_variant))["sweep"]


def dicom_dataset(path: Path, rows: int, columns: int, bits: int, photometric: str):
    """A single-frame DX DICOM dataset (unsigned, one sample per pixel) to fill and save_as."""
    import pydicom

    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.Rows, ds.Columns = "DX", rows, columns
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    return ds
