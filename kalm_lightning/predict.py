"""`python -m kalm_lightning.predict ckpt_path=CKPT images=PNG|FOLDER|MURA_ROOT` (also kalm-predict)."""

from kalm_lightning.cli import hydra_entry

main = hydra_entry("predict", "kalm-predict", "kalm_lightning.tasks.predict:run_prediction")

if __name__ == "__main__":
    main()
