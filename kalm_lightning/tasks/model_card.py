"""The model card export writes beside a model: what a governance board files (Markdown) and what
a system reads (JSON, in the spirit of MONAI bundle metadata)."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kalm_lightning.runs import METRICS_FILE, Run, write_atomic
from kalm_lightning.stages.base import StageModule

INTENDED_USE = (
    "Research on abnormality detection in musculoskeletal radiographs (MURA's seven upper-limb "
    "study types), and evaluation of that research before any clinical study."
)
NOT_FOR = (
    "Not a medical device and not for diagnosis: its outputs must not decide or change the care of "
    "a patient. Any clinical use needs its own validation on the site's data, under the site's "
    "governance and the applicable regulation."
)
LIMITATIONS = [
    "Trained and judged on the data named under training_data only; performance on other "
    "scanners, populations, body parts or image processing is unknown until measured there.",
    "A study's probability is the mean (or max) of its images'; studies with missing views are "
    "scored on the views present.",
    "The box and the heatmaps show where the model looked, not where a finding is; they are not "
    "a segmentation and were not trained on annotated regions.",
    "The threshold and temperature were chosen on a hold-out of the training data; a site should "
    "check them on its own data before relying on a sensitivity or specificity.",
    "Inputs must be prepared exactly as `preprocessing` says; anything else changes the scores.",
]


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def training_record(ckpt_path: str) -> tuple[dict | None, Path | None]:
    """The resolved config of the run a checkpoint came from, and a pipeline's metrics file."""
    run = Run(Path(ckpt_path).resolve().parent.parent)
    config = (
        OmegaConf.to_container(OmegaConf.load(run.config_file))
        if run.config_file.is_file()
        else None
    )
    pipeline = Run(run.path.parent).evaluation / METRICS_FILE  # stage2/ beside evaluate/
    return config, pipeline if pipeline.is_file() else None


def card_data(stage: StageModule, ckpt_path: str, meta: dict, metrics_path: str | None) -> dict:
    config, found = training_record(ckpt_path)
    metrics_file = Path(metrics_path) if metrics_path else found
    metrics = json.loads(metrics_file.read_text()) if metrics_file else None
    data = (config or {}).get("data", {})
    return {
        "name": f"kalm-lightning {stage.backbone_name} stage {stage.stage}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(Path(ckpt_path).resolve()),
        "intended_use": INTENDED_USE,
        "not_for": NOT_FOR,
        "task": "binary classification of a radiograph study: abnormal (1) or normal (0)",
        "training_data": {
            key: data.get(key) for key in ("name", "root", "val_from_train", "resize", "synthetic")
        }
        if config
        else "unknown (no config.yaml beside the checkpoint's run)",
        "metrics": metrics if metrics else "not evaluated: pass metrics=PATH/metrics.json",
        "metrics_file": str(metrics_file) if metrics_file else None,
        "operating_point": dict(stage.operating),
        "preprocessing": meta,
        "network_data_format": {
            "inputs": {"images": {"shape": meta["shape"], "dtype": "float32", "normalised": True}},
            "outputs": {name: {"dtype": "float32"} for name in meta["outputs"]},
        },
        "limitations": LIMITATIONS,
        "config": config,
        "software": {
            "kalm-lightning": package_version("kalm-lightning"),
            "torch": torch.__version__,
            "lightning": package_version("lightning"),
            "timm": package_version("timm"),
            "python": platform.python_version(),
        },
    }


def figures_line(block: dict, name: str) -> str:
    m = block["study"]
    return f"| {name} | {m['accuracy']:.1%} | {m['auroc']:.3f} | {m['kappa']:.3f} | {m['n']} |"


def markdown(card: dict) -> str:
    point = card["operating_point"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"Created {card['created']} from `{card['checkpoint']}`.",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        f"**{card['not_for']}**",
        "",
        "## Training data",
        "",
        "```json",
        json.dumps(card["training_data"], indent=2),
        "```",
        "",
        "## Operating point and calibration",
        "",
        f"- Rule `{point['rule']}`: a study is called abnormal when its probability is >= "
        f"{point['threshold']:.4f}.",
        f"- Temperature {point['temperature']:.4f} (1 = uncalibrated), applied to `prob`.",
        f"- Chosen on: {point.get('fitted_on', 'not fitted (the fixed threshold)')}.",
        "",
        "## Metrics",
        "",
    ]
    metrics = card["metrics"]
    if isinstance(metrics, dict):
        lines += ["| score | accuracy | AUROC | kappa | studies |", "|---|---|---|---|---|"]
        lines += [
            figures_line(b, k)
            for k, b in metrics.items()
            if isinstance(b, dict) and "study" in b and "accuracy" in b["study"]
        ]
        if "operating_point" in metrics:
            at = metrics["operating_point"]["study"]
            ci = at.get("intervals", {})
            lines += [
                "",
                "At the operating point (study level, 95% bootstrap intervals where computed):",
                "",
            ]
            for name in ("sensitivity", "specificity", "ppv", "npv", "f1"):
                interval = ci.get(name)
                bounds = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
                lines.append(f"- {name}: {at[name]:.3f}{bounds}")
        if "calibration" in metrics:
            cal = metrics["calibration"]
            lines.append(
                f"- expected calibration error (studies): {cal['ece_study_calibrated']:.3f}"
            )
        lines += ["", f"From `{card['metrics_file']}`."]
    else:
        lines.append(str(metrics))
    lines += [
        "",
        "## Preprocessing",
        "",
        *[f"{i}. {step}" for i, step in enumerate(card["preprocessing"]["steps"], 1)],
        "",
        "## Known limitations",
        "",
        *[f"- {item}" for item in card["limitations"]],
        "",
        "## Software",
        "",
        *[f"- {name} {value}" for name, value in card["software"].items()],
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    stage: StageModule, ckpt_path: str, meta: dict, model_path: Path, metrics: str | None
) -> Path:
    """model_card.json and model_card.md beside the exported model; returns the Markdown's path."""
    card = card_data(stage, ckpt_path, meta, metrics)
    folder = model_path.parent
    write_atomic(folder / "model_card.json", json.dumps(card, indent=2, default=str) + "\n")
    write_atomic(folder / "model_card.md", markdown(card))
    return folder / "model_card.md"
