"""Faults through the real command line: files that are not what they claim must not run code,
runs that are stopped (a signal, SIGKILL, a SLURM requeue) go on to the same end."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import RUNS, TINY, TINY_RUN, check, paths, run_cli, running_trainings, shared

from kalm_lightning.config import compose_config
from kalm_lightning.data.synthetic import generate_synthetic_mura
from kalm_lightning.errors import UserError
from kalm_lightning.runs import run_dir
from kalm_lightning.tasks.train import find_stage1_checkpoint


class RunsCode:
    """A pickle that calls os.system when loaded: what a malicious .ckpt holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"stage": 2}, "x": RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("evaluate", ["ckpt_path={ckpt}", *TINY_RUN[:3]]),
        pytest.param("predict", ["ckpt_path={ckpt}", "images={tmp}"], marks=pytest.mark.slow),
        pytest.param(
            "train", ["stage=2", "stage.global_ckpt={ckpt}", *TINY_RUN], marks=pytest.mark.slow
        ),
        pytest.param("train", ["stage=1", "ckpt_path={ckpt}", *TINY_RUN], marks=pytest.mark.slow),
    ],
    ids=["evaluate", "predict", "stage2-global-ckpt", "resume"],
)
def test_a_checkpoint_that_runs_code_is_refused_before_it_runs(
    tmp_path: Path, evil_checkpoint: tuple[Path, Path], module: str, args: list[str]
) -> None:
    ckpt, marker = evil_checkpoint
    filled = [a.format(ckpt=ckpt, tmp=tmp_path) for a in args]
    result = run_cli(module, filled, tmp_path)
    assert not marker.exists(), "the checkpoint's code ran"
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"kalm-{module}: checkpoint {ckpt} is refused: it asks to load ")
    assert "posix.system" in line or "os.system" in line
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_naming_the_step_and_the_images(tmp_path: Path) -> None:
    args = ["stage=1", "logger=[csv,wandb]", *TINY_RUN, "model.optimizer.lr=1e30"]
    result = run_cli("train", args, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("kalm-train: training loss is nan at step 1 (epoch 0); the batch held ")
    assert "MURA-v1.1/train/" in line and "Traceback" not in result.stderr
    # The W&B run was finished as failed (exit code 1), not left open for atexit to close.
    (log,) = tmp_path.glob("outputs/*/*/stage1/*/wandb/offline-run-*/logs/debug.log")
    assert "got exitcode: 1" in log.read_text()


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    first = run_dir(tmp_path, None)
    second = run_dir(tmp_path, None)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name.startswith(first.name)


def test_auto_never_picks_a_half_written_stage1_result(tmp_path: Path) -> None:
    """A result.json being written by another process is skipped, not read half-way."""
    run = tmp_path / RUNS / "stage1" / "x"
    run.mkdir(parents=True)
    (run / "result.json").write_text('{"stage": 1, "backbone": "resn')  # cut off mid-write
    cfg = compose_config("train", ["stage=2", f"paths.output_root={tmp_path / 'outputs'}"])
    with pytest.raises(UserError, match="no finished stage-1 run"):
        find_stage1_checkpoint(cfg)


def final_state(work: Path) -> tuple[dict, pd.DataFrame]:
    run = next((work / RUNS / "stage1").iterdir())
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    logs = pd.concat(pd.read_csv(f) for f in sorted(run.glob("csv/version_*/metrics.csv")))
    return state, logs.dropna(subset=["val/image_acc"]).set_index("epoch")["val/image_acc"]


# Two epochs of eight batches, with augmentation: where a run stops matters.
RESUMABLE = [
    *(a for a in TINY_RUN if not a.startswith(("trainer.max_epochs", "trainer.limit_train"))),
    "stage=1",
    "trainer.max_epochs=2",
    "data.augment.rotate_degrees=10",
    "data.augment.hflip=0.5",
]


def train_straight(work: Path, *extra: str) -> dict[str, Path]:
    check(run_cli("train", [*RESUMABLE, *extra], work))
    return {"work": work}


@pytest.fixture(scope="session")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of RESUMABLE's run, trained once without a stop."""
    return paths(shared(tmp_path_factory, "straight", train_straight))["work"]


@pytest.fixture(scope="session")
def uninterrupted(straight: Path) -> tuple[dict, pd.Series]:
    return final_state(straight)


def checkpoint_bytes(work: Path) -> int:
    return next((work / RUNS / "stage1").iterdir()).joinpath("checkpoints/last.ckpt").stat().st_size


def interrupt_in_epoch_1(
    work: Path, signum: int, env: dict | None = None, extra: tuple[str, ...] = ()
) -> str:
    """Start the run, send signum as soon as epoch 0's checkpoint exists (early in epoch 1).
    The run gets a session of its own: if it does not stop, it and its DDP ranks are killed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kalm_lightning.train", *RESUMABLE, *extra],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(work.glob("outputs/*/*/stage1/*/checkpoints/last.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)  # one batch and a checkpoint, at most
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == (-signum if signum == signal.SIGKILL else 128 + signum), stderr
    return stderr.strip().splitlines()[-1] if stderr.strip() else ""


def assert_same_run(resumed: tuple[dict, pd.Series], straight: tuple[dict, pd.Series]) -> None:
    (a, a_logs), (b, b_logs) = straight, resumed
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert a_logs.to_dict() == b_logs.to_dict() and len(a_logs) == 2


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resume_ends_as_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: tuple[dict, pd.Series]
) -> None:
    """Preemption's warning in the middle of epoch 1 (the last): a checkpoint at the batch
    boundary, one line, exit 143; ckpt_path=last then ends with the same weights and the same
    logged figures, bit for bit. (SIGUSR1 takes the same path: the SLURM test below.)"""
    line = interrupt_in_epoch_1(tmp_path, signal.SIGTERM)
    assert re.fullmatch(
        r"kalm-train: stopped by SIGTERM in epoch 1 after batch [1-7] of 8; saved \S+/checkpoints/"
        r"last\.ckpt; continue with ckpt_path=last",
        line,
    ), line
    assert not list(tmp_path.rglob("*.partial"))
    check(run_cli("train", [*RESUMABLE, "ckpt_path=last"], tmp_path))
    assert_same_run(final_state(tmp_path), uninterrupted)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_as_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: tuple[dict, pd.Series]
) -> None:
    """No warning at all: the run resumes from the last epoch's end, in the same directory, and
    still ends the same; what was logged before the kill stays beside what is logged after."""
    interrupt_in_epoch_1(tmp_path, signal.SIGKILL)
    check(run_cli("train", [*RESUMABLE, "ckpt_path=last"], tmp_path))
    assert_same_run(final_state(tmp_path), uninterrupted)
    (run,) = (tmp_path / RUNS / "stage1").iterdir()
    assert json.loads((run / "result.json").read_text())["epochs"] == 2
    validated = [
        set(
            pd.read_csv(run / f"csv/version_{v}/metrics.csv").dropna(subset=["val/image_acc"])[
                "epoch"
            ]
        )
        for v in (0, 1)
    ]
    assert validated == [{0}, {1}]


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_batch_on_sigterm_and_the_run_resumes(tmp_path: Path) -> None:
    """SIGTERM to rank 0 of two DDP processes (gloo): the stop is reduced across ranks, so both
    save and stop at the same batch (a rank left training would wait forever in its next
    all-reduce), one line, exit 143, no rank left running; ckpt_path=last finishes the run."""
    line = interrupt_in_epoch_1(tmp_path, signal.SIGTERM, extra=("hardware=ddp_cpu",))
    assert re.fullmatch(
        r"kalm-train: stopped by SIGTERM in epoch 1 after batch (\d+) of (\d+); saved \S+/"
        r"checkpoints/last\.ckpt; continue with ckpt_path=last",
        line,
    ), line
    stopped_at, per_epoch = map(int, re.findall(r"batch (\d+) of (\d+)", line)[0])
    assert running_trainings(tmp_path) == ""
    (run,) = (tmp_path / RUNS / "stage1").iterdir()
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == per_epoch + stopped_at  # every rank's step, not one rank's
    check(run_cli("train", [*RESUMABLE, "hardware=ddp_cpu", "ckpt_path=last"], tmp_path))
    finished = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert finished["epoch"] == 1 and finished["global_step"] == 2 * per_epoch


@pytest.mark.slow
def test_slurm_requeues_on_sigusr1_and_the_requeued_job_continues_the_run(
    tmp_path: Path, uninterrupted: tuple[dict, pd.Series]
) -> None:
    """Inside a SLURM batch job, SIGUSR1 also runs `scontrol requeue <job>` (here a stand-in
    that records its arguments); the requeued job (SLURM_RESTART_COUNT=1) is the same command
    with no ckpt_path, and it continues the interrupted run to the same end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol_args"}\n')
    scontrol.chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "kalm",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    work = tmp_path / "work"
    work.mkdir()
    line = interrupt_in_epoch_1(work, signal.SIGUSR1, slurm)
    assert re.fullmatch(
        r"kalm-train: stopped by SIGUSR1 in epoch 1 after batch [1-7] of 8; saved \S+/checkpoints/"
        r"last\.ckpt; SLURM job 4242 requeued; continue with ckpt_path=last",
        line,
    ), line
    assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "4242"]
    requeued = {**os.environ, **slurm, "SLURM_RESTART_COUNT": "1", "PYTHONWARNINGS": "ignore"}
    check(
        subprocess.run(
            [sys.executable, "-m", "kalm_lightning.train", *RESUMABLE],
            cwd=work,
            capture_output=True,
            text=True,
            env=requeued,
            timeout=600,
        )
    )
    assert len(list((work / RUNS / "stage1").iterdir())) == 1
    assert_same_run(final_state(work), uninterrupted)


@pytest.fixture(scope="module")
def mura_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    generate_synthetic_mura(root, TINY, workers=1)
    return root


def replace_line(csv_path: Path, row: int, text: str) -> str:
    """Rewrite one row of a header-less MURA CSV (kept with its \\r\\n endings); returns the old row."""
    lines = csv_path.read_bytes().decode().splitlines(keepends=True)
    old = lines[row].rstrip("\r\n")
    lines[row] = text + lines[row][len(old) :]
    csv_path.write_bytes("".join(lines).encode())
    return old


def valid_image(root: Path, row: int = 0) -> Path:
    csv_path = root / "MURA-v1.1/valid_image_paths.csv"
    return root / csv_path.read_text().splitlines()[row].strip()


def oversized(path: Path) -> None:
    """Keep the PNG, but make its header claim 20000 x 20000 pixels (CRC fixed, so PIL believes it)."""
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20000, 20000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def break_tree(root: Path, case: str) -> str:
    """Damage a copy of the tree as the case says; returns the file the message must name."""
    mura = root / "MURA-v1.1"
    if case == "label-contradiction":
        studies = mura / "train_labeled_studies.csv"
        rows = studies.read_text().splitlines()
        row = next(i for i, r in enumerate(rows) if "_positive/," in r)
        replace_line(studies, row, rows[row].rsplit(",", 1)[0] + ",0")
        return f"{studies} row {row + 1}: label contradicts the study folder name"
    if case == "missing-image":
        image = valid_image(root)
        image.unlink()
        return f"1 image(s) listed in {mura / 'valid_image_paths.csv'} are missing on disk"
    if case == "escaping-path":
        replace_line(mura / "valid_image_paths.csv", 2, "MURA-v1.1/valid/../../../etc/passwd")
        return f"{mura / 'valid_image_paths.csv'} row 3: path escapes the dataset root"
    image = valid_image(root, 1)
    if case == "corrupt-image":
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif case == "truncated-image":
        image.write_bytes(image.read_bytes()[:200])
    elif case == "empty-image":
        image.write_bytes(b"")
    elif case == "oversized-image":
        oversized(image)
    return str(image)


QUICK_BAD_DATA = ("missing-image", "corrupt-image")  # in `make test`; the others in test-slow
BAD_DATA = {  # case: what the one line says after naming the file
    "label-contradiction": "",
    "missing-image": ": MURA-v1.1/valid/",
    "escaping-path": ": 'MURA-v1.1/valid/../../../etc/passwd'",
    "corrupt-image": ": cannot decode image",
    "truncated-image": ": cannot decode image",
    "empty-image": ": the file is empty (0 bytes)",
    "oversized-image": ": more than twice PIL's limit of 89478485 pixels, refused as a possible "
    "decompression bomb; downscale the image or raise PIL.Image.MAX_IMAGE_PIXELS",
}


@pytest.mark.parametrize(
    "case",
    [c if c in QUICK_BAD_DATA else pytest.param(c, marks=pytest.mark.slow) for c in BAD_DATA],
)
def test_bad_data_through_the_command_line_gives_one_line(
    tmp_path: Path, mura_tree: Path, case: str
) -> None:
    """Each damaged tree: one line naming the file and the fix, exit 2, no traceback, nothing
    written as a finished run. Images are read by DataLoader workers, as in real runs."""
    root = tmp_path / "mura"
    shutil.copytree(mura_tree, root)
    named = break_tree(root, case)
    args = ["stage=1", "data=mura", f"data.root={root}", "data.num_workers=2", *TINY_RUN[:3]]
    args += ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "~callbacks.progress_bar"]
    result = run_cli("train", args, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"kalm-train: {named}{BAD_DATA[case]}"), line
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.slow
def test_bad_data_can_be_skipped_and_is_listed(tmp_path: Path, mura_tree: Path) -> None:
    """data.on_missing=skip and data.on_bad_image=skip: the run finishes; the missing image is
    named in the log and the corrupt one listed in the run's skipped_images.csv."""
    root = tmp_path / "mura"
    shutil.copytree(mura_tree, root)
    break_tree(root, "missing-image")
    corrupt = break_tree(root, "corrupt-image")
    args = ["stage=1", "data=mura", f"data.root={root}", "data.num_workers=2", *TINY_RUN[:3]]
    args += ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "~callbacks.progress_bar"]
    args += ["data.on_missing=skip", "data.on_bad_image=skip"]
    result = check(run_cli("train", args, tmp_path))
    assert "1 image(s) listed in" in result.stdout + result.stderr
    skipped = pd.read_csv(next(tmp_path.rglob("skipped_images.csv")))
    assert skipped["path"].tolist() == [corrupt]
    assert len(list(tmp_path.rglob("result.json"))) == 1


# --- Faults of the machine: a full disk, a dead DDP rank, a step out of memory -----------------

WITH_LOG = r" \(full traceback in (\S+)/train\.log\)"


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int):
    """A tmpfs of that size mounted on folder (root only); yields a function that resizes it."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        yield None
        return
    resize = lambda size: subprocess.run(  # noqa: E731
        ["mount", "-o", f"remount,size={size}m", str(folder)], check=True
    )
    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_gives_one_line_and_resumes_after_freeing(
    tmp_path: Path, straight: Path, uninterrupted: tuple[dict, pd.Series]
) -> None:
    """The run's folder on a file system of 1.5 checkpoints (and a MiB for the logs): epoch 0's
    checkpoint fits, epoch 1's does not. One line naming the file, the epoch, the intact
    checkpoint and how to go on; the traceback in train.log; no partial file. After the space is
    freed, ckpt_path=last ends as the uninterrupted run, bit for bit. Where no file system can be
    mounted (not root), a file size limit (RLIMIT_FSIZE) of half a checkpoint refuses the first
    checkpoint the same way."""
    size = checkpoint_bytes(straight)
    with small_disk(tmp_path / "outputs", math.ceil(1.5 * size / 2**20) + 1) as resize:
        if resize is None:
            cap = size // 2 // 2**20 * 2**20
            limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))  # noqa: E731
            result = subprocess.run(
                [sys.executable, "-m", "kalm_lightning.train", *RESUMABLE],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                preexec_fn=limit,
            )
            expected = (
                rf"kalm-train: the file size limit \(ulimit -f\) of {cap >> 20} MiB is reached while "
                r"writing (\S+)/checkpoints/best-epoch00\.ckpt \(\w+, epoch 0, after batch 8 of 8\); "
                r"nothing was lost: no checkpoint of this run was written yet \(ckpt_path=last "
                r"starts it afresh\); raise the limit \(ulimit -f unlimited\), then continue with "
                r"ckpt_path=last" + WITH_LOG
            )
        else:
            result = run_cli("train", RESUMABLE, tmp_path)
            expected = (
                r"kalm-train: no space left on the device \(\d+ MiB free\) while writing (\S+)/"
                r"checkpoints/(?:best-epoch01|last)\.ckpt \(\w+, epoch 1, after batch 8 of 8\); "
                r"nothing was lost: \1/checkpoints/last\.ckpt \(epoch 0, step 8\) is the last whole "
                r"checkpoint; free space on the disk of \1/checkpoints, then continue with "
                r"ckpt_path=last \(full traceback in \1/train\.log\)"
            )
        assert result.returncode == 1, result.stderr[-3000:]
        line = result.stderr.strip().splitlines()[-1]
        match = re.fullmatch(expected, line)
        assert match, line
        assert "Traceback" not in result.stderr
        assert "Traceback" in Path(match.group(1), "train.log").read_text()
        assert not list(tmp_path.rglob("*.partial"))
        if resize is not None:
            resize(math.ceil(4 * size / 2**20) + 8)  # space freed
        check(run_cli("train", [*RESUMABLE, "ckpt_path=last"], tmp_path))
        assert_same_run(final_state(tmp_path), uninterrupted)


def test_a_read_only_output_folder_gives_one_line_before_anything_loads(tmp_path: Path) -> None:
    with small_disk(tmp_path / "outputs", 8) as resize:
        if resize is None:
            pytest.skip("mounting a read-only file system needs root")
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "outputs")], check=True)
        result = run_cli("train", RESUMABLE, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kalm-train: cannot create the run directory under {RUNS / 'stage1'}: "
        "the file system is read-only; choose a writable paths.output_root"
    ]


@pytest.fixture(scope="session")
def uninterrupted_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, pd.Series]:
    built = shared(
        tmp_path_factory, "straight_ddp", lambda w: train_straight(w, "hardware=ddp_cpu")
    )
    return final_state(paths(built)["work"])


def rank_process(work: Path, rank: int) -> int:
    """The pid of the training process of that DDP rank (LOCAL_RANK in its environment)."""
    for pid in map(int, running_trainings(work).split()):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"LOCAL_RANK={rank}".encode() in environ:
                return pid
    raise AssertionError(f"no rank {rank} running under {work}")


DEAD_PEER = (
    r"kalm-train: another DDP rank stopped answering \((training|validating), epoch [01], after batch "
    # rank 0 saw it at a collective (gloo names the peer on some runs: "Connection closed by
    # peer [127.0.0.1]:426."), or reached none within the grace and its observer reports it
    r"\d of 4; (rank 0 of 2 saw: [^;]*by peer[^;]*\.|rank 1 of 2 was killed by SIGKILL, and "
    r"rank 0 reached no collective within 30 s)\); this rank stopped too; ((\S+)/checkpoints/"
    r"last\.ckpt \(epoch [01], step [48]\) is the last whole checkpoint|no checkpoint of this run "
    r"was written yet \(ckpt_path=last starts it afresh\)); continue with ckpt_path=last" + WITH_LOG
)


def kill_rank_1(
    work: Path, when: str, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str, float]:
    """Start a DDP run and kill -9 its rank 1: early in epoch 1 (`step`), or with rank 0 held
    (SIGSTOP) past Lightning's 5 s poll of its children, at epoch 0's end (`epoch_end`: its
    last.ckpt just written) or while it writes a checkpoint (`checkpoint`: a .partial file
    there), so that rank 0 reaches its next collective only after the poll."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kalm_lightning.train", *RESUMABLE, "hardware=ddp_cpu", *extra],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        start_new_session=True,
    )
    folder = "outputs/*/*/stage1/*/checkpoints/"
    pattern = folder + (".*.partial" if when == "checkpoint" else "last.ckpt")
    try:
        deadline = time.monotonic() + 300
        while not list(work.glob(pattern)):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.002)
        rank0 = process.pid
        if when != "step":
            os.kill(rank0, signal.SIGSTOP)
        os.kill(rank_process(work, 1), signal.SIGKILL)
        if when != "step":
            time.sleep(7)  # Lightning's observer would have polled, and killed rank 0 unheard
            os.kill(rank0, signal.SIGCONT)
        killed = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        stopped_after = time.monotonic() - killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process, stderr, stopped_after


@pytest.mark.slow
def test_a_dead_ddp_rank_ends_the_other_with_one_line_and_the_run_resumes(
    tmp_path: Path, uninterrupted_ddp: tuple[dict, pd.Series]
) -> None:
    """kill -9 of rank 1 early in epoch 1: rank 0 stops within seconds (gloo sees the closed
    connection at its next all-reduce) with one line naming the epoch and the last whole
    checkpoint; ckpt_path=last then ends with the uninterrupted DDP run's weights."""
    process, stderr, stopped_after = kill_rank_1(tmp_path, "step")
    assert process.returncode == 1, stderr[-3000:]
    assert (
        stopped_after < 30
    )  # docs/faults.md: at once for a dead rank, hardware.timeout_s for a silent one
    line = stderr.strip().splitlines()[-1]
    assert re.fullmatch(DEAD_PEER, line), line
    assert "Traceback" not in stderr
    assert running_trainings(tmp_path) == ""
    check(run_cli("train", [*RESUMABLE, "hardware=ddp_cpu", "ckpt_path=last"], tmp_path))
    (weights, logs), (straight, straight_logs) = final_state(tmp_path), uninterrupted_ddp
    for key, value in straight.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert len(logs) == len(straight_logs) == 2


@pytest.mark.slow
@pytest.mark.parametrize("when", ["epoch_end", "checkpoint"])
def test_a_rank_that_dies_while_rank_0_is_between_collectives_is_still_reported(
    tmp_path: Path, when: str
) -> None:
    """Rank 0 held past the poll of its children (the race that once ended it without a word:
    Lightning's observer SIGKILLs it 5 s after a child dies): it still reports the line."""
    process, stderr, _ = kill_rank_1(tmp_path, when)
    assert process.returncode == 1, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert re.fullmatch(DEAD_PEER, line), line
    assert running_trainings(tmp_path) == ""


def test_the_observer_reports_a_dead_rank_when_rank_0_reaches_no_collective(
    tmp_path: Path,
) -> None:
    """The observer's own report: a child rank killed, and this process busy elsewhere (asleep)
    past the grace: one line and exit code 1, the other children ended."""
    script = (
        "import subprocess, sys, time\n"
        "from kalm_lightning.training.launcher import PeerObserver\n"
        "children = [subprocess.Popen(['sleep', '60']) for _ in range(2)]\n"
        "print(children[1].pid, flush=True)\n"
        "PeerObserver(children, None, grace_s=1.0).start()\n"
        "children[0].kill()\n"
        "time.sleep(60)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "kalm-train: another DDP rank stopped answering (training; rank 1 of 3 was killed by "
            "SIGKILL, and rank 0 reached no collective within 1 s); this rank stopped too; "
            "continue with ckpt_path=last (full traceback in "
        )
    )
    other = Path(f"/proc/{result.stdout.split()[0]}/stat")  # ended: gone, or a zombie till reaped
    assert not other.exists() or other.read_text().split()[2] == "Z"


@pytest.mark.slow
def test_out_of_memory_in_a_step_names_the_batch_size_and_the_setting_to_lower(
    tmp_path: Path,
) -> None:
    """The real allocator's error: the address space capped 768 MB above what torch, Lightning
    and timm map when imported, then a batch of 8 at 512 px (RLIMIT_AS, through the CLI's main)."""
    script = (
        "import resource, runpy, sys\n"
        "import torch, lightning, timm\n"
        "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 768 * 2**20, resource.RLIM_INFINITY))\n"
        "sys.argv = ['kalm-train', *sys.argv[1:]]\n"
        "runpy.run_module('kalm_lightning.train', run_name='__main__')\n"
    )
    sizes = ["data.image_size=512", "data.source_size=512", "stage=1"]
    # ResNet18, whose step at 512 px needs more than the cap (timm's test ResNet's does not)
    cut = ("data.image_size", "data.source_size", "backbone.name")
    args = [a for a in TINY_RUN if not a.startswith(cut)]
    result = subprocess.run(
        [sys.executable, "-c", script, *args, *sizes],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"kalm-train: out of memory on cpu \(training, epoch 0, after batch \d of 3\) with "
        r"data.batch_size=8, data.image_size=512, data.source_size=512, trainer.precision=32-true; "
        r"lower data.batch_size \(e.g. data.batch_size=4\) or the sizes, or on a GPU use "
        r"trainer.precision=bf16-mixed; .+; continue with ckpt_path=last" + WITH_LOG,
        line,
    ), line
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("what", ["cache", "predictions"])
def test_a_full_disk_outside_checkpoints_gives_one_line(
    tmp_path: Path, what: str, mura_root: Path
) -> None:
    """The decode cache (reserved whole before it is written) and predict's output on a 1 MB
    file system: one line naming the file, the traceback in a log file, no half-made cache."""
    with small_disk(tmp_path / "small", 1) as resize:
        if resize is None:
            pytest.skip("mounting a small file system needs root")
        if what == "cache":
            args = [*TINY_RUN, "stage=1", "data.cache=true", f"data.cache_dir={tmp_path / 'small'}"]
            result = run_cli("train", args, tmp_path)
        else:
            ballast = tmp_path / "small" / "ballast"
            ballast.write_bytes(b"\0" * (1024 * 1024 - 8192))  # what is left holds no CSV
            ckpt = tmp_path / "model.ckpt"
            check(run_cli("train", [*TINY_RUN, "stage=1"], tmp_path))
            shutil.copy(next(tmp_path.glob("outputs/*/*/stage1/*/checkpoints/last.ckpt")), ckpt)
            args = [
                f"ckpt_path={ckpt}",
                f"images={mura_root}",
                f"output={tmp_path / 'small' / 'p'}",
            ]
            result = run_cli("predict", [*args, "num_workers=0"], tmp_path)
        # a split's cache that fitted is whole (its .npz written last); none is half-made
        leftovers = [
            p.name
            for p in (tmp_path / "small").rglob("*.u8")
            if not p.with_suffix(".npz").is_file()
        ]
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"kalm-(train|predict): no space left on the device while writing \S+( \([^)]*\))?; .+ \(full "
        r"traceback in \S+\.log\)",
        line,
    ), line
    assert "Traceback" not in result.stderr and not leftovers


def test_a_write_killed_halfway_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """The project's one writer (`runs.write_atomic`, used for records, metrics.json, the model
    card, the export's JSON, ...): a process SIGKILLed while it writes 256 MiB leaves the file as
    it was, and the next write replaces it whole."""
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}\n')
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kalm_lightning.runs import write_atomic\n"
        "write_atomic(Path(sys.argv[1]), b'x' * 2**28)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)])
    partial = tmp_path / ".metrics.json.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 0):
        assert writer.poll() is None and time.monotonic() < deadline, "the write ended first"
        time.sleep(0.001)
    writer.kill()
    writer.wait()
    assert target.read_text() == '{"old": true}\n'
    from kalm_lightning.runs import write_atomic

    write_atomic(target, '{"new": true}\n')
    assert target.read_text() == '{"new": true}\n' and not partial.exists()


def test_a_write_the_disk_refuses_leaves_the_old_file_and_no_debris(tmp_path: Path) -> None:
    """The file size limit (ulimit -f) reached halfway: an OSError, the old file intact, the
    partial file removed."""
    target = tmp_path / "model_card.json"
    target.write_text("old\n")
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))\n"
        "from kalm_lightning.runs import write_atomic\n"
        "try:\n"
        "    write_atomic(Path(sys.argv[1]), 'y' * 2**22)\n"
        "except OSError as error:\n"
        "    print(error.errno)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, text=True
    )
    assert result.stdout.strip() == "27"  # EFBIG
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_card.json"]
