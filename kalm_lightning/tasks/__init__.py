"""What each command does with its composed config: train, evaluate, predict. The entry points
(`python -m kalm_lightning.train` and the others) only compose the config and call these."""
