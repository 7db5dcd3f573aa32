"""Judging scores: studies and their average, metrics, localization figures, reports and figures,
sweep summaries. Nothing here trains or loads a model."""
