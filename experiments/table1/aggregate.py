"""The paper's Table 1 from finished runs: `python experiments/table1/aggregate.py DIR [--out FILE]`.

Reads every pipeline run under DIR (`<job>/evaluate/metrics.json` beside `<job>/stage2/config.yaml`,
as `experiment=paper` writes them; `make table1` makes them) and writes Markdown: our study-level
figures with their bootstrap intervals beside the paper's Table 1 and the difference, one row per
backbone and score, beyond-paper variants as extra rows, then the same per body part.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from kalm_lightning.config import variant
from kalm_lightning.evaluation.studies import SCORE_LABELS, SCORES
from kalm_lightning.runs import sweep_jobs, write_atomic

PAPER = {  # Table 1 of Huang et al. (ICASSP 2020): study-level accuracy, AUROC, kappa
    ("resnet18", "global"): (0.821, 0.875, 0.633),
    ("resnet18", "local"): (0.811, 0.870, 0.609),
    ("resnet18", "kalm"): (0.832, 0.888, 0.653),
    ("inception_v4", "global"): (0.800, 0.865, 0.584),
    ("inception_v4", "local"): (0.813, 0.873, 0.616),
    ("inception_v4", "kalm"): (0.814, 0.881, 0.617),
    ("vgg16", "global"): (0.838, 0.892, 0.668),
    ("vgg16", "local"): (0.827, 0.895, 0.649),
    ("vgg16", "kalm"): (0.842, 0.901, 0.678),
}
FIGURES = ("accuracy", "auroc", "kappa")


def find_runs(folder: Path) -> list[dict]:
    """Each finished pipeline job (the same jobs `kalm-summarize` lists): backbone, variant, metrics."""
    runs = []
    for job in sweep_jobs(folder):
        if job["metrics"] is None:
            continue
        cfg = job["config"]
        runs.append(
            {
                "backbone": cfg.backbone.name,
                "variant": variant(cfg),
                "metrics": job["metrics"],
                "path": job["dir"],
            }
        )
    return sorted(runs, key=lambda r: (r["variant"] != "", r["backbone"], r["variant"]))


def cell(value: float, interval: list[float] | None, percent: bool) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:.1%}" if percent else f"{value:.3f}"
    if interval and not any(math.isnan(v) for v in interval):
        low, high = (f"{v:.1%}" if percent else f"{v:.3f}" for v in interval)
        text += f" [{low}, {high}]"
    return text


def delta(ours: float, theirs: float, percent: bool) -> str:
    if math.isnan(ours):
        return "n/a"
    return f"{(ours - theirs) * 100:+.1f}" if percent else f"{ours - theirs:+.3f}"


def model_name(run: dict, score: str) -> str:
    name = f"{run['backbone']}_{SCORE_LABELS[score]}"
    return f"{name} ({run['variant']})" if run["variant"] else name


def main_table(runs: list[dict]) -> list[str]:
    lines = [
        "| model | accuracy | AUROC | kappa | paper accuracy | paper AUROC | paper kappa "
        "| Δ accuracy (points) | Δ AUROC | Δ kappa |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for score in SCORES:
            block = run["metrics"].get(score)
            if block is None:
                continue
            m, ci = block["study"], block.get("intervals", {})
            ours = [cell(m[f], ci.get(f), f == "accuracy") for f in FIGURES]
            paper = None if run["variant"] else PAPER.get((run["backbone"], score))
            theirs = (
                [f"{paper[0]:.1%}", f"{paper[1]:.3f}", f"{paper[2]:.3f}"] if paper else ["-"] * 3
            )
            deltas = (
                [delta(m[f], p, f == "accuracy") for f, p in zip(FIGURES, paper, strict=True)]
                if paper
                else ["-"] * 3
            )
            lines.append(
                "| " + " | ".join([model_name(run, score), *ours, *theirs, *deltas]) + " |"
            )
    return lines


def body_part_tables(runs: list[dict]) -> list[str]:
    lines = []
    parts = sorted(
        {
            p
            for run in runs
            for block in run["metrics"].values()
            for p in block.get("by_body_part", {})
        }
    )
    for part in parts:
        lines += [
            "",
            f"### {part}",
            "",
            "| model | accuracy | AUROC | kappa | studies |",
            "|---|---|---|---|---|",
        ]
        for run in runs:
            for score in SCORES:
                m = run["metrics"].get(score, {}).get("by_body_part", {}).get(part)
                if m:
                    figures = [cell(m[f], None, f == "accuracy") for f in FIGURES]
                    lines.append(
                        "| " + " | ".join([model_name(run, score), *figures, str(m["n"])]) + " |"
                    )
    return lines


def report(folder: Path) -> str:
    runs = find_runs(folder)
    if not runs:
        raise SystemExit(
            f"aggregate.py: no finished pipeline run (evaluate/metrics.json) under {folder}"
        )
    lines = [
        "# Table 1 on MURA v1.1: ours beside the paper's",
        "",
        f"Aggregated by `experiments/table1/aggregate.py {folder}` from {len(runs)} run(s).",
        "Study-level figures on MURA valid; brackets are 95% bootstrap intervals over studies",
        "(`evaluate.bootstrap`); Δ is ours minus the paper's. Rows with settings in brackets are",
        "beyond-paper variants (no paper figure).",
        "",
        *main_table(runs),
        "",
        "## Per body part (study level)",
        *body_part_tables(runs),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep directory, or a folder holding several")
    parser.add_argument("--out", type=Path, help="write the Markdown here (default: print it)")
    args = parser.parse_args(argv)
    text = report(args.folder)
    if args.out:
        write_atomic(args.out, text)
        print(f"Table 1 written to {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
