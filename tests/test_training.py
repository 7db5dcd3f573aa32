"""Both training stages through the real command line: auto stage-1 lookup, freezing, multirun,
DDP on two CPU processes, W&B offline and resuming."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from conftest import RUNS, TINY_NET, TINY_RUN, check, run_cli, running_trainings
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kalm_lightning.config import compose_config
from kalm_lightning.errors import UserError
from kalm_lightning.runs import Run
from kalm_lightning.stages.loading import load_stage
from kalm_lightning.tasks.train import find_stage1_checkpoint
from kalm_lightning.training.checkpoints import TRAINING_STATE, drop_training_state


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_stage2_finds_stage1_and_keeps_cnn_g_bit_identical(trained: dict[str, Path]) -> None:
    stage1 = json.loads((trained["stage1"] / "result.json").read_text())
    stage2 = json.loads((trained["stage2"] / "result.json").read_text())
    assert stage1["stage"] == 1 and stage2["stage"] == 2
    config = OmegaConf.load(trained["stage2"] / "config.yaml")
    assert config.stage.global_ckpt == "auto"
    before, after = state(Path(stage1["best_ckpt"])), state(Path(stage2["last_ckpt"]))
    globals_ = {k.removeprefix("net."): v for k, v in before.items()}
    trained_global = {
        k.removeprefix("net.global_cnn."): v
        for k, v in after.items()
        if k.startswith("net.global_cnn.")
    }
    assert globals_.keys() == trained_global.keys()
    assert any("running_mean" in k for k in globals_)  # BatchNorm buffers are compared too
    for key, value in globals_.items():
        assert torch.equal(value, trained_global[key]), key
    # What stage 2 trains moved away from where the same seed starts it.
    pl.seed_everything(config.seed, workers=True)
    initial = instantiate(config.model, global_ckpt=stage1["best_ckpt"]).state_dict()
    for key in (
        "net.localizer.fc_w.weight",
        "net.localizer.fc_h.weight",
        "net.local_cnn.fc.weight",
        "net.local_cnn.conv.conv1.0.weight",  # the stem
    ):
        assert not torch.equal(initial[key], after[key]), key


def test_cnn_l_starts_from_a_stage2_checkpoint(trained: dict[str, Path], tmp_path: Path) -> None:
    """stage.local_init=PATH: CNN_l starts as that stage-2 run's CNN_l; the run's own checkpoint
    loads without the file; a stage-1 checkpoint is refused in one line."""
    stage1 = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    stage2 = json.loads((trained["stage2"] / "result.json").read_text())["last_ckpt"]
    source = tmp_path / "source.ckpt"
    shutil.copy(stage2, source)
    config = OmegaConf.load(trained["stage2"] / "config.yaml")
    config.model.net.local_init = str(source)
    pl.seed_everything(config.seed + 1, workers=True)  # another draw than the source's start
    started = instantiate(config.model, global_ckpt=stage1).state_dict()
    local = {k: v for k, v in state(source).items() if k.startswith("net.local_cnn.")}
    assert local and all(torch.equal(started[k], v) for k, v in local.items())
    assert not torch.equal(started["net.local_cnn.fc.weight"], state(stage1)["net.fc.weight"])

    args = ["stage=2", *TINY_RUN, f"stage.global_ckpt={stage1}", f"stage.local_init={source}"]
    check(run_cli("train", [*args, "run_name=from-local"], tmp_path))
    (run,) = (tmp_path / RUNS / "from-local").iterdir()
    source.unlink()  # what the run trained is in its checkpoint; the file it started from is gone
    module = load_stage(str(run / "checkpoints/last.ckpt"))
    after = state(run / "checkpoints/last.ckpt")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in after.items())

    refused = run_cli("train", [*args[:-1], f"stage.local_init={stage1}"], tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"kalm-train: stage.local_init={stage1} is not a stage-2 checkpoint: CNN_l starts from a "
        "stage-2 run's CNN_l (or backbone | global)"
    )


def test_a_checkpoint_without_its_training_state_still_loads(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """drop_training_state (what the studies keep of a recorded run): the optimisers' and
    schedulers' state gone, the file smaller, the weights, preprocessing and operating point as
    they were, and the stage loads from it; training refuses to continue from it in one line."""
    kept = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
    slim = tmp_path / "slim.ckpt"
    shutil.copy(kept, slim)
    drop_training_state(str(slim))
    before = torch.load(kept, map_location="cpu", weights_only=True)
    after = torch.load(slim, map_location="cpu", weights_only=True)
    assert before["optimizer_states"] and before["lr_schedulers"]
    assert set(after) == set(before) - {"optimizer_states", "lr_schedulers"}
    assert after["operating_point"] == before["operating_point"]
    assert slim.stat().st_size < Path(kept).stat().st_size
    assert after["hyper_parameters"] == before["hyper_parameters"]
    module = load_stage(str(slim)).state_dict()
    assert module.keys() == before["state_dict"].keys()
    assert all(torch.equal(module[k], v) for k, v in before["state_dict"].items())

    stage1 = json.loads((trained["stage1"] / "result.json").read_text())["best_ckpt"]
    shutil.copy(stage1, slim)
    drop_training_state(str(slim))
    refused = run_cli("train", ["stage=1", *TINY_RUN, f"ckpt_path={slim}"], tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"kalm-train: ckpt_path={slim} holds the weights alone (no optimiser state), so training "
        "cannot continue from it: evaluate, predict or export it, or start a new run from it "
        "(stage.global_ckpt= for a stage-1 file, stage.local_init= for a stage-2 one)"
    )


def test_stage2_without_stage1_names_the_backbone_as_it_is_chosen(tmp_path: Path) -> None:
    """A backbone of the config group by its option, any other timm model by backbone.name."""
    cfg = compose_config("train", ["stage=2", f"paths.output_root={tmp_path}"])
    with pytest.raises(
        UserError, match=r"run `python -m kalm_lightning\.train stage=1 backbone=resnet18 "
    ):
        find_stage1_checkpoint(cfg)


def test_stage2_without_stage1_says_what_to_run(tmp_path: Path) -> None:
    result = run_cli("train", ["stage=2", *TINY_RUN], tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"kalm-train: no finished stage-1 run for backbone.name={TINY_NET} data=synthetic under "
            f"outputs: run `python -m kalm_lightning.train stage=1 backbone.name={TINY_NET} "
            "data=synthetic` first"
        )
    )


def test_run_directory_holds_config_checkpoints_logs_metrics(trained: dict[str, Path]) -> None:
    run = trained["stage2"]
    assert run.parent.name == "stage2" and run.parent.parent.name == TINY_NET
    for name in (
        "config.yaml",
        "result.json",
        "train.log",
        "checkpoints/last.ckpt",
        "csv/version_0/metrics.csv",
    ):
        assert (run / name).is_file(), name
    # One epoch: its best is also the last, and last.ckpt is the same file, not a second copy.
    best = Path(json.loads((run / "result.json").read_text())["best_ckpt"])
    assert best.name == "best-epoch00.ckpt" and best.samefile(run / "checkpoints/last.ckpt")
    metrics = pd.read_csv(run / "csv/version_0/metrics.csv")
    for column in (
        "train/loss",
        "val/image_acc",
        "val/kalm/study_auroc",
        "val/local/study_kappa",
        "val/global/study_accuracy",
    ):
        assert column in metrics.columns, column


@pytest.mark.slow
def test_multirun_over_two_backbones(tmp_path: Path) -> None:
    check(
        run_cli(
            "train",
            [
                "-m",
                "backbone=resnet18,vgg16",
                *(a for a in TINY_RUN if not a.startswith("backbone.name")),  # the two CNNs
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=2",
            ],
            tmp_path,
        )
    )
    jobs = sorted(
        p.name for p in (tmp_path / "outputs/synthetic/multirun").glob("*/*") if p.is_dir()
    )
    assert jobs == ["backbone=resnet18", "backbone=vgg16"]
    for job in (tmp_path / "outputs/synthetic/multirun").glob("*/backbone=*"):
        assert (job / "checkpoints/last.ckpt").is_file() and (job / "result.json").is_file()
        assert json.loads((job / "result.json").read_text())["backbone"] == job.name.split("=")[1]
    sweep = next((tmp_path / "outputs/synthetic/multirun").iterdir())
    check(run_cli("summarize", [str(sweep), "--wandb"], tmp_path))
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["job"]) == ["backbone=resnet18", "backbone=vgg16"]
    record = next(sweep.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    assert b"sweep_summary" in record and f"sweep-{sweep.name}".encode() in record
    assert summary["best_val"].is_monotonic_decreasing
    assert summary["overrides"].str.contains("backbone=").all()
    assert "| backbone=vgg16 |" in (sweep / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("debug", "extra"),
    [("fdr", []), ("limit", ["scheduler=plateau", "model.scheduler.patience=0"])],
)
def test_debug_configs_run(tmp_path: Path, debug: str, extra: list[str]) -> None:
    """The debug presets; with debug=limit (two epochs) the plateau scheduler, which Lightning
    steps with the monitored val/selection after each epoch's validation."""
    args = [a for a in TINY_RUN[:-1] if not a.startswith("trainer.max_epochs")]
    check(run_cli("train", [f"debug={debug}", *args, *extra], tmp_path))
    if extra:
        run = Run(next(tmp_path.glob("outputs/*/*/stage1/*")))
        (plateau,) = torch.load(run.last_checkpoint, weights_only=True)["lr_schedulers"]
        first = run.read_logs().dropna(subset=["val/selection"])["val/selection"].iloc[0]
        # last.ckpt is written at epoch 1's end: stepped once, with epoch 0's monitored figure
        assert plateau["last_epoch"] == 1 and plateau["best"] == pytest.approx(first)


@pytest.mark.slow
def test_selection_by_study_log_loss_after_a_warm_up(tmp_path: Path) -> None:
    """model.selection_metric=study_log_loss keeps the epoch of the lowest study log-loss on the
    validation split (logged negated: val/selection stays higher-is-better), and epochs before
    model.selection_from_epoch are never the one kept: the kept checkpoint's own predictions on
    that split give back its logged figure."""
    args = [a for a in TINY_RUN if not a.startswith("trainer.max_epochs")]
    selection = ["model.selection_metric=study_log_loss", "model.selection_from_epoch=1"]
    check(run_cli("train", [*args, "trainer.max_epochs=3", *selection], tmp_path))
    run = Run(next(tmp_path.glob(f"{RUNS}/stage1/*")))
    logged = run.read_logs().dropna(subset=["val/selection"]).set_index("epoch")["val/selection"]
    assert list(logged.index) == [0, 1, 2] and logged[0] == -float("inf")
    assert logged[1:].lt(0).all()
    best = int(logged[1:].idxmax())
    (kept,) = run.checkpoints.glob("best-*.ckpt")
    assert kept.name == f"best-epoch{best:02d}.ckpt"
    out = tmp_path / "scored"
    data = [a for a in TINY_RUN if a.startswith("data.")]
    check(run_cli("evaluate", [f"ckpt_path={kept}", f"hydra.run.dir={out}", *data], tmp_path))
    studies = pd.read_csv(out / "predictions_studies.csv")
    prob = studies["prob"].clip(1e-7, 1 - 1e-7)
    label = studies["label"]
    log_loss = -(label * prob.map(math.log) + (1 - label) * (1 - prob).map(math.log))
    assert log_loss.mean() == pytest.approx(-logged[best], abs=1e-5)


@pytest.mark.slow
def test_cosine_warm_up_and_weight_ema_from_the_command_line(tmp_path: Path) -> None:
    """scheduler=cosine: the logged learning rate follows warm-up then cosine, epoch by epoch;
    callbacks=ema: checkpoints hold the averaged weights, the live ones beside them."""
    args = [a for a in TINY_RUN if not a.startswith("trainer.max_epochs")]
    extra = ["scheduler=cosine", "model.scheduler.min_factor=0.1", "callbacks=ema"]
    check(
        run_cli(
            "train",
            [*args, "trainer.max_epochs=3", "trainer.limit_val_batches=1", *extra],
            tmp_path,
        )
    )
    run = Run(next(tmp_path.glob("outputs/*/*/stage1/*")))
    logs = run.read_logs()
    rates = logs["lr-Adam"].dropna().tolist()  # LearningRateMonitor: one row per epoch
    lr = 3e-4  # TINY_RUN's; one warm-up epoch, then cosine from lr to 0.1 lr over the other two
    assert rates == pytest.approx([lr / 2, lr, 0.1 * lr], rel=1e-6)
    checkpoint = torch.load(run.last_checkpoint, weights_only=True)
    assert checkpoint["averaging_state"]["n_averaged"].item() == 3 * 3  # every step
    averaged, live = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert averaged.keys() == live.keys()
    assert any(not torch.equal(averaged[k], live[k]) for k in averaged if k.endswith("weight"))
    # What a study keeps of it: the averaged weights, which the stage loads; the rest is gone.
    slim = tmp_path / "slim.ckpt"
    shutil.copy(run.last_checkpoint, slim)
    drop_training_state(str(slim))
    kept = torch.load(slim, weights_only=True)
    assert set(kept) == set(checkpoint) - set(TRAINING_STATE)
    assert {"current_model_state", "averaging_state"} <= set(TRAINING_STATE)
    module = load_stage(str(slim)).state_dict()
    assert all(torch.equal(module[k], v) for k, v in averaged.items())


@pytest.mark.slow
def test_multirun_with_ddp_runs_each_job_once_in_its_own_directory(tmp_path: Path) -> None:
    """Each job's second rank joins that job: one sweep directory, two job directories, no strays."""
    check(
        run_cli(
            "train",
            ["-m", "seed=1,2", "hardware=ddp_cpu", *TINY_RUN, "trainer.limit_train_batches=2"],
            tmp_path,
        )
    )
    sweeps = list((tmp_path / "outputs/synthetic/multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["seed=1", "seed=2"]
    for job in jobs:
        result = json.loads((sweeps[0] / job / "result.json").read_text())
        assert Path(result["best_ckpt"]).is_file() and result["run_dir"].endswith(job)
    stray = [p for p in tmp_path.rglob("*.log") if "train_ddp_process" in p.name]
    assert all(p.parent.parent == sweeps[0] for p in stray), stray
    assert running_trainings(tmp_path) == ""  # no rank outlives its job


@pytest.mark.slow
def test_ddp_cpu_runs_the_whole_pipeline(tmp_path: Path) -> None:
    result = check(
        run_cli(
            "train",
            [
                "experiment=demo",
                "hardware=ddp_cpu",
                "data.cache=false",
                *TINY_RUN,
                "trainer.limit_train_batches=2",
            ],
            tmp_path,
        )
    )
    run = next((tmp_path / RUNS / "demo").iterdir())
    for stage in ("stage1", "stage2"):
        assert (run / stage / "checkpoints/last.ckpt").is_file() and (
            run / stage / "result.json"
        ).is_file()
    assert (run / "evaluate/metrics.json").is_file() and (run / "evaluate/boxes.png").is_file()
    assert f"{TINY_NET}_KALM" in result.stdout and "boxes.png" in result.stdout


def test_wandb_offline_leaves_a_run_file(trained: dict[str, Path]) -> None:
    run = trained["stage1"]  # logged to CSV and W&B (offline) at once
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # The record file that `wandb sync` uploads: protobuf keeps the config and metric keys verbatim.
    records = files[0].read_bytes()
    assert "got exitcode: 0" in next(run.glob("wandb/offline-run-*/logs/debug.log")).read_text()
    for key in (
        b"backbone",
        TINY_NET.encode(),
        b"model_checkpoint",
        b"train/loss",
        b"val/image_acc",
        b"lr-Adam",
    ):
        assert key in records, key


@pytest.mark.slow
def test_submitit_launcher_runs_a_job(tmp_path: Path) -> None:
    """The SLURM launcher's plugin, run locally: the same code path as hydra/launcher=submitit_slurm."""
    check(
        run_cli(
            "train",
            [
                "-m",
                "hydra/launcher=submitit_local",
                "hydra.launcher.timeout_min=10",
                *TINY_RUN,
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
            ],
            tmp_path,
        )
    )
    jobs = list((tmp_path / "outputs/synthetic/multirun").glob("*/job0"))
    assert len(jobs) == 1 and (jobs[0] / "checkpoints/last.ckpt").is_file()


def test_stage2_logs_a_box_grid_to_tensorboard(trained: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next(trained["stage2"].rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0}).Reload()
    assert "val/kalm_boxes" in accumulator.Tags()["images"]
    image = accumulator.Images("val/kalm_boxes")[0]
    assert image.width >= 224 and image.height >= 224


@pytest.mark.slow
def test_optuna_search_runs_three_trials_and_the_summary_sorts_them(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    sweep = tmp_path / "optuna"
    check(
        run_cli(
            "train",
            [
                "-m",
                "hparams_search=optuna",
                "hydra.sweeper.n_trials=3",
                f"hydra.sweep.dir={sweep}",
                "model.selection_metric=image_accuracy",
                *(a for a in TINY_RUN if not a.startswith("model.optimizer.lr")),  # searched
            ],
            trained["work"],
        )
    )
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(best.best_params) >= {
        "model.optimizer.lr",
        "localizer.aggregation",
        "localizer.centre",
    }
    check(run_cli("summarize", [str(sweep)], tmp_path))
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 3 and summary["best_val"].is_monotonic_decreasing
    assert summary["best_val"].iloc[0] == pytest.approx(best.best_value)
    assert summary["overrides"].str.contains("localizer.centre=").all()


def test_train_log_has_one_line_per_epoch(trained: dict[str, Path]) -> None:
    """SLURM logs have no terminal: train.log says where each epoch ended, one line each."""
    for stage in ("stage1", "stage2"):
        lines = [
            line
            for line in (trained[stage] / "train.log").read_text().splitlines()
            if "] - epoch " in line
        ]
        assert len(lines) == 1, lines  # the tiny runs train one epoch
        assert re.search(
            r"\] - epoch 0/1: train/loss \d+\.\d{3}, val/selection \d+\.\d{3} \(best \d+\.\d{3}\), "
            r"\d+ s$",
            lines[0],
        ), lines[0]
