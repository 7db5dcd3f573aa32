"""Study 3's report: every row of every regime over its seeds, the paired differences of K = 4
against every other row, the goal regime by regime, the costs, two plots, and RESULTS.md.

    python -m experiments.localizers.report3 [--out DIR] [--quick]   # from the records; trains nothing
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from statistics import median

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from experiments.localizers.plots import MARKERS
from experiments.localizers.stats import mean, spread
from experiments.localizers.study3 import (
    CONTROLS,
    CUES,
    DECOYS,
    GLOBAL_INPUT,
    GLOBAL_SOURCE,
    MULTICROP,
    OUT,
    READERS,
    REGIMES,
    ROWS,
    WORK,
    Study3,
    plan,
    regimes_of,
)
from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.figures import save_figure
from kalm_lightning.runs import write_atomic

DISCUSSION = "discussion.md"  # the reading, written by hand from the tables, included in RESULTS.md


def figures(row, record: dict) -> dict[str, float]:
    """One run's figures: the row's study AUROC, accuracy and kappa at the hold-out's operating
    point, the localization (any of K windows, and the one weighed most), the costs."""
    located = record.get("localization") or {}
    return {
        "auroc": record["study"][row.score]["auroc"],
        "accuracy": record["at_operating_point"]["accuracy"],
        "kappa": record["at_operating_point"]["kappa"],
        "hits": located.get("hit_rate") if row.score == "kalm" else None,
        "hits_top": located.get("hit_rate_top", located.get("hit_rate")),
        "iou": located.get("mean_best_iou", located.get("mean_iou")),
        "gflops": record["inference_flops"] / 1e9,
        "tflops_trained": record["training_flops"] * record["images_trained"] / 1e12,
        "minutes": record["seconds"] / 60,
    }


def collect(study, quick: bool) -> dict[str, dict[str, dict[int, dict]]]:
    """regime -> row -> seed -> figures, for every finished run of the plan."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for regime, row, seed in plan(quick):
        record = study.read(regime, study.row(row), seed)
        if record is not None:
            out.setdefault(regime.name, {}).setdefault(row.name, {})[seed] = figures(row, record)
    return out


def stat(runs: dict[int, dict], key: str) -> str:
    values = [r[key] for r in runs.values() if r[key] is not None]
    if not values:
        return "-"
    digits = {"gflops": 2, "tflops_trained": 1}.get(key, 3)
    if key == "minutes":  # the median: a run that shared the CPU or spanned a pause is an outlier
        return f"{median(values):.1f}"
    if key in ("hits", "hits_top"):
        return f"{100 * mean(values):.1f}% ± {100 * spread(values):.1f}"
    return f"{mean(values):.{digits}f} ± {spread(values):.{digits}f}"


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> tuple[float, float, list[int]]:
    """Mean and spread of a - b over the seeds both ran."""
    seeds = sorted(s for s in set(a) & set(b) if a[s][key] is not None and b[s][key] is not None)
    diffs = [a[s][key] - b[s][key] for s in seeds]
    return mean(diffs), spread(diffs), seeds


def goal(rows: dict[str, dict[int, dict]], reader) -> list[str]:
    """The issue's goal for one K-crop row in one regime, each point on every seed it and its
    comparand ran."""
    k4, src = rows.get(reader.name), rows.get(GLOBAL_SOURCE.name)
    if not k4 or not src:
        return [f"- not judged yet: {reader.name} or global @ source has no finished run"]
    seeds = sorted(set(k4) & set(src))
    close = [k4[s]["auroc"] >= src[s]["auroc"] - 0.01 for s in seeds]
    cost = mean([r["gflops"] for r in k4.values()]) / mean([r["gflops"] for r in src.values()])
    hits = [k4[s]["hits"] for s in sorted(k4)]
    lines = [
        f"- AUROC within 0.01 of global @ source: {sum(close)} of {len(seeds)} seeds "
        f"({'met' if all(close) else 'not met'}); seeds {seeds}",
        f"- inference FLOPs {cost:.3f}x global @ source ({'met' if cost <= 0.25 else 'not met'}: "
        "<= 0.25)",
        f"- lesion hits (any window) >= 90% on every seed: "
        f"{', '.join(f'{100 * h:.1f}%' for h in hits)} "
        f"({'met' if all(h >= 0.9 for h in hits) else 'not met'})",
    ]
    for control in CONTROLS:
        if control.name in rows:
            d, sd, both = paired(k4, rows[control.name], "auroc")
            ahead = d > sd and len(both) > 1
            lines.append(
                f"- ahead of {control.name} by more than the paired spread: AUROC "
                f"{d:+.3f} ± {sd:.3f} over seeds {both} ({'met' if ahead else 'not met'})"
            )
    return lines


def regime_section(regime, rows: dict[str, dict[int, dict]]) -> list[str]:
    lines = [
        f"### {regime.label}",
        "",
        "| row | seeds | study AUROC | accuracy @ op. point | kappa @ op. point | lesion hits "
        "(any window) | hits (top window) | best IoU | inference GFLOPs | training TFLOPs | "
        "minutes/run (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        runs = rows.get(row.name)
        if runs:
            cells = [stat(runs, k) for k in ("auroc", "accuracy", "kappa", "hits", "hits_top")]
            cells += [stat(runs, k) for k in ("iou", "gflops", "tflops_trained", "minutes")]
            lines.append(f"| {row.name} | {sorted(runs)} | " + " | ".join(cells) + " |")
    k4 = rows.get(MULTICROP.name)
    if k4:
        lines += ["", "Paired differences, K = 4 minus the row (mean ± sd over common seeds):", ""]
        lines += ["| row | seeds | AUROC | lesion hits |", "|---|---|---|---|"]
        for row in ROWS:
            if row.name in rows and row != MULTICROP:
                d, sd, seeds = paired(k4, rows[row.name], "auroc")
                hd, hsd, hseeds = paired(k4, rows[row.name], "hits")
                hits = f"{100 * hd:+.1f}% ± {100 * hsd:.1f}" if hseeds else "-"
                lines.append(f"| {row.name} | {seeds} | {d:+.3f} ± {sd:.3f} | {hits} |")
    for reader in READERS:
        lines += ["", f"Goal, {reader.name}:", "", *goal(rows, reader)]
    return [*lines, ""]


def overview(collected: dict, regimes: list) -> list[str]:
    """Every row in every regime at a glance: mean study AUROC over the finished seeds and the
    lowest lesion hits of any seed (the goal asks for every seed)."""
    lines = [
        "| row | " + " | ".join(g.name for g in regimes) + " |",
        "|---" * (1 + len(regimes)) + "|",
    ]
    for row in ROWS:
        cells = []
        for regime in regimes:
            runs = list(collected.get(regime.name, {}).get(row.name, {}).values())
            hits = [r["hits"] for r in runs if r["hits"] is not None]
            auroc = f"{mean([r['auroc'] for r in runs]):.3f}" if runs else "-"
            cells.append(auroc + (f", {100 * min(hits):.0f}%" if hits else ""))
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(collected: dict, out: Path) -> list[str]:
    """cost.png: AUROC against inference FLOPs per regime; hits.png: hits against D per c."""
    if not collected:
        return []
    figure, axes = plt.subplots(3, 3, figsize=(14, 11), dpi=100, sharey=True)
    colours = plt.get_cmap("tab10").colors
    for regime in REGIMES:
        axis = axes[DECOYS.index(regime.decoys)][CUES.index(regime.cue)]
        rows = collected.get(regime.name, {})
        for i, row in enumerate(ROWS):
            if row.name in rows:
                runs = list(rows[row.name].values())
                axis.errorbar(
                    mean([r["gflops"] for r in runs]),
                    mean([r["auroc"] for r in runs]),
                    yerr=spread([r["auroc"] for r in runs]),
                    fmt=MARKERS.get(row.kind, "v"),
                    color=colours[i % 10],
                    capsize=3,
                    label=row.name,
                )
        axis.set_xscale("log")
        axis.set_title(regime.label, fontsize=9)
    axes[2][1].set_xlabel("inference GFLOPs per image (log)")
    axes[1][0].set_ylabel("study AUROC (mean ± sd over seeds)")
    handles = {h.get_label(): h for a in axes.flat for h in a.get_legend_handles_labels()[0]}
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(figure, out / "cost.png")
    figure, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100, sharey=True)
    for axis, cue in zip(axes, CUES, strict=True):
        for i, row in enumerate(ROWS):
            points = [
                (regime.decoys, mean([r["hits"] for r in runs.values()]))
                for regime in sorted(REGIMES, key=lambda regime: regime.decoys)
                if regime.cue == cue
                and (runs := collected.get(regime.name, {}).get(row.name))
                and row.score == "kalm"
            ]
            if points:
                axis.plot(
                    *zip(*points, strict=True), marker="o", color=colours[i % 10], label=row.name
                )
        axis.set_title(f"c = {cue:g}", fontsize=9)
        axis.set_xlabel("decoys D")
        axis.set_xticks(DECOYS)
    axes[0].set_ylabel("lesion hits (any window), mean over seeds")
    handles = {h.get_label(): h for a in axes for h in a.get_legend_handles_labels()[0]}
    figure.legend(handles.values(), handles.keys(), loc="center right", fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0, 0.8, 1))
    save_figure(figure, out / "hits.png")
    return ["![AUROC against inference FLOPs](cost.png)", "", "![hits against D](hits.png)", ""]


def write_report(study, quick: bool, seconds: float) -> None:
    collected = collect(study, quick)
    runs = plan(quick)
    left = len(runs) - sum(len(seeds) for rows in collected.values() for seeds in rows.values())
    flag = " --quick" if quick else ""
    report, study3 = (
        f"`python -m experiments.localizers.{m}{flag}`" for m in ("report3", "study3")
    )
    discussion = study.out / DISCUSSION
    regimes = regimes_of(quick)
    hours = (
        sum(
            f["minutes"]
            for rows in collected.values()
            for runs in rows.values()
            for f in runs.values()
        )
        / 60
    )
    lines = [
        "# Localizer study 3: K crops read by attention, in regimes where looking pays",
        "",
        f"Generated by {report} (every part of {study3} ends with it) from the records in "
        f"results/ ({len(runs) - left} of "
        f"{len(runs)} runs finished; {left} left: run study3 again to continue). What each run is "
        "and why: the docstring of `experiments/localizers/study3.py`.",
        "",
        f"Machine of this report: {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; each record's minutes are from the machine that "
        f"ran it. This invocation: {seconds / 60:.1f} min. Minutes are wall time on a 2-core "
        "machine that often ran other work beside the study (and paused it for benchmarks): "
        "they say roughly how long a run takes (the table gives their median over seeds), and the "
        "training TFLOPs are the cost to compare.",
        "",
        f"Wall time of the finished runs, each counted once: {hours:.1f} h (a run's figure is its "
        "own training and evaluation; the stage-1 run that stage-2 runs start from is its own "
        "record).",
        "",
        "## The reading",
        "",
        discussion.read_text() if discussion.is_file() else "(not written yet)",
        "",
        "## At a glance",
        "",
        "Study AUROC, the mean over each row's finished seeds, then the lowest lesion hits (any "
        "window) of those seeds; the regime sections below give the seeds, spreads and pairs.",
        "",
        *overview(collected, regimes),
        "## Regimes",
        "",
        f"Study AUROC on MURA valid of each seed's own draw, {GLOBAL_INPUT.name} as CNN_g of every "
        "stage-2 row; training TFLOPs: the run's whole training (FLOPs per image x images).",
        "",
    ]
    for regime in regimes:
        lines += regime_section(regime, collected.get(regime.name, {}))
    lines += ["## Plots", "", *plot(collected, study.out)]
    write_atomic(study.out / "RESULTS.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="results/ and RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="the quick plan's records (tests)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:  # no work folder is read: the records are all a report needs
        study = Study3(args.out.resolve(), WORK.resolve(), args.quick, None)
    except UserError as error:
        raise SystemExit(f"report3: {error}") from None
    write_report(study, args.quick, time.perf_counter() - start)
    print(f"report3: {study.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
