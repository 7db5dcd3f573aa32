"""`python -m kalm_lightning.evaluate ckpt_path=CKPT` or `predictions=FILE.csv` (also kalm-evaluate)."""

from kalm_lightning.cli import hydra_entry

main = hydra_entry("evaluate", "kalm-evaluate", "kalm_lightning.tasks.evaluate:run_evaluation")

if __name__ == "__main__":
    main()
