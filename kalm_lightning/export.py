"""`python -m kalm_lightning.export ckpt_path=CKPT format=onnx|export [output=FILE]` (also kalm-export)."""

from kalm_lightning.cli import hydra_entry

main = hydra_entry("export", "kalm-export", "kalm_lightning.tasks.export:run_export")

if __name__ == "__main__":
    main()
