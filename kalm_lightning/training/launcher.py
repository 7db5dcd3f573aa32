"""DDP on one machine whose surviving rank always reports a dead peer in one line.

Lightning's launcher starts ranks 1..N-1 as subprocesses of rank 0 and watches them with a thread
(`_ChildProcessObserver`) that polls every 5 s and SIGKILLs rank 0 as soon as a child has died.
Rank 0 reports a dead peer (`faults.FaultReport`) when its next collective fails, which is at once
in a training step, but later when it is writing a checkpoint or between epochs: if the poll
comes first, the user gets no line at all. This launcher watches the children the same way, but
gives rank 0 `grace_s` to report and end by itself; only a rank 0 that reached no collective by
then is ended by the observer, which reports the line in its place.

Lightning offers no hook for the observer, so `ReportingDDPStrategy` swaps the launcher that
`DDPStrategy._configure_launcher` makes (its only private reach; torchrun and SLURM start the
ranks themselves and are left as they are).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from kalm_lightning.errors import report_fault
from kalm_lightning.runs import Run
from kalm_lightning.training.faults import last_state, where_it_stood

GRACE_S = 30.0  # how long rank 0 has to report a dead peer itself
POLL_S = 0.5


def ended_with(returncode: int) -> str:
    """How a process ended, in words: its exit code, or the signal that killed it."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class PeerObserver(threading.Thread):
    """Watch the child ranks; on the first that fails, give this process `grace_s` to report it
    (it ends itself, and this thread with it), then report it from here and end the ranks.

    Named and stopped as Lightning's observer is (`name`, `_finished`), so that
    `FaultReport.peer_lost` stops either one before it ends the process."""

    def __init__(
        self, children: list[subprocess.Popen], trainer: pl.Trainer | None, grace_s: float
    ) -> None:
        super().__init__(daemon=True, name="child-process-observer")
        self.children, self.trainer, self.grace_s = children, trainer, grace_s
        self._finished = False

    def run(self) -> None:
        failed = None
        while not self._finished and failed is None:
            time.sleep(POLL_S)
            codes = [child.poll() for child in self.children]
            if all(code == 0 for code in codes):
                return
            failed = next(
                ((rank, child) for rank, child in enumerate(self.children, 1) if child.returncode),
                None,
            )
        deadline = time.monotonic() + self.grace_s
        while not self._finished and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if self._finished or failed is None:
            return
        self.report(*failed)

    def report(self, rank: int, child: subprocess.Popen) -> None:
        trainer = self.trainer
        where = where_it_stood(trainer) if trainer is not None else "training"
        world = len(self.children) + 1
        run = Run(Path(trainer.default_root_dir)) if trainer is not None else None
        state = f"; {last_state(run)}" if run is not None else ""
        line = (
            f"another DDP rank stopped answering ({where}; rank {rank} of {world} "
            f"{ended_with(child.returncode)}, and rank 0 reached no collective within "
            f"{self.grace_s:.0f} s); this rank stopped too{state}; continue with ckpt_path=last"
        )
        error = RuntimeError(f"DDP rank {rank} (pid {child.pid}) {ended_with(child.returncode)}")
        report_fault(error, "kalm-train", line)
        for other in self.children:
            if other.poll() is None:
                other.kill()
        os._exit(1)


class ReportingLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with `PeerObserver` in place of its observer."""

    def __init__(self, *args: Any, grace_s: float = GRACE_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grace_s = grace_s

    def launch(self, function: Any, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any):
        self.cluster_environment.validate_settings(
            num_devices=self.num_processes, num_nodes=self.num_nodes
        )
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            PeerObserver(self.procs, trainer, self.grace_s).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class ReportingDDPStrategy(DDPStrategy):
    """`DDPStrategy` (every argument of it) whose launcher reports a dead rank in one line.

    grace_s: how long rank 0 may take to reach a collective and report a dead peer itself."""

    def __init__(self, *args: Any, grace_s: float = GRACE_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grace_s = grace_s

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = ReportingLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, grace_s=self.grace_s
            )
