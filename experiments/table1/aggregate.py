"""The paper's Table 1 from a sweep: `python experiments/table1/aggregate.py outputs/mura/multirun/<ts>`.

Reads every `evaluate/metrics.json` under the sweep (one per backbone with experiment=paper) and
prints our study-level figures beside the paper's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAPER = {  # Table 1 of Huang et al. (ICASSP 2020): accuracy, AUROC, kappa at study level
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
SUFFIX = {"global": "g", "local": "l", "kalm": "KALM"}


def rows(sweep: Path) -> list[str]:
    lines = []
    for metrics_file in sorted(sweep.rglob("evaluate/metrics.json")):
        config = (metrics_file.parent.parent / "stage2" / "config.yaml").read_text()
        backbone = next(
            line.split(":", 1)[1].strip()
            for line in config.splitlines()
            if line.startswith("  name:")
        )
        metrics = json.loads(metrics_file.read_text())
        for score in ("global", "local", "kalm"):
            m = metrics[score]["study"]
            paper = PAPER.get((backbone, score))
            ours = f"{m['accuracy']:.1%} | {m['auroc']:.3f} | {m['kappa']:.3f}"
            theirs = f"{paper[0]:.1%} | {paper[1]:.3f} | {paper[2]:.3f}" if paper else "- | - | -"
            lines.append(f"| {backbone}_{SUFFIX[score]} | {ours} | {theirs} |")
    return lines


if __name__ == "__main__":
    header = "| model | accuracy | AUROC | kappa | paper accuracy | paper AUROC | paper kappa |\n|---|---|---|---|---|---|---|"
    print("\n".join([header, *rows(Path(sys.argv[1]))]))
