"""Counted FLOPs of the training steps the benchmark times, and their ratio to a plain step.

    python -m experiments.bench.flops [--navigator teacher_size=crops,train_crops=1 ...]
        [--image-size 224 --source-size 448]

Each contender is built as `bench.py` builds it (its defaults: ResNet18, 224 / 448 px), at batch 2,
and one step is counted with torch's FlopCounterMode after a first one. FLOPs do not depend on the
machine or its load, so this measures what a change of the step's work is worth where timings
cannot (a busy machine); `bench.py` remains the measure of time. `--navigator` may be given more
than once: one JSON line per navigator, in order, each as a run with that navigator alone would
print it (the steps without a navigator are counted once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from torch.utils.flop_counter import FlopCounterMode

from experiments.bench.bench import Settings, build

STEPS = ("plain_train@input", "stage2_train", "navigator_stage2_train")


def count(settings: Settings, name: str) -> float:
    """GFLOPs of one training step `name`, counted after a first step."""
    step = build(settings, name)
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--navigator",
        action="append",
        help="the navigator's options, as in bench.py (again for another; default: as shipped)",
    )
    parser.add_argument("--image-size", type=int, default=Settings.image_size)
    parser.add_argument("--source-size", type=int, default=Settings.source_size)
    args = parser.parse_args(argv)
    settings = Settings(
        batch=2, image_size=args.image_size, source_size=args.source_size, device="cpu"
    )
    shared = {name: count(settings, name) for name in STEPS[:-1]}
    for navigator in args.navigator or [""]:
        with_navigator = dataclasses.replace(settings, navigator=navigator)
        gflops = {**shared, STEPS[-1]: count(with_navigator, STEPS[-1])}
        plain = gflops["plain_train@input"]
        ratios = {f"{name}_over_plain": round(value / plain, 3) for name, value in gflops.items()}
        print(json.dumps({"gflops": {k: round(v, 2) for k, v in gflops.items()}, **ratios}))


if __name__ == "__main__":
    main()
