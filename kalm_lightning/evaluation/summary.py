"""Every job of a sweep in one table: its overrides and its figures, sorted by the selection figure.

`python -m kalm_lightning.summarize SWEEP_DIR` writes summary.md and summary.csv into SWEEP_DIR;
`experiments/table1/aggregate.py` reads the same jobs (`runs.sweep_jobs`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import wandb

from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.metrics import NAMES
from kalm_lightning.evaluation.studies import SCORE_LABELS, SCORES
from kalm_lightning.runs import RESULT_FILE, sweep_jobs, write_atomic


def summary_table(jobs: list[dict]) -> pd.DataFrame:
    """One row per job: overrides, the selection figure, and each score's study-level figures."""
    rows = []
    for job in jobs:
        result = job["result"]
        row = {
            "job": job["name"],
            "overrides": " ".join(job["overrides"]),
            "selection": result.get("selection_metric", "image_accuracy"),
            "best_val": result.get("best_val_score", result.get("best_val_image_acc")),
        }
        for score in SCORES:
            block = (job["metrics"] or {}).get(score)
            for name in NAMES:
                row[f"{SCORE_LABELS[score]}_{name}"] = block["study"][name] if block else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("best_val", ascending=False, na_position="last").reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join(lines) + "\n"


def summarize(folder: Path) -> pd.DataFrame:
    """Write summary.md and summary.csv into folder; return the table."""
    jobs = sweep_jobs(folder)
    if not jobs:
        raise UserError(f"{folder} holds no finished job (no {RESULT_FILE} below it)")
    table = summary_table(jobs)
    write_atomic(folder / "summary.csv", table.to_csv(index=False))
    header = (
        f"# Sweep {folder}\n\n{len(table)} job(s), best first by the validation figure each job "
        "selected its checkpoint on (`best_val`). Study-level figures (g / l / KALM) come from the "
        "job's evaluation, where it ran one.\n\n"
    )
    write_atomic(folder / "summary.md", header + to_markdown(table))
    return table


def log_to_wandb(table: pd.DataFrame, folder: Path, project: str) -> None:
    """The summary as one W&B table, in the run group the sweep's jobs logged under
    (offline unless WANDB_MODE says otherwise; `wandb sync` uploads it)."""
    group = f"sweep-{folder.resolve().name}"
    run = wandb.init(
        project=project,
        group=group,
        name=f"{group}-summary",
        dir=str(folder),
        mode=os.environ.get("WANDB_MODE", "offline"),
        job_type="summary",
    )
    run.log({"sweep_summary": wandb.Table(dataframe=table)})
    run.finish()
