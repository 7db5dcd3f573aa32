"""The localizer study: does KALM's box find the key area, and when does the local view help?

    python experiments/synthetic/study.py                # or: make study (about the budget in RESULTS.md)
    python experiments/synthetic/study.py --quick --out DIR --work DIR    # tiny sizes, for the tests

Every row trains and evaluates through the project's own code (Hydra compose, `train_stage`,
`run_evaluation`) on the `experiment=study` preset. Stage 1 is shared per seed by every row that
builds on it. Checkpoints are selected on a patient-disjoint hold-out of train; the table reports the
synthetic valid split, which nothing is tuned on. The runner is resumable: each finished run leaves
`results/<run>-seed<k>.json`, which later invocations read back instead of training again.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from kalm_lightning.config import compose_config
from kalm_lightning.data.index import read_lesion_boxes, read_mura_index
from kalm_lightning.stages import load_stage
from kalm_lightning.tasks.evaluate import run_evaluation
from kalm_lightning.tasks.train import evaluation_config, train_stage

HERE = Path(__file__).resolve().parent
DISCUSSION = "discussion.md"  # beside RESULTS.md: the reading of the results, included in it
SOURCE_INPUT = ("data.image_size=${data.source_size}",)
FINER_MAP = ("backbone.output_stride=16",)
QUICK = (
    "data.image_size=64",
    "data.source_size=128",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.synthetic.train_studies=24",
    "data.synthetic.valid_studies=12",
    "data.synthetic.max_size=96",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.log_every_n_steps=1",
)


@dataclass(frozen=True)
class Row:
    name: str
    score: str  # which of the run's scores the row reports: global, local or kalm
    stage1: tuple[str, ...] = ()  # overrides of the stage-1 run
    stage2: tuple[str, ...] | None = None  # overrides of the stage-2 run; None: a stage-1 row
    variant: bool = False  # a beyond-paper option, candidate for the best combination


PAPER = Row("KALM (paper)", "kalm", (), ())
ROWS = [
    Row("global CNN @ input size", "global"),
    Row("global CNN @ source size", "global", SOURCE_INPUT),
    Row("local only (CNN_l of KALM)", "local", (), ()),
    PAPER,
    Row("KALM, centre=cell", "kalm", (), ("stage.centre=cell",), True),
    Row("KALM, CNN_l from CNN_g", "kalm", (), ("stage.local_init=global",), True),
    Row("control: whole image to CNN_l", "kalm", (), ("stage.crop=full",)),
    Row("control: fixed centre box", "kalm", (), ("stage.crop=fixed", "stage.fixed_box={box}")),
    Row("aggregation=cam", "kalm", (), ("stage.aggregation=cam",), True),
    Row(
        "centre=soft + aggregation=learned",
        "kalm",
        (),
        ("stage.centre=soft", "stage.aggregation=learned"),
        True,
    ),
    Row("finer map (output_stride=16)", "kalm", FINER_MAP, (), True),
    Row(
        "box prior (box_init=0.3, box_lr=0.01)",
        "kalm",
        (),
        ("stage.box_init=0.3", "stage.box_lr=0.01"),
        True,
    ),
]
BEST = "best combination (chosen on the hold-out)"


def slug(stage1: tuple[str, ...], stage2: tuple[str, ...] | None) -> str:
    """A run's file name from its overrides: the same overrides are the same run."""
    name = "-".join(["s1", *stage1]) if stage2 is None else "-".join(["s2", *stage1, *stage2])
    name = name if stage2 is None or stage1 or stage2 else "s2-paper"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name.replace("=", "-"))


class Study:
    def __init__(self, out: Path, work: Path, seeds: list[int], quick: bool) -> None:
        self.out, self.work, self.seeds, self.quick = out, work, seeds, quick
        (out / "results").mkdir(parents=True, exist_ok=True)
        self.base = [
            "experiment=study",
            "~callbacks.progress_bar",
            "logger=csv",
            f"paths.output_root={work / 'outputs'}",
            f"paths.data_root={work / 'data'}",
            *(QUICK if quick else ()),
        ]
        self.checkpoints: dict[str, str] = {}
        self.trained = 0

    def config(self, stage: int, overrides: tuple[str, ...], seed: int):
        return compose_config("train", [*self.base, f"stage={stage}", f"seed={seed}", *overrides])

    def record_path(self, name: str, seed: int) -> Path:
        return self.out / "results" / f"{name}-seed{seed}.json"

    def run(self, stage1: tuple[str, ...], stage2: tuple[str, ...] | None, seed: int) -> dict:
        """Train and evaluate one run, or read it back when it is finished already."""
        name = slug(stage1, stage2)
        path = self.record_path(name, seed)
        if path.is_file():
            return json.loads(path.read_text())
        start = time.perf_counter()
        run_dir = self.work / "runs" / f"seed{seed}" / name
        if stage2 is None:
            cfg = self.config(1, stage1, seed)
        else:
            cfg = self.config(
                2, (*stage1, *stage2, f"stage.global_ckpt='{self.stage1_ckpt(stage1, seed)}'"), seed
            )
        result = train_stage(cfg, run_dir)
        self.trained += 1
        metrics = run_evaluation(evaluation_config(cfg, result["best_ckpt"]), run_dir / "evaluate")
        record = {
            "run": name,
            "seed": seed,
            "overrides": [*stage1, *(stage2 or ())],
            "stage": result["stage"],
            "ckpt": result["best_ckpt"],
            "heldout_image_acc": result["best_val_score"],  # image accuracy: the default selection
            "study": {k: v["study"] for k, v in metrics.items() if "study" in v},
            "localization": metrics.get("localization"),
            "mean_box": mean_box(run_dir) if stage2 is not None else None,
            "flops": flops_per_image(result["best_ckpt"], cfg.data.source_size),
            "seconds": time.perf_counter() - start,
        }
        path.write_text(json.dumps(record, indent=2) + "\n")
        return record

    def stage1_ckpt(self, stage1: tuple[str, ...], seed: int) -> str:
        record = self.run(stage1, None, seed)
        if not Path(record["ckpt"]).is_file():  # read back from an earlier machine: train it again
            self.record_path(record["run"], seed).unlink()
            record = self.run(stage1, None, seed)
        return record["ckpt"]

    def boxes_available(self, table: dict[str, list[dict]]) -> bool:
        return all(
            (
                self.work / "runs" / f"seed{r['seed']}" / r["run"] / "evaluate" / "boxes.png"
            ).is_file()
            for r in (table[PAPER.name][0], table[BEST][0])
        )

    def row_runs(self, row: Row, seed: int, fixed_box: float) -> dict:
        stage2 = row.stage2
        if stage2 is not None:
            stage2 = tuple(o.replace("{box}", f"{fixed_box:.3f}") for o in stage2)
        return self.run(row.stage1, stage2, seed)

    def run_all(self) -> dict[str, list[dict]]:
        """Every row for every seed; the fixed box and the best combination need earlier rows."""
        table: dict[str, list[dict]] = {}
        for seed in self.seeds:
            paper = self.row_runs(PAPER, seed, 0.5)
            box = float(sum(paper["mean_box"]) / 2)
            for row in ROWS:
                table.setdefault(row.name, []).append(self.row_runs(row, seed, box))
        best = best_combination(table)
        table[BEST] = [self.row_runs(best, seed, 0.5) for seed in self.seeds]
        self.best = best
        return table


def best_combination(table: dict[str, list[dict]]) -> Row:
    """Variants whose mean hold-out accuracy beats the paper's, merged best first where they agree."""
    paper = mean([r["heldout_image_acc"] for r in table[PAPER.name]])
    ranked = sorted(
        (row for row in ROWS if row.variant),
        key=lambda row: -mean([r["heldout_image_acc"] for r in table[row.name]]),
    )
    chosen = [
        row for row in ranked if mean([r["heldout_image_acc"] for r in table[row.name]]) > paper
    ]
    stage1: tuple[str, ...] = ()
    stage2: list[str] = []
    for row in chosen or ranked[:1]:
        keys = {o.split("=")[0] for o in stage2}
        if any(o.split("=")[0] in keys for o in row.stage2 or ()):
            continue
        stage2 += row.stage2 or ()
        stage1 = stage1 or row.stage1
    return Row(BEST, "kalm", stage1, tuple(stage2))


def mean_box(run_dir: Path) -> list[float]:
    """KALM's mean (w, h) over the last training epoch, from the run's own logs (no valid data)."""
    logs = pd.concat(pd.read_csv(f) for f in sorted(run_dir.glob("csv/version_*/metrics.csv")))
    logs = logs.dropna(subset=["train/box_w"])
    last = logs[logs["epoch"] == logs["epoch"].max()]
    return [float(last["train/box_w"].mean()), float(last["train/box_h"].mean())]


def flops_per_image(ckpt: str, source_size: int) -> float:
    """Floating-point operations of one image's inference (all of the run's scores)."""
    module = load_stage(ckpt)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.score(torch.zeros(1, 3, source_size, source_size))
    return float(counter.get_total_flops())


def mean(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).mean())


def spread(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return float(torch.tensor(values, dtype=torch.float64).std()) if len(values) > 1 else 0.0


def summarize(table: dict[str, list[dict]], rows: list[Row]) -> list[dict]:
    """Per row: mean and spread of the study figures, box figures, cost relative to the global CNN."""
    base_flops = mean([r["flops"] for r in table[ROWS[0].name]])
    summary = []
    for row in rows:
        runs = table[row.name]
        figures = {
            m: [r["study"][row.score][m] for r in runs] for m in ("auroc", "accuracy", "kappa")
        }
        located = [
            r["localization"] for r in runs if r.get("localization") and row.score != "global"
        ]
        summary.append(
            {
                "row": row.name,
                "score": row.score,
                "seeds": [r["seed"] for r in runs],
                **{f"{m}_mean": mean(v) for m, v in figures.items()},
                **{f"{m}_sd": spread(v) for m, v in figures.items()},
                "auroc_runs": figures["auroc"],
                "hit_rate": mean([loc["hit_rate"] for loc in located]) if located else None,
                "mean_iou": mean([loc["mean_iou"] for loc in located]) if located else None,
                "heldout_acc": mean([r["heldout_image_acc"] for r in runs]),
                "cost": mean([r["flops"] for r in runs]) / base_flops,
                "minutes": sum(r["seconds"] for r in runs) / 60,
                "overrides": runs[0]["overrides"],
            }
        )
    return summary


def centre_box_hits(root: Path) -> tuple[float, int]:
    """Share of lesioned valid images whose lesion centre lies in the centred box of half the sides."""
    lesions = read_lesion_boxes(root)
    valid = set(read_mura_index(root, "valid")["path"])
    lesions = lesions[lesions["path"].isin(valid)]
    hits = 0
    for row in lesions.itertuples():
        with Image.open(row.path) as image:
            width, height = image.size
        cx, cy = (row.x0 + row.x1) / 2, (row.y0 + row.y1) / 2
        hits += width / 4 <= cx <= 3 * width / 4 and height / 4 <= cy <= 3 * height / 4
    return hits / max(1, len(lesions)), len(lesions)


def verdict(summary: list[dict], name: str, against: str) -> str:
    """'beats', 'loses to' or 'ties with': a difference counts when it exceeds both spreads added."""
    a = next(s for s in summary if s["row"] == name)
    b = next(s for s in summary if s["row"] == against)
    diff = a["auroc_mean"] - b["auroc_mean"]
    if len(a["seeds"]) < 2:
        return f"{diff:+.3f} AUROC against {against} (one seed: no spread, no verdict)"
    margin = a["auroc_sd"] + b["auroc_sd"]
    word = "beats" if diff > margin else "loses to" if -diff > margin else "ties with"
    return (
        f"{word} {against} ({diff:+.3f} AUROC; spreads {a['auroc_sd']:.3f} + {b['auroc_sd']:.3f})"
    )


def best_text(table: dict[str, list[dict]], best: Row) -> str:
    """How the best combination came about: variants beating the paper on the hold-out, merged."""
    paper = mean([r["heldout_image_acc"] for r in table[PAPER.name]])
    beating = [
        row.name
        for row in ROWS
        if row.variant and mean([r["heldout_image_acc"] for r in table[row.name]]) > paper
    ]
    overrides = " ".join(best.stage1 + best.stage2) or "the paper's settings"
    if beating:
        return f"`{overrides}`: the variants whose hold-out accuracy beat the paper's ({', '.join(beating)})."
    return (
        f"`{overrides}`. No variant beat the paper's hold-out accuracy ({paper:.1%}), so the best "
        "single variant on the hold-out stands in, and its row repeats that variant's runs."
    )


def goal(summary: list[dict]) -> str:
    """The study's goal: hit rate >= 90%, IoU >= 0.3, and a fused score beating the global CNN at
    the input size and both controls by more than the spreads."""
    met = []
    for s in summary:
        if s["score"] != "kalm" or s["row"].startswith("control") or s["hit_rate"] is None:
            continue
        beats = all(
            verdict(summary, s["row"], other).startswith("beats")
            for other in (
                ROWS[0].name,
                "control: whole image to CNN_l",
                "control: fixed centre box",
            )
        )
        if s["hit_rate"] >= 0.9 and s["mean_iou"] >= 0.3 and beats:
            met.append(s["row"])
    best_hit = max(
        (s for s in summary if s["hit_rate"] is not None and not s["row"].startswith("control")),
        key=lambda s: s["hit_rate"],
    )
    return (
        "**Goal** (box holds the lesion centre in >= 90% of lesioned images, mean IoU >= 0.3, fused "
        "score beating the global CNN at input size and both controls by more than the spreads): "
        + (f"met by {', '.join(met)}." if met else "met by no row.")
        + f" Highest hit rate outside the controls: {best_hit['row']}, {best_hit['hit_rate']:.1%} "
        f"(IoU {best_hit['mean_iou']:.3f})."
    )


def plot(summary: list[dict], out: Path) -> None:
    names = [s["row"] for s in summary]
    figure, axis = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2), dpi=110)
    for i, s in enumerate(summary):
        axis.scatter(s["auroc_runs"], [i] * len(s["auroc_runs"]), color="grey", s=12, zorder=2)
        axis.errorbar(
            s["auroc_mean"], i, xerr=s["auroc_sd"], fmt="o", color="C0", capsize=3, zorder=3
        )
    axis.set_yticks(range(len(names)), names)
    axis.invert_yaxis()
    axis.set_xlabel(
        "study AUROC on the synthetic valid split (mean ± sd over seeds; grey: each seed)"
    )
    figure.tight_layout()
    figure.savefig(out / "auroc.png")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 5), dpi=110)
    for s in summary:
        axis.errorbar(s["cost"], s["auroc_mean"], yerr=s["auroc_sd"], fmt="o", capsize=3)
        axis.annotate(
            s["row"],
            (s["cost"], s["auroc_mean"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    axis.set_xlabel("inference cost per image (FLOPs, global CNN at input size = 1)")
    axis.set_ylabel("study AUROC")
    figure.tight_layout()
    figure.savefig(out / "auroc_cost.png")
    plt.close(figure)


def boxes_side_by_side(table: dict[str, list[dict]], work: Path, best: str, out: Path) -> None:
    """The first seed's boxes.png (red: KALM box, green: true lesion) for the paper and the best row."""
    tiles = []
    for name in (PAPER.name, best):
        run = table[name][0]
        with Image.open(
            work / "runs" / f"seed{run['seed']}" / run["run"] / "evaluate" / "boxes.png"
        ) as image:
            tiles.append(image.convert("RGB"))
    gap = 16
    canvas = Image.new(
        "RGB", (sum(t.width for t in tiles) + gap, max(t.height for t in tiles)), "white"
    )
    canvas.paste(tiles[0], (0, 0))
    canvas.paste(tiles[1], (tiles[0].width + gap, 0))
    canvas.save(out / "boxes.png")


def fmt(value: float | None, sd: float | None = None, percent: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:.1%}" if percent else f"{value:.3f}"
    return text + (
        f" ± {sd:.3f}"
        if sd is not None and not percent
        else f" ± {sd:.1%}"
        if sd is not None
        else ""
    )


def write_results(study: Study, table: dict[str, list[dict]], command: str, wall: float) -> str:
    rows = [*ROWS, study.best]
    summary = summarize(table, rows)
    plot(summary, study.out)
    if study.boxes_available(table):
        boxes_side_by_side(table, study.work, BEST, study.out)
    cfg = study.config(2, (), study.seeds[0])
    share, lesioned = centre_box_hits(Path(cfg.data.root))
    runs = {(r["run"], r["seed"]): r for records in table.values() for r in records}
    lines = [
        "# The localizer study (synthetic, `experiment=study`)",
        "",
        "Generated by `experiments/synthetic/study.py`; every figure comes from the runs listed in",
        "`results/` (one JSON per run and seed). Study-level figures on the synthetic valid split;",
        "checkpoints and the best combination were chosen on a patient-disjoint hold-out of train.",
        "",
        "## Setting",
        "",
        f"- Data: {cfg.data.synthetic.train_studies} train / {cfg.data.synthetic.valid_studies} valid studies, "
        f"lesions `{list(cfg.data.synthetic.lesions)}` (fine stripes of period 3 px that add no brightness), "
        f"limbs shifted by up to {cfg.data.synthetic.layout_jitter:.0%}, abnormal rate {cfg.data.synthetic.abnormal_rate}.",
        f"- A fixed centred box of half the image's sides holds the lesion centre in **{share:.1%}** of the "
        f"{lesioned} lesioned valid images.",
        f"- ResNet18 from scratch, CNN input {cfg.data.image_size} px, source {cfg.data.source_size} px, "
        f"batch {cfg.data.batch_size}, {cfg.trainer.max_epochs} epochs per stage, Adam lr "
        f"{cfg.model.optimizer.lr}, hold-out {cfg.data.val_from_train:.0%} of train patients.",
        f"- Seeds: {', '.join(map(str, study.seeds))}. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}.",
        f"- Compute: {len(runs)} runs, {sum(r['seconds'] for r in runs.values()) / 60:.1f} min of "
        f"training and evaluation summed (this invocation: {wall / 60:.1f} min wall, "
        f"{study.trained} runs trained, the rest read back).",
        f"- Best combination: {best_text(table, study.best)}",
        "",
        "## Results (mean ± sd over seeds)",
        "",
        "| row | score | AUROC | accuracy | kappa | hit rate | IoU | cost | hold-out acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['row']} | {s['score']} | {fmt(s['auroc_mean'], s['auroc_sd'])} | "
            f"{fmt(s['accuracy_mean'], s['accuracy_sd'], True)} | {fmt(s['kappa_mean'], s['kappa_sd'])} | "
            f"{fmt(s['hit_rate'], percent=True)} | {fmt(s['mean_iou'])} | {s['cost']:.2f}x | "
            f"{fmt(s['heldout_acc'], percent=True)} |"
        )
    lines += [
        "",
        "Hit rate: lesion centre inside the box; IoU: box against the true lesion box (lesioned valid",
        "images). Cost: inference FLOPs per image over the global CNN's at the input size. Per-seed AUROC",
        "is in `auroc.png` and in `results/`.",
        "",
        "## What the runs say",
        "",
        "A difference counts when it exceeds the two rows' spreads added together.",
        "",
    ]
    for s in summary:
        if s["score"] != "kalm":
            continue
        lines.append(
            f"- **{s['row']}** "
            + "; ".join(
                verdict(summary, s["row"], other)
                for other in (
                    ROWS[0].name,
                    "control: whole image to CNN_l",
                    "control: fixed centre box",
                )
                if other != s["row"]
            )
            + "."
        )
    lines += ["", goal(summary)]
    if (study.out / DISCUSSION).is_file():
        notes = (study.out / DISCUSSION).read_text().strip()
        lines += ["", "## Why (written after reading the runs)", "", notes]
    lines += [
        "",
        "![AUROC per row](auroc.png)",
        "",
        "![AUROC against cost](auroc_cost.png)",
        "",
        "![Boxes: the paper's KALM (left) and the best combination (right); red KALM, green truth](boxes.png)",
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
    (study.out / "RESULTS.md").write_text(text)
    (study.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: for tests, not for results"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="where results/, RESULTS.md and plots go"
    )
    parser.add_argument(
        "--work", type=Path, default=Path("outputs/study"), help="data and checkpoints"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    study = Study(args.out.resolve(), args.work.resolve(), args.seeds, args.quick)
    table = study.run_all()
    command = "python experiments/synthetic/study.py " + " ".join(
        (["--quick"] if args.quick else []) + ["--seeds", *map(str, args.seeds)]
    )
    write_results(study, table, command, time.perf_counter() - start)
    print(f"{study.trained} runs trained; results in {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
