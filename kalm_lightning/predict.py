"""`python -m kalm_lightning.predict ckpt_path=CKPT images=PNG|FOLDER|MURA_ROOT` (also kalm-predict)."""

import hydra
from omegaconf import DictConfig

from kalm_lightning.cli import one_line_errors
from kalm_lightning.config import config_dir, prepare_argv, register_resolvers
from kalm_lightning.prediction import run_prediction

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
@one_line_errors("kalm-predict")
def _predict(cfg: DictConfig) -> None:
    run_prediction(cfg)


def main() -> None:
    prepare_argv("kalm-predict")
    _predict()


if __name__ == "__main__":
    main()
