"""What every Hydra entry point shares: one-line errors instead of tracebacks for bad input."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from kalm_lightning.config import config_dir, prepare_argv, register_resolvers
from kalm_lightning.errors import UserError
from kalm_lightning.preemption import Preempted


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
                message = f"setting {error.full_key} is required: pass {error.full_key}=..."
            except Preempted as stop:  # not an error: the state is saved, the run continues later
                if rank_zero_only.rank == 0:  # every DDP rank stops; one says so
                    print(f"{program}: {stop}", file=sys.stderr)
                raise SystemExit(stop.exit_code) from None
            print(f"{program}: {message}", file=sys.stderr)
            raise SystemExit(2)

        return run

    return wrap


def hydra_entry(
    config_name: str, program: str, task: Callable[[DictConfig], Any]
) -> Callable[[], None]:
    """A console entry point: check argv, compose conf/<config_name>.yaml, run task with one-line errors."""
    register_resolvers()
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(
        one_line_errors(program)(task)
    )

    def main() -> None:
        prepare_argv(program)
        app()

    return main
