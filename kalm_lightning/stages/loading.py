"""A trained stage back from its checkpoint, whichever stage wrote it."""

from __future__ import annotations

from kalm_lightning.errors import UserError
from kalm_lightning.stages.base import StageModule
from kalm_lightning.stages.global_stage import GlobalStage
from kalm_lightning.stages.kalm_stage import KALMStage
from kalm_lightning.training.checkpoints import WEIGHTS_ONLY, read_trained

STAGES: dict[int, type[StageModule]] = {1: GlobalStage, 2: KALMStage}


def load_stage(
    path: str,
    map_location: str = "cpu",
    setting: str = "ckpt_path",
    inference: str | None = None,
) -> StageModule:
    """A trained stage-1 or stage-2 module from its checkpoint, without touching the network: the
    network is built from the config node the checkpoint records, weights from the file.

    inference: how a navigator picks its crop at inference, instead of the recorded way
    ("mil": every anchor scored, the most abnormal kept; `localizer.inference` of the navigator)."""
    hparams = read_trained(path, setting)["hyper_parameters"]
    stage = STAGES[hparams["stage"]]
    net = stage.offline(hparams["net"])
    if inference is not None:
        localizer = net.get("localizer") or {}
        if "inference" not in localizer:
            raise UserError(
                f"inference={inference}: {path} holds no navigator (localizer "
                f"{localizer.get('_target_', 'kalm')}), whose anchors it would score"
            )
        net = {**net, "localizer": {**localizer, "inference": inference}}
    module = stage.load_from_checkpoint(
        path, map_location=map_location, net=net, weights_only=WEIGHTS_ONLY
    )
    return module.eval()
