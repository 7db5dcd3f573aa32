"""`python -m kalm_lightning.evaluate ckpt_path=CKPT` or `predictions=FILE.csv` (also kalm-evaluate)."""

import hydra
from omegaconf import DictConfig

from kalm_lightning.cli import one_line_errors
from kalm_lightning.config import config_dir, prepare_argv, register_resolvers
from kalm_lightning.evaluation import run_evaluation

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
@one_line_errors("kalm-evaluate")
def _evaluate(cfg: DictConfig) -> None:
    run_evaluation(cfg)


def main() -> None:
    prepare_argv("kalm-evaluate")
    _evaluate()


if __name__ == "__main__":
    main()
