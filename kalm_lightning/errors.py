"""The one exception type that reaches users as a single line instead of a traceback, and the checks
that raise it for settings."""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import traceback
from collections.abc import Iterable

# How torch re-raises an exception from a DataLoader worker: the class rebuilt around a message
# made of this header, the worker's traceback, and last the original "module.Class: message".
WORKER_RERAISE = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class UserError(Exception):
    """Bad input or settings: the message names the file or setting and how to fix it.

    Raised in a DataLoader worker (a corrupt image), it reaches the main process rebuilt by torch
    with the worker's traceback as its message; the constructor keeps only the original line."""

    def __init__(self, message: str = "") -> None:
        if WORKER_RERAISE.match(message):
            original = message.rstrip().splitlines()[-1]
            message = original.split(": ", 1)[-1]
        super().__init__(message)


def required(setting: str) -> UserError:
    """The error for a setting left at `???` (a required value)."""
    return UserError(f"setting {setting} is required: pass {setting}=...")


class Preempted(Exception):
    """Training stopped on a signal after saving its state; the message says how to continue.

    Not an error: the command exits with 128 + the signal's number, which schedulers read as
    "terminated, not finished". report: whether this process prints the line (one DDP rank does)."""

    def __init__(self, message: str, signum: int, report: bool = True) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
        self.report = report


def check_choice(setting: str, value: object, choices: Iterable[object]) -> None:
    """Refuse a setting whose value is not one of its choices, naming them."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"{setting}={value!r} is not one of {', '.join(map(str, choices))}")


def check_number(
    setting: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    exclusive_minimum: bool = False,
) -> None:
    """Refuse a numeric setting that is not a number, or lies outside [minimum, maximum]."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise UserError(f"{setting}={value!r} must be {what}")
    low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
    if not low_ok or (maximum is not None and value > maximum):
        low = f"> {minimum}" if exclusive_minimum else f">= {minimum}"
        bounds = " and ".join(
            part
            for part in (
                low if minimum is not None else "",
                f"<= {maximum}" if maximum is not None else "",
            )
            if part
        )
        raise UserError(f"{setting}={value!r} must be {bounds}")


def traceback_log(error: BaseException, line: str, program: str) -> str | None:
    """Write error's full traceback to the run's log file (Hydra's file handler, where the
    command has one), else to a file in the temporary folder; returns the file, or None when
    no file could be written (a full disk everywhere)."""
    record = logging.LogRecord(
        "kalm_lightning",
        logging.ERROR,
        __file__,
        0,
        line,
        None,
        (type(error), error, error.__traceback__),
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.handle(record)
                handler.flush()
                return handler.baseFilename
            except OSError:
                break
    try:
        with tempfile.NamedTemporaryFile(
            "w", prefix=f"{program}-", suffix=".log", delete=False
        ) as handle:
            handle.write(line + "\n" + "".join(traceback.format_exception(error)))
        return handle.name
    except OSError:
        return None


def report_fault(error: BaseException, program: str, line: str) -> None:
    """One line on the terminal for a fault of the machine (a full disk, a dead peer, out of
    memory); its traceback in a log file the line names."""
    log = traceback_log(error, line, program)
    where = f"full traceback in {log}" if log else "no log file could be written either"
    print(f"{program}: {line} ({where})", file=sys.stderr, flush=True)
