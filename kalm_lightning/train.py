"""`python -m kalm_lightning.train [backbone=vgg16] [stage=2] [experiment=demo] ...` (also kalm-train)."""

from kalm_lightning.cli import hydra_entry

main = hydra_entry("train", "kalm-train", "kalm_lightning.pipeline:run_training")

if __name__ == "__main__":
    main()
