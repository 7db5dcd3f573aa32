"""`python -m kalm_lightning.serve ckpt_path=CKPT [port=8000] [host=127.0.0.1] ...` (also kalm-serve)."""

from kalm_lightning.cli import hydra_entry

main = hydra_entry("serve", "kalm-serve", "kalm_lightning.tasks.serve:run_server")

if __name__ == "__main__":
    main()
