"""The benchmark at tiny sizes: every figure it promises lands in bench.json, finite.

Timings themselves belong to `make bench`, never to a test: this only checks that each contender
runs through the real modules and that the report is complete."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import check, load_script, run_module, run_script

BENCH = "experiments/bench/bench.py"
CONTENDERS, RATIOS, TRAINING = (
    getattr(load_script(BENCH), name) for name in ("CONTENDERS", "RATIOS", "TRAINING")
)

TINY_BENCH = [
    "--batch=2",
    "--image-size=32",
    "--source-size=64",
    "--device=cpu",
    "--rounds=1",
    "--warmup=0",
    "--loader-studies=4",
    "--loader-batch=4",
    "--workers=0",
    "--loader-epochs=1",
    "--decode-images=4",
]


@pytest.mark.slow
def test_bench_writes_every_figure_finite(tmp_path: Path) -> None:
    result = check(run_script(BENCH, TINY_BENCH, tmp_path))
    report = json.loads((tmp_path / "bench.json").read_text())
    for name in RATIOS:
        assert math.isfinite(report[name]) and report[name] > 0, name
        assert name in result.stdout
    assert set(report["step_s"]) == set(CONTENDERS)
    assert set(report["peak_memory_mb"]) == set(TRAINING)
    figures = [*report["step_s"].values(), *report["peak_memory_mb"].values()]
    figures += [v for v in report["loading"].values() if isinstance(v, float)]
    assert all(math.isfinite(v) and v > 0 for v in figures)


def test_the_flop_count_gives_each_training_step_over_a_plain_one(tmp_path: Path) -> None:
    """experiments/bench/flops.py at tiny sizes: each step's counted GFLOPs and its ratio to the
    plain step; stage 2 does more than a plain step, the navigator (teacher and two crops) more
    than the paper's stage 2, its cheaper variant less than the shipped one, and the navigator
    taught by its own crops (no teacher's pass) less than either."""
    navigators = ("", "teacher_size=crops,train_crops=1", "teacher_from=crops,train_crops=1")
    args = ["--image-size=32", "--source-size=64", *(f"--navigator={n}" for n in navigators)]
    result = run_module("experiments.bench.flops", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()[-len(navigators) :]
    figures = dict(zip(navigators, map(json.loads, lines), strict=True))
    shipped, cheaper = figures[""], figures["teacher_size=crops,train_crops=1"]
    from_crops = figures["teacher_from=crops,train_crops=1"]
    assert all(math.isfinite(v) and v > 0 for v in shipped["gflops"].values())
    assert shipped["plain_train@input_over_plain"] == 1
    assert 1 < shipped["stage2_train_over_plain"] < shipped["navigator_stage2_train_over_plain"]
    ratio = "navigator_stage2_train_over_plain"
    assert from_crops[ratio] < cheaper[ratio] < shipped[ratio]
