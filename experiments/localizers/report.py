"""The localizer study's report: each row's figures over seeds, the verdicts, the goal, the plots and
RESULTS.md, all from the runs' records."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from experiments.localizers.plan import (
    FIXED,
    GLOBAL_INPUT,
    GLOBAL_SOURCE,
    MUST_BEAT,
    PAPER,
    Regime,
    Row,
)
from experiments.localizers.plots import plot_cost, plot_sweep
from experiments.localizers.stats import find, mean, spread
from kalm_lightning.runs import write_atomic

DISCUSSION = "discussion.md"  # beside RESULTS.md: the reading of the results, included in it


def summarize(regime: Regime, rows: list[Row], records: dict[str, list[dict]]) -> list[dict]:
    """Per row of the regime with at least one finished run: mean and spread over seeds."""
    base = records.get(GLOBAL_INPUT.name) or []
    base_infer = mean([r["inference_flops"] for r in base])
    base_train = mean([r["training_flops"] for r in base])
    summary = []
    for row in rows:
        runs = records.get(row.name) or []
        if not runs:
            continue
        figures = {
            m: [r["study"][row.score][m] for r in runs] for m in ("auroc", "accuracy", "kappa")
        }
        located = [r["localization"] for r in runs if r.get("localization") and row.score == "kalm"]
        summary.append(
            {
                "row": row.name,
                "kind": row.kind,
                "score": row.score,
                "seeds": [r["seed"] for r in runs],
                **{f"{m}_mean": mean(v) for m, v in figures.items()},
                **{f"{m}_sd": spread(v) for m, v in figures.items()},
                "auroc_runs": figures["auroc"],
                "hit_rate": mean([loc["hit_rate"] for loc in located]) if located else None,
                "hit_rate_sd": spread([loc["hit_rate"] for loc in located]) if located else None,
                "mean_iou": mean([loc["mean_iou"] for loc in located]) if located else None,
                "mean_area": mean([loc["mean_area"] for loc in located]) if located else None,
                "heldout": mean([r["heldout"] for r in runs]),
                "heldout_hit": mean(held) if (held := heldout_hits(row, runs)) else None,
                "inference_cost": mean([r["inference_flops"] for r in runs]) / base_infer,
                "training_cost": mean([r["training_flops"] for r in runs]) / base_train,
                "minutes": sum(r["seconds"] for r in runs) / 60,
                "overrides": runs[0]["overrides"],
            }
        )
    return summary


def heldout_hits(row: Row, runs: list[dict]) -> list[float]:
    """The hit rates on the hold-out of train, of the runs whose records hold them."""
    if row.score != "kalm":
        return []
    located = [r.get("heldout_localization") for r in runs]
    return [loc["hit_rate"] for loc in located if loc]


NO_VERDICT = "(one seed: no verdict) vs"


def verdict(a: dict, b: dict) -> tuple[str, float]:
    """'beats', 'loses to' or 'ties with': a difference counts when it exceeds both spreads added."""
    diff = a["auroc_mean"] - b["auroc_mean"]
    if len(a["seeds"]) < 2 or len(b["seeds"]) < 2:
        return NO_VERDICT, diff
    margin = a["auroc_sd"] + b["auroc_sd"]
    return ("beats" if diff > margin else "loses to" if -diff > margin else "ties with"), diff


def goal_lines(regime: Regime, summary: list[dict]) -> list[str]:
    """The issue's goal for a one-crop localizer, checked row by row (main regime), and the
    decoy test (D >= 3): hit rate well above 1 / (D + 1)."""
    lines = []
    source = find(summary, GLOBAL_SOURCE.name)
    base = find(summary, GLOBAL_INPUT.name)
    for s in summary:
        if s["kind"] != "learned" and s["kind"] != "paper":
            continue
        parts = []
        if s["hit_rate"] is not None:
            parts.append(f"hit {s['hit_rate']:.1%} {'>=' if s['hit_rate'] >= 0.9 else '<'} 90%")
            parts.append(f"IoU {s['mean_iou']:.3f} {'>=' if s['mean_iou'] >= 0.3 else '<'} 0.3")
            parts.append(f"box area {s['mean_area']:.1%}")
        beaten = []
        for other in MUST_BEAT:
            o = find(summary, other.name)
            if o is not None:
                word, diff = verdict(s, o)
                beaten.append((other.name, word, diff))
        parts += [f"{word} {name} ({diff:+.3f})" for name, word, diff in beaten]
        if source is not None:
            gap = source["auroc_mean"] - s["auroc_mean"]
            parts.append(f"{gap:+.3f} below global @ source ({'<=' if gap <= 0.03 else '>'} 0.03)")
        if base is not None:
            parts.append(f"{s['inference_cost']:.2f}x the inference cost of global @ input")
        own = (  # the checks of the row itself, then its comparisons
            s["hit_rate"] is not None
            and s["hit_rate"] >= 0.9
            and s["mean_iou"] >= 0.3
            and source is not None
            and source["auroc_mean"] - s["auroc_mean"] <= 0.03
            and s["inference_cost"] <= 2.2
            and len(beaten) == len(MUST_BEAT)
        )
        words = {word for _, word, _ in beaten}
        if own and words == {"beats"}:
            state = "MEETS the goal"
        elif own and words <= {"beats", NO_VERDICT}:  # a comparison without two seeds each side
            state = "the goal is not decided yet (a comparison has one seed)"
        else:
            state = "misses the goal"
        lines.append(f"- **{s['row']}**: {state}: " + "; ".join(parts) + ".")
    if regime.decoys:
        chance = 1 / (regime.decoys + 1)
        for s in summary:
            if s["hit_rate"] is not None and s["kind"] in ("learned", "paper", "ceiling"):
                lines.append(
                    f"- {s['row']}: hit rate {s['hit_rate']:.1%} against 1 / (D + 1) = {chance:.0%}."
                )
    return lines


def fmt(value: float | None, sd: float | None = None, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.1%}" if percent else f"{value:.3f}"
    if sd is not None:
        text += f" ± {sd:.1%}" if percent else f" ± {sd:.3f}"
    return text


def table(summary: list[dict]) -> list[str]:
    lines = [
        "| row | seeds | AUROC | accuracy | kappa | hit rate | IoU | box area | infer cost | train cost | minutes | hold-out AUROC, hit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['row']} | {len(s['seeds'])} | {fmt(s['auroc_mean'], s['auroc_sd'])} | "
            f"{fmt(s['accuracy_mean'], s['accuracy_sd'], True)} | {fmt(s['kappa_mean'], s['kappa_sd'])} | "
            f"{fmt(s['hit_rate'], s['hit_rate_sd'], True)} | {fmt(s['mean_iou'])} | "
            f"{fmt(s['mean_area'], percent=True)} | {s['inference_cost']:.2f}x | "
            f"{s['training_cost']:.2f}x | {s['minutes']:.1f} | {fmt(s['heldout'])}"
            f"{'' if s['heldout_hit'] is None else ', ' + fmt(s['heldout_hit'], percent=True)} |"
        )
    return lines


def texture_line(kept: float) -> str:
    return (
        f"The lesion's texture keeps {kept:.0%} of its amplitude inside its blob: the generator "
        "cuts it where the image lacks headroom under its ceiling or over its floor "
        "(`texture_kept` in kalm_lightning/data/blobs.py)."
    )


def write(
    out: Path,
    regimes: list[tuple[Regime, list[dict]]],
    sweep: list[tuple[Regime, list[dict]]],
    sweep_rows: tuple[Row, ...],
    best: Row,
    setting: list[str],
    command: str,
    left: int,
    boxes: bool,
    kept: dict[str, float],
) -> str:
    """RESULTS.md and summary.json from the regimes' and the sweep's summaries; kept: the share of
    the texture's amplitude that the generator leaves in the lesion's blob, by regime name."""
    lines = [
        "# Where does the localizer find the key area? (synthetic, `experiment=localizer`)",
        "",
        "Generated by `python -m experiments.localizers.study` from the records in `results/` (one JSON per",
        "run and seed). Study-level figures on the synthetic valid split; checkpoints and the best",
        "new localizer were chosen on a patient-disjoint hold-out of train (checkpoints by its study",
        "AUROC, the best navigator by its hit rate, then its AUROC).",
        "",
    ]
    if left:
        lines += [
            f"**Partial: {left} planned run(s) have not run yet.** Rows show the seeds finished.",
            "",
        ]
    lines += [
        "## Setting",
        "",
        *setting,
        f"- Machine (of this invocation): {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}. The "
        "records were trained in resumable parts, not all on one machine: a part that needs a "
        "checkpoint made elsewhere trains it again (and the runs made from it, where its figures "
        "differ), so each seed's runs start from its recorded stage 1.",
        "",
    ]
    for regime, summary in regimes:
        fixed = find(summary, FIXED.name)
        lines += [f"## {regime.label}", ""]
        if fixed is not None and fixed["hit_rate"] is not None:
            lines += [
                f"A fixed centred box of half the sides holds the lesion centre in {fixed['hit_rate']:.1%} of lesioned images.",
                "",
            ]
        lines += [texture_line(kept[regime.name]), ""]
        lines += [*table(summary), ""]
        goal = goal_lines(regime, summary)
        if goal:
            lines += [
                "Against the goal (differences count when they exceed both spreads added):",
                "",
                *goal,
                "",
            ]
        plot_cost(summary, out / f"cost-{regime.name}.png", regime.label)
        lines += [f"![AUROC against inference cost, {regime.name}](cost-{regime.name}.png)", ""]
    if sweep:
        plot_sweep(sweep, sweep_rows, out)
        lines += [
            "## The sweep of c (reduced rows)",
            "",
            f"Best new localizer on the main regime's hold-out: **{best.name}**.",
            "",
        ]
        for point, summary in sweep:
            lines += [f"### c = {point.cue:g}", "", texture_line(kept[point.name]), ""]
            lines += [*table(summary), ""]
        lines += ["![AUROC gain and hit rate against c](sweep.png)", ""]
    if boxes:
        lines += [
            f"![Boxes of the paper's KALM (left) and {best.name} (right), main regime, seed 0; red: chosen box, green: lesion](boxes.png)",
            "",
        ]
    if (out / DISCUSSION).is_file():
        lines += [
            "## Reading (written after the runs)",
            "",
            (out / DISCUSSION).read_text().strip(),
            "",
        ]
    lines += [
        "Columns: hit rate = lesion centre inside the box; IoU = box against the lesion's box; box area =",
        "the box's share of the image; costs = FLOPs per image over global @ input's (inference: one",
        "image, every score; training: forward and backward, averaged over the run's epochs, teacher",
        "passes included); minutes = wall time of training and evaluation summed over the seeds",
        "(at nice 19 on a 2-core machine that ran other jobs beside some runs: compare FLOPs, not",
        "minutes, between rows).",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        "Finished runs are read back from `results/`; delete a file there to train that run again.",
        "",
    ]
    text = "\n".join(lines)
    write_atomic(out / "RESULTS.md", text)
    write_atomic(
        out / "summary.json",
        json.dumps(
            {r.name: s for r, s in regimes}
            | {f"sweep-c{g.cue:g}": s for g, s in sweep}
            | {"best": {"row": best.name, "overrides": list(best.stage2)}},  # make table1's row
            indent=2,
        )
        + "\n",
    )
    return text


__all__ = ["PAPER", "summarize", "write"]
