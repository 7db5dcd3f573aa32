"""What a run of the localizer study costs, counted by torch's FlopCounterMode on its checkpoint:
one image's inference (every score), and one image's training step through the stage's own
`training_loss`, averaged over the run's epochs."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from kalm_lightning.stages import load_stage


def inference_flops(ckpt: str, cfg, inference: str | None = None) -> float:
    """Floating-point operations of one image's inference (every score of the run)."""
    module = load_stage(ckpt, inference=inference)
    size = cfg.data.source_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.score(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def training_flops(ckpt: str, cfg) -> float:
    """Floating-point operations of training on one image (forward and backward of the stage's
    own `training_loss`), averaged over the run's epochs (a navigator's warm-up costs less than
    its distillation)."""
    module = load_stage(ckpt).train()
    size, epochs = cfg.data.source_size, int(cfg.trainer.max_epochs)
    batch = {  # two images: BatchNorm trains on a batch
        "image": torch.zeros(2, 3, size, size),
        "label": torch.zeros(2, dtype=torch.long),
        "body_part": ["XR_WRIST", "XR_WRIST"],
    }
    total = 0.0
    for epoch in range(epochs):
        with FlopCounterMode(display=False) as counter:
            loss, _ = module.training_loss(batch, epoch)
            loss.backward()
        module.zero_grad()
        total += counter.get_total_flops() / len(batch["label"])
    return total / epochs


def costs(ckpt: str, cfg) -> dict[str, float]:
    return {
        "inference_flops": inference_flops(ckpt, cfg),
        "training_flops": training_flops(ckpt, cfg),
    }
