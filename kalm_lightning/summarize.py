"""`python -m kalm_lightning.summarize SWEEP_DIR` (also kalm-summarize): one table of a sweep's jobs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kalm_lightning.errors import UserError
from kalm_lightning.evaluation.summary import log_to_wandb, summarize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (or any folder of runs)")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the table once, as a W&B run in the sweep's group",
    )
    parser.add_argument("--project", default="kalm-lightning", help="the W&B project")
    args = parser.parse_args(argv)
    try:
        table = summarize(args.sweep_dir)
    except UserError as error:
        print(f"kalm-summarize: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(table.to_string(index=False))
    if args.wandb:
        log_to_wandb(table, args.sweep_dir, args.project)
    print(f"written to {args.sweep_dir / 'summary.md'} and {args.sweep_dir / 'summary.csv'}")


if __name__ == "__main__":
    main()
