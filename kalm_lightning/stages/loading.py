"""A trained stage back from its checkpoint, whichever stage wrote it."""

from __future__ import annotations

from kalm_lightning.errors import UserError
from kalm_lightning.models.localizers.base import Localizer
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

    inference="mil": a stage-2 model scores every candidate box of its localizer with CNN_l and
    keeps the most abnormal (`KALMNet.mil`: the ceiling of a localizer that chooses among boxes)."""
    hparams = read_trained(path, setting)["hyper_parameters"]
    stage = STAGES[hparams["stage"]]
    module = stage.load_from_checkpoint(
        path,
        map_location=map_location,
        net=stage.offline(hparams["net"]),
        weights_only=WEIGHTS_ONLY,
    )
    if inference is not None:
        localizer = getattr(module.net, "localizer", None)
        has = localizer is not None and type(localizer).candidates is not Localizer.candidates
        if not has:
            what = type(localizer).__name__ if localizer is not None else "none: a stage-1 model"
            raise UserError(
                f"inference={inference}: {path} has no candidate boxes to score (localizer "
                f"{what}); mil scores the anchors of a navigator or a random anchor"
            )
        module.inference = inference
    return module.eval()
