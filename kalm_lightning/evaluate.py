"""`python -m kalm_lightning.evaluate ckpt_path=CKPT` or `predictions=FILE.csv` (also kalm-evaluate)."""

from kalm_lightning.cli import hydra_entry
from kalm_lightning.tasks.evaluate import run_evaluation

main = hydra_entry("evaluate", "kalm-evaluate", run_evaluation)

if __name__ == "__main__":
    main()
