"""DDP inside a Hydra multirun: each job's further ranks join that job alone, then leave."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def pin_job_for_other_ranks(quote: Callable[[list[str]], list[str]]) -> None:
    """In a multirun, make DDP's further ranks join this job instead of re-running the sweep.

    Lightning starts each further rank as `python -m kalm_lightning.train <sys.argv[1:]>
    hydra.run.dir=<HydraConfig run.dir>`. In a multirun that argv is the whole sweep (`-m seed=1,2`),
    so each rank ran every job again in a sweep directory of its own. The ranks get this job's own
    overrides and its own directory instead."""
    if not multirun():
        return
    hydra_cfg = HydraConfig.get()
    sys.argv[1:] = quote(list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def leave_process_group() -> None:
    """Close this process's DDP group, where training opened one: what runs next on rank 0
    alone (a pipeline's evaluation) must not wait for the ranks that have left (Lightning's
    `Trainer.predict` would, at its prepare_data barrier) nor shard its images among them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def one_ddp_job(quote: Callable[[list[str]], list[str]]) -> Iterator[None]:
    """A multirun job's DDP ranks belong to that job alone.

    The further ranks are pointed at this job (`pin_job_for_other_ranks`); afterwards the process
    group is closed and the variables Lightning's launcher set in this process are removed, so the
    next job of the sweep starts its own ranks instead of talking to the finished job's."""
    before = {key: os.environ.get(key) for key in DDP_ENVIRONMENT}
    pin_job_for_other_ranks(quote)
    try:
        yield
    finally:
        if multirun():
            leave_process_group()
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
