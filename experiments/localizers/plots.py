"""The localizer study's plots: AUROC against inference cost per regime, the sweep over c, and two
runs' boxes side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image

from experiments.localizers.plan import GLOBAL_INPUT, Regime, Row
from experiments.localizers.stats import find
from kalm_lightning.evaluation.figures import save_figure

MARKERS = {"baseline": "s", "paper": "D", "learned": "o", "ceiling": "*", "control": "^"}


def plot_cost(summary: list[dict], path: Path, title: str) -> None:
    """AUROC against inference cost, one colour and a legend entry per row (most rows sit near 2x,
    where names written beside the points would cover each other); the marker tells the kind."""
    figure, axis = plt.subplots(figsize=(10, 5), dpi=110)
    colours = plt.get_cmap("tab20").colors
    for i, s in enumerate(summary):
        axis.errorbar(
            s["inference_cost"],
            s["auroc_mean"],
            yerr=s["auroc_sd"],
            fmt=MARKERS.get(s["kind"], "v"),
            color=colours[i % len(colours)],
            capsize=3,
            label=s["row"],
        )
    axis.set_xscale("log")
    axis.set_xlabel("inference FLOPs per image (global CNN at input size = 1, log scale)")
    axis.set_ylabel("study AUROC (mean ± sd over seeds)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    save_figure(figure, path)


def plot_sweep(sweep: list[tuple[Regime, list[dict]]], rows: tuple[Row, ...], out: Path) -> None:
    """AUROC gain over global @ input, and hit rate, against c."""
    figure, (gain, hits) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for colour, row in enumerate(rows):  # one colour per row in both panels
        if row.name == GLOBAL_INPUT.name:
            continue
        points = []
        for regime, summary in sweep:
            s, base = find(summary, row.name), find(summary, GLOBAL_INPUT.name)
            if s is not None and base is not None:
                points.append(
                    (regime.cue, s["auroc_mean"] - base["auroc_mean"], s["auroc_sd"], s["hit_rate"])
                )
        if not points:
            continue
        cues, diffs, sds, rates = zip(*points, strict=True)
        style = {"marker": "o", "label": row.name, "color": f"C{colour}"}
        gain.errorbar(cues, diffs, yerr=sds, capsize=3, **style)
        if rates[0] is not None:
            hits.plot(cues, rates, **style)
    gain.axhline(0, color="grey", linewidth=1, linestyle=":")
    gain.set(xlabel="blob contrast c", ylabel="study AUROC minus global @ input")
    hits.set(xlabel="blob contrast c", ylabel="lesion centre inside the box", ylim=(0, 1.02))
    gain.legend(fontsize=7)
    hits.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, out / "sweep.png")


def side_by_side(paths: list[Path], out: Path) -> bool:
    """boxes.png of two runs side by side (red: the run's box, green: the true lesion)."""
    if not all(p.is_file() for p in paths):
        return False
    tiles = [Image.open(p).convert("RGB") for p in paths]
    gap = 16
    canvas = Image.new(
        "RGB", (sum(t.width for t in tiles) + gap, max(t.height for t in tiles)), "white"
    )
    canvas.paste(tiles[0], (0, 0))
    canvas.paste(tiles[1], (tiles[0].width + gap, 0))
    canvas.save(out)
    return True
