"""The command line before Hydra reads it: group options checked, numeric choices quoted, and a
multirun's jobs named by what the sweep varies."""

from __future__ import annotations

import re
import sys

from kalm_lightning.config import GROUPS, group_choices, quote_numeric_choices


def check_group_overrides(argv: list[str]) -> str | None:
    """Return one line naming the valid choices when an override picks an unknown group option."""
    for arg in argv:
        match = re.fullmatch(r"(?:\+{1,2})?(\w+)=(.*)", arg)
        if not match or match.group(1) not in GROUPS or "(" in match.group(2):
            continue
        group, values = match.groups()
        choices = group_choices(group)
        # a sweep (a,b) or several options of one group ([csv,wandb]): each must exist
        for value in (v.strip("'\" []") for v in values.split(",")):
            if value not in choices and value not in ("null", ""):
                hint = (
                    " (or any timm model through backbone.name=...)" if group == "backbone" else ""
                )
                return f"unknown {group} '{value}': choose one of {', '.join(choices)}{hint}"
    return None


HYDRA_VALUED_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--info",
    "-i",
}
SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(", "shuffle(", "sort(")


def name_jobs_by_swept_overrides(argv: list[str]) -> list[str]:
    """In a multirun, name each job's directory by what the sweep varies, not every override."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    fixed = []
    for previous, arg in zip(["", *argv], argv, strict=False):
        match = re.fullmatch(r"[~+]*([\w.@/-]+)(?:=(.*))?", arg)
        if previous in HYDRA_VALUED_FLAGS or arg.startswith("-") or not match:
            continue  # a flag, or a flag's value such as `--cfg job`
        if match.group(1).startswith("hydra."):
            continue
        value = match.group(2) or ""
        swept = ("," in value and not value.startswith(("[", "{"))) or value.startswith(
            SWEEP_FUNCTIONS
        )
        if not swept:
            fixed.append(match.group(1))
    if not fixed:
        return argv
    keys = ",".join(f"'{key}'" for key in fixed)
    return [*argv, f"hydra.job.config.override_dirname.exclude_keys=[{keys}]"]


def prepare_argv(program: str) -> None:
    """Prepare argv for Hydra, stopping with one line for an unknown group value (before Hydra's report)."""
    sys.argv[1:] = name_jobs_by_swept_overrides(quote_numeric_choices(sys.argv[1:]))
    message = check_group_overrides(sys.argv[1:])
    if message:
        print(f"{program}: {message}", file=sys.stderr)
        raise SystemExit(2)
