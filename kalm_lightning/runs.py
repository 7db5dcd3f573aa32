"""The run directory, one owner: its layout, claiming one, resuming the newest, and reading it back.

A training run directory (`outputs/<data>/<backbone>/stage<N>/<timestamp>/`) holds:

    config.yaml            the resolved config the run trained with
    result.json            written last, atomically, when the stage finished (not when stopped)
    train.log              Hydra's log of the job (full tracebacks of failures too)
    holdout.csv            with data.val_from_train > 0: the held-out images that validated
                           (the patients every checkpoint records; `evaluate split=holdout`)
    checkpoints/           best-epochNN.ckpt (the selected epoch) and last.ckpt (the newest epoch,
                           or a preempted batch): what `ckpt_path=last` continues from
    csv/version_N/metrics.csv   the CSV logger's rows; a resumed run starts version_N+1
    evaluate/              a pipeline's evaluation (metrics.json, figures)
    .hydra/                Hydra's own record: config, overrides

A pipeline (`experiment=demo|paper`) puts one such directory per stage under `stage1/` and
`stage2/`, and its evaluation under `evaluate/`. Training, summaries, resuming, the localizer study
and the Table 1 aggregation all find these files through this module. It imports neither torch nor
Lightning: the command layer claims directories before any of them loads.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kalm_lightning.errors import UserError

CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"
HOLDOUT_FILE = "holdout.csv"  # the images of the hold-out of train a run validated on
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
CSV_LOGS = "csv"  # the CSV logger's name (conf/logger/csv.yaml)
EVALUATION = "evaluate"
METRICS_FILE = "metrics.json"  # an evaluation's figures (evaluation/report.py writes it)
HYDRA = ".hydra"
STAGE_DIRS = ("stage1", "stage2")  # a pipeline's stages, in order


# What refused a write, by errno (training/faults.py names the fix).
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file size limit (ulimit -f) is reached",
    errno.EROFS: "the file system is read-only",
    errno.ENOENT: "the folder vanished",
    errno.EACCES: "permission to write is denied",
}


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under beside path, then renamed to it: a reader (or
    a kill) never sees half a file."""
    return path.with_name(f".{path.name}.partial")


def write_atomic(path: Path, data: str | bytes) -> None:
    """The project's one writer of a file that must be whole: the data goes to path's partial
    name, is flushed to the disk (fsync), then renamed over path, and the rename itself is made
    durable (fsync of the folder). A kill or a power cut at any point leaves the old file or the
    new one, never half of either."""
    path = Path(path)
    partial = partial_path(path)
    try:
        with open(partial, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Name folder in an OSError that names no file (pandas and PIL writing through a handle
    that a full disk refuses at flush): the one-line report then says where."""
    try:
        yield
    except OSError as error:
        if error.filename or error.errno not in DISK_ERRNOS:
            raise
        raise OSError(error.errno, error.strerror, str(folder)) from error


@dataclass(frozen=True)
class Run:
    """One run directory and the files it holds."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def result_file(self) -> Path:
        return self.path / RESULT_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        """The checkpoint `ckpt_path=last` continues from: every epoch's end, or a preempted batch."""
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def evaluation(self) -> Path:
        return self.path / EVALUATION

    def stage(self, number: int) -> Run:
        """A pipeline's stage-1 or stage-2 run directory."""
        return Run(self.path / STAGE_DIRS[number - 1])

    def overrides(self) -> list[str]:
        """The command line's overrides, as Hydra recorded them ([] when not run by Hydra)."""
        from omegaconf import OmegaConf

        path = self.path / HYDRA / "overrides.yaml"
        return list(OmegaConf.load(path)) if path.is_file() else []

    def read_result(self) -> dict[str, Any] | None:
        """result.json, or None while the stage has not finished (or the file is unreadable)."""
        try:
            return json.loads(self.result_file.read_text())
        except (OSError, ValueError):
            return None

    def write_result(self, result: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.result_file, json.dumps(result, indent=2) + "\n")

    def metrics_logs(self) -> list[Path]:
        """The CSV logger's files, oldest version first (a resumed run adds one)."""
        found = self.path.glob(f"{CSV_LOGS}/version_*/metrics.csv")
        return sorted(found, key=lambda p: int(p.parent.name.removeprefix("version_")))

    def read_logs(self):
        """Every row the CSV logger wrote for this run, across resumed versions (a DataFrame)."""
        import pandas as pd

        logs = self.metrics_logs()
        if not logs:
            raise FileNotFoundError(f"{self.path} holds no {CSV_LOGS}/version_*/metrics.csv")
        return pd.concat([pd.read_csv(p) for p in logs], ignore_index=True)


def claim_dir(parent: Path, name: str) -> Path:
    """Create parent/name, or name_2, name_3 ... when another run took it: two runs started in the
    same second never share a directory (mkdir is atomic). A disk that refuses gets one line."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            candidate = parent / (name if n == 1 else f"{name}_{n}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as error:
        reason = DISK_ERRNOS.get(error.errno, error.strerror)
        raise UserError(
            f"cannot create the run directory under {parent}: {reason}; choose a writable "
            "paths.output_root"
        ) from error
    raise RuntimeError(f"no free run directory named {name}* under {parent}")


def requeued() -> bool:
    """True in a SLURM job that was requeued: it continues its run as if ckpt_path=last."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resumes_last(ckpt_path: str | None) -> bool:
    """Whether a run continues the newest run directory's last.ckpt (ckpt_path=last, or a
    requeued SLURM job that names no checkpoint)."""
    return ckpt_path == "last" or (ckpt_path in (None, "") and requeued())


def newest_resumable(parent: Path) -> Path | None:
    """The newest run directory under parent whose run (or pipeline stage) has a last.ckpt."""
    lasts = [(p.stat().st_mtime, p) for p in parent.glob(f"*/**/{CHECKPOINTS}/{LAST_CHECKPOINT}")]
    if not lasts:
        return None
    return parent / max(lasts)[1].relative_to(parent).parts[0]


def run_dir(parent: Path, ckpt_path: str | None) -> Path:
    """Where a training command runs: a new timestamped directory under parent, or, when it
    resumes (`resumes_last`), the newest one holding a last.ckpt."""
    if resumes_last(ckpt_path):
        newest = newest_resumable(parent)
        if newest is not None:
            return newest
    return claim_dir(parent, datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def finished(root: Path) -> Iterator[tuple[Run, dict[str, Any]]]:
    """Every finished stage under root with its result (half-written or foreign files skipped)."""
    for path in sorted(root.rglob(RESULT_FILE)) if root.is_dir() else []:
        run = Run(path.parent)
        result = run.read_result()
        if result is not None:
            yield run, result


def newest_stage1(
    root: Path, backbone: str, output_stride: int | None, data_root: str
) -> str | None:
    """The best checkpoint of the newest finished stage-1 run for this backbone, stride and data."""
    found = [
        (Path(result["best_ckpt"]).stat().st_mtime, result["best_ckpt"])
        for _, result in finished(root)
        if result.get("stage") == 1
        and result.get("backbone") == backbone
        and result.get("output_stride") == output_stride
        and result.get("data_root") == data_root
        and Path(result.get("best_ckpt") or "").is_file()
    ]
    return max(found)[1] if found else None


def sweep_jobs(folder: Path) -> list[dict[str, Any]]:
    """Each finished job under folder: its directory, overrides, config, result and metrics.

    A job is a run directory with result.json (one stage) or stage2/result.json (a pipeline,
    whose evaluate/metrics.json holds the study-level figures)."""
    from omegaconf import OmegaConf

    jobs = []
    for run, result in finished(folder):
        job = Run(run.path.parent) if run.path.name in STAGE_DIRS else run
        if run.path.name == STAGE_DIRS[0] and job.stage(2).path.is_dir():
            continue  # a pipeline: its stage 2 stands for it
        metrics_file = job.evaluation / METRICS_FILE
        jobs.append(
            {
                "dir": job.path,
                "name": str(job.path.relative_to(folder)),
                "overrides": job.overrides(),
                "config": OmegaConf.load(run.config_file),
                "result": result,
                "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
            }
        )
    return jobs
