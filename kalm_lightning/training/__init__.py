"""Training machinery below the LightningModules: checkpoint files, preemption, loggers, DDP jobs."""
