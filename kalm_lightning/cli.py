"""What every Hydra entry point shares: one-line errors instead of tracebacks for bad input, and
the task loaded only once there is one to run.

This module and what it imports (Hydra, OmegaConf, the config helpers) load in a fraction of a
second; the tasks pull in torch, Lightning and timm, 5-7 s on a laptop CPU. An entry point names
its task as "module:function", imported when Hydra calls it: `--help`, `--cfg job`, `--info` and
an unknown group option answer at once."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from kalm_lightning.argv import prepare_argv
from kalm_lightning.config import config_dir
from kalm_lightning.errors import Preempted, UserError, report_fault, required
from kalm_lightning.resolvers import register_resolvers
from kalm_lightning.settings import check_config


def one_line_errors(program: str) -> Callable:
    """Wrap a task so that UserError and missing settings end it with one line and exit code 2,
    and a preempted run with one line and 128 + the signal's number."""

    def wrap(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except UserError as error:
                message = str(error)
            except InstantiationException as error:
                # A constructor refused a setting: Hydra wraps its UserError, which is the message.
                if not isinstance(error.__cause__, UserError):
                    raise
                message = str(error.__cause__)
            except MissingMandatoryValue as error:
                message = str(required(error.full_key))
            except Preempted as stop:  # not an error: the state is saved, the run continues later
                if stop.report:  # every DDP rank stops; one says so
                    print(f"{program}: {stop}", file=sys.stderr)
                raise SystemExit(stop.exit_code) from None
            except Exception as error:  # a fault of the machine gets its line; a bug its traceback
                from kalm_lightning.training.faults import fault_line

                line = fault_line(error)
                if line is None:
                    raise
                report_fault(error, program, line)
                raise SystemExit(1) from None
            print(f"{program}: {message}", file=sys.stderr)
            raise SystemExit(2)

        return run

    return wrap


def load_task(reference: str) -> Callable[[DictConfig], Any]:
    """The function named by "package.module:function"."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def hydra_entry(config_name: str, program: str, task: str) -> Callable[[], None]:
    """A console entry point: check argv, compose conf/<config_name>.yaml, then import and run
    task ("module:function") with one-line errors."""
    register_resolvers()

    def run(cfg: DictConfig) -> Any:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:  # before the task's imports: a forgotten data.root answers at once
            raise required(missing[0])
        check_config(cfg)  # likewise a value out of range
        return load_task(task)(cfg)

    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(
        one_line_errors(program)(run)
    )

    def main() -> None:
        # Nothing leaves the machine: MLflow (logger=mlflow) sends usage events unless told not to.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        prepare_argv(program)
        app()

    return main
