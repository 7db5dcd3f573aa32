"""The study's averages over seeds, one owner: the mean and the sample spread; a row's summary."""

from __future__ import annotations

import math

import torch


def mean(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).mean()) if values else math.nan


def spread(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return float(torch.tensor(values, dtype=torch.float64).std()) if len(values) > 1 else 0.0


def find(summary: list[dict], name: str) -> dict | None:
    """A row's summary by its name (None: the row did not run in that regime)."""
    return next((s for s in summary if s["row"] == name), None)
