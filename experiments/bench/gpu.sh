#!/usr/bin/env bash
# One prepared run on a machine with a GPU (under 5 minutes on one H200-class card): for each paper
# backbone, batch 64 at 224 / 448, bf16 + channels_last against fp32, the bench's figures (training
# images/s of the plain classifier, stage 1 and stage 2 (plain, with CNN_g cached, with the shipped
# navigator), KALM inference, the loader against the
# step, peak memory), written to experiments/bench/gpu/*.json and as a table to RESULTS.md.
#   bash experiments/bench/gpu.sh   (DEVICE=cpu BATCH=2 ... OUT=/tmp/x RESULTS=/tmp/r.md: a dry run without a GPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-64}
IMAGE=${IMAGE:-224}
SOURCE=${SOURCE:-448}
ROUNDS=${ROUNDS:-5}
BACKBONES=${BACKBONES:-resnet18 vgg16 inception_v4}
EXTRA=${EXTRA:-}
OUT=${OUT:-experiments/bench/gpu}
RESULTS=${RESULTS:-experiments/bench/RESULTS.md}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
for backbone in $BACKBONES; do
  for precision in bf16 fp32; do
    layout=$([ "$precision" = bf16 ] && echo --channels-last || echo --no-channels-last)
    echo "== $backbone $precision ($(date +%T))"
    "$PYTHON" experiments/bench/bench.py --device "$DEVICE" --backbone "$backbone" --batch "$BATCH" \
      --image-size "$IMAGE" --source-size "$SOURCE" --precision "$precision" $layout \
      --rounds "$ROUNDS" --loader-batch 64 --workers 8 $EXTRA --out "$OUT/$backbone-$precision.json"
  done
done
"$PYTHON" - "$OUT" "$RESULTS" <<'PY'
import json, sys, datetime
from pathlib import Path

runs = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))]
card = runs[0]["device_name"]
first = runs[0]["settings"]
size = first["image_size"]
lines = [
    f"## {card}: {datetime.date.today()} (`experiments/bench/gpu.sh`, torch {runs[0]['torch']})",
    "",
    "Images/s of a training step (forward, cross-entropy, backward, Adam) and of inference, batch "
    f"{first['batch']}, {size} / {first['source_size']} px; loader: the DataModule's train loader "
    f"(cache, {first['workers']} workers, uint8 pixels), images/s; memory: peak allocated by the "
    "training step, MB.",
    "",
    f"| backbone | precision | plain train @{size} | stage 1 | stage 2 | stage 2 cached | navigator "
    f"stage 2 | plain infer @{size} | KALM infer | stage2 / plain | cached / plain | navigator / plain "
    "| KALM / plain infer | loader | loader / step | memory plain | memory stage 2 |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in runs:
    s, t, m = r["settings"], r["step_s"], r["peak_memory_mb"]
    ips = {k: s["batch"] / v for k, v in t.items()}
    lines.append(
        f"| {s['backbone']} | {s['precision']}{' channels_last' if s['channels_last'] else ''} "
        f"| {ips['plain_train@input']:.0f} | {ips['stage1_train']:.0f} | {ips['stage2_train']:.0f} "
        f"| {ips['stage2_cached_train']:.0f} | {ips['navigator_stage2_train']:.0f} "
        f"| {ips['plain_infer@input']:.0f} | {ips['kalm_infer']:.0f} "
        f"| {r['stage2_over_plain_train']:.2f} | {r['stage2_cached_over_plain_train']:.2f} "
        f"| {r['navigator_stage2_over_plain_train']:.2f} | {r['kalm_over_plain_infer']:.2f} "
        f"| {r['loading']['loader_images_per_s']:.0f} | {r['loader_over_step_throughput']:.2f} "
        f"| {m['plain_train@input']:.0f} | {m['stage2_train']:.0f} |"
    )
results = Path(sys.argv[2])
text = results.read_text() if results.exists() else "# Benchmark results\n"
results.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
PY
