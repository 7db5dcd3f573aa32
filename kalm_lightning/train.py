"""`python -m kalm_lightning.train [backbone=vgg16] [stage=2] [experiment=demo] ...` (also kalm-train)."""

import hydra
from omegaconf import DictConfig

from kalm_lightning.cli import one_line_errors
from kalm_lightning.config import config_dir, prepare_argv, register_resolvers
from kalm_lightning.training import run_training

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@one_line_errors("kalm-train")
def _train(cfg: DictConfig) -> float | None:
    return run_training(cfg)


def main() -> None:
    prepare_argv("kalm-train")
    _train()


if __name__ == "__main__":
    main()
