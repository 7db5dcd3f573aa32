"""Configs compose for every group combination; the CLI prints them and refuses bad choices in one line."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from kalm_lightning.argv import check_group_overrides, name_jobs_by_swept_overrides
from kalm_lightning.config import (
    compose_config,
    config_dir,
    group_choices,
    quote_numeric_choices,
)
from kalm_lightning.data import MURADataModule
from kalm_lightning.data.images import resize_square
from kalm_lightning.errors import UserError

GROUPS = {
    name: group_choices(name)
    for name in ("backbone", "stage", "localizer", "scheduler", "hardware", "data", "logger")
}
PRINT_CONFIG = ["--cfg", "job", "backbone=vgg16", "stage=2", "hardware=ddp"]


def assert_prints_stage2_config(command: list[str], cwd: Path, env: dict | None = None) -> None:
    """The acceptance command prints a composed VGG16 / stage 2 / DDP config."""
    result = subprocess.run(
        [*command, *PRINT_CONFIG], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "name: vgg16" in result.stdout
    assert "_target_: kalm_lightning.training.launcher.ReportingDDPStrategy" in result.stdout
    assert "_target_: kalm_lightning.stages.KALMStage" in result.stdout


def test_groups_hold_the_documented_choices() -> None:
    assert GROUPS == {
        "backbone": ["inception_v4", "resnet18", "vgg16"],
        "stage": ["1", "2"],
        "localizer": [
            "brightest",
            "fixed",
            "full",
            "kalm",
            "multicrop",
            "navigator",
            "random",
            "sampling",
        ],
        "scheduler": ["cosine", "multistep", "none", "plateau"],
        "hardware": ["cpu", "ddp", "ddp_cpu", "gpu"],
        "data": ["mura", "synthetic"],
        "logger": ["csv", "mlflow", "none", "tensorboard", "wandb"],
    }


def covering_pairs(groups: dict[str, list[str]]) -> list[dict[str, str]]:
    """Choices, one per group, such that every pair of choices of two groups appears together at
    least once (greedy: each next combination covers the most pairs not yet covered)."""
    names = list(groups)
    pairs = lambda combo: {  # noqa: E731
        (a, combo[a], b, combo[b]) for a, b in itertools.combinations(names, 2)
    }
    every = [dict(zip(names, c, strict=True)) for c in itertools.product(*groups.values())]
    uncovered = set().union(*(pairs(c) for c in every))
    chosen = []
    while uncovered:
        best = max(every, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def test_every_pair_of_choices_composes() -> None:
    """Every choice of every group composes with every choice of every other group."""
    accelerators = {"cpu": "cpu", "ddp_cpu": "cpu", "gpu": "gpu", "ddp": "gpu"}
    targets = {"1": "GlobalStage", "2": "KALMStage"}
    for choice in covering_pairs(GROUPS):
        cfg = compose_config("train", [f"{k}={v}" for k, v in choice.items()])
        assert cfg.backbone.name == choice["backbone"]
        assert cfg.model._target_.endswith(targets[choice["stage"]])
        assert (
            cfg.localizer._target_
            == OmegaConf.load(config_dir() / "localizer" / f"{choice['localizer']}.yaml")._target_
        )
        assert cfg.trainer.accelerator == accelerators[choice["hardware"]]
        assert cfg.data.name == choice["data"]
        assert set(cfg.logger or {}) == ({choice["logger"]} - {"none"})


@pytest.mark.parametrize("experiment", ["demo", "paper"])
def test_experiments_compose(experiment: str) -> None:
    cfg = compose_config("train", [f"experiment={experiment}", "backbone=vgg16"])
    assert cfg.pipeline is True
    assert cfg.backbone.name == "vgg16"
    if experiment == "paper":
        assert (cfg.model.optimizer.lr, cfg.trainer.max_epochs, cfg.data.batch_size) == (
            1e-5,
            30,
            64,
        )
        assert (cfg.data.image_size, cfg.data.source_size, cfg.model.scheduler.milestones) == (
            224,
            448,
            [20],
        )


def test_numeric_group_choices_are_quoted_for_hydra() -> None:
    assert quote_numeric_choices(["stage=2", "seed=3", "stage=1,2"]) == [
        "stage='2'",
        "seed=3",
        "stage='1','2'",
    ]


def test_unknown_choice_is_named_with_the_valid_ones() -> None:
    message = check_group_overrides(["backbone=resnet1000"])
    assert message.startswith(
        "unknown backbone 'resnet1000': choose one of inception_v4, resnet18, vgg16"
    )
    assert check_group_overrides(["backbone=resnet18,vgg16", "backbone.name=convnext_tiny"]) is None


def test_cli_prints_composed_config(tmp_path: Path) -> None:
    assert_prints_stage2_config([sys.executable, "-m", "kalm_lightning.train"], tmp_path)


def test_console_script_prints_composed_config(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "kalm-train"
    assert script.exists(), "kalm-train is not installed beside this Python"
    assert_prints_stage2_config([str(script)], tmp_path)


@pytest.mark.parametrize(
    "args", [["--cfg", "job"], ["data=mura"], ["backbone=nope"], ["data.batch_size=0"]]
)
def test_answers_that_run_no_task_import_neither_torch_nor_lightning(
    tmp_path: Path, args: list[str]
) -> None:
    """A printed config, a missing required setting, an unknown option, a value out of range: no
    task runs, so the seconds of loading torch, Lightning and timm are not spent."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kalm_lightning.train", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"hydra", "omegaconf", "kalm_lightning.cli"} <= imported
    assert not imported & {"torch", "lightning", "timm"}


def test_bad_backbone_exits_with_one_line(tmp_path: Path) -> None:
    result = run_cli("train", ["backbone=nope"], tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "kalm-train: unknown backbone 'nope': choose one of inception_v4, resnet18, vgg16 "
        "(or any timm model through backbone.name=...)"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_mura_root_exits_with_one_line(tmp_path: Path) -> None:
    result = run_cli("train", ["data=mura", "~callbacks.progress_bar"], tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "kalm-train: setting data.root is required: pass data.root=..."
    )


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["data.resize=weird"], "data.resize='weird' is not one of stretch, pad"),
        (["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
        (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
        (["model.optimizer.lr=-1"], "model.optimizer.lr=-1 must be > 0"),
        pytest.param(
            ["backbone=inception_v4", "data.image_size=32", "data.source_size=64"],
            "data.image_size=32 is too small for inception_v4",
            marks=pytest.mark.slow,
        ),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be >= 1"),
        (
            ["trainer.precision=bogus"],
            "Lightning refused the trainer settings: Precision 'bogus' is invalid",
        ),
        (["-m", "hparams_search=optuna", "stage=1"], "hparams_search=optuna searches stage 2"),
        (["data.synthetic.cue=1.5"], "data.synthetic.cue=1.5 must be >= 0 and <= 1"),
        (
            ["data.synthetic.decoys=3"],
            "data.synthetic.decoys=3 and data.synthetic.attribute=0.0 need",
        ),
    ],
)
def test_bad_settings_give_one_line_on_the_main_process(
    tmp_path: Path, overrides: list[str], line: str
) -> None:
    """One line, exit 2, no traceback: at composition (settings.py) for the numbers and choices,
    where the model and the Trainer are built for the backbone's minimum size and the precision."""
    result = run_cli("train", [*overrides, "data.synthetic.train_studies=4"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"kalm-train: {line}")
    assert "Traceback" not in result.stdout + result.stderr


def test_one_rule_refuses_at_composition_and_in_the_python_classes() -> None:
    """settings.py owns each rule; the composed config and the classes built from Python use it."""
    with pytest.raises(UserError, match=r"^data\.batch_size=0 must be >= 1$"):
        compose_config("train", ["data.batch_size=0"])
    with pytest.raises(UserError, match=r"^data\.batch_size=0 must be >= 1$"):
        MURADataModule(root="unused", batch_size=0)
    with pytest.raises(UserError, match=r"^data\.resize='weird' is not one of stretch, pad$"):
        resize_square(np.zeros((4, 4), np.uint8), 2, "weird")
    compose_config("train", ["trainer.max_epochs=null"])  # null: Lightning's default


def test_wheel_runs_outside_the_repository(tmp_path: Path) -> None:
    """A non-editable install finds its configs as package data, run from another directory."""
    repo = Path(__file__).resolve().parents[1]
    build = tmp_path / "build"
    skip = {".venv", ".git", "outputs", "data", "kalm_lightning.egg-info", "build", "dist"}
    shutil.copytree(
        repo, build, ignore=lambda d, names: skip & set(names) if Path(d) == repo else set()
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(build),
        ],
        check=True,
    )
    wheel = next((tmp_path / "dist").glob("kalm_lightning-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    probe = subprocess.run(
        [sys.executable, "-c", "from kalm_lightning.config import config_dir; print(config_dir())"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().startswith(str(target))
    assert_prints_stage2_config([sys.executable, "-m", "kalm_lightning.train"], elsewhere, env)


def test_multirun_jobs_are_named_by_swept_overrides_only() -> None:
    argv = [
        "-m",
        "backbone=resnet18,vgg16",
        "data.root=/x",
        "~callbacks.progress_bar",
        "seed=range(1,3)",
    ]
    named = name_jobs_by_swept_overrides(argv)
    assert (
        named[-1]
        == "hydra.job.config.override_dirname.exclude_keys=['data.root','callbacks.progress_bar']"
    )
    assert name_jobs_by_swept_overrides(["backbone=vgg16"]) == ["backbone=vgg16"]


def test_table1s_extra_row_is_the_localizer_the_study_names_best() -> None:
    """`make table1`'s BEST_VARIANT is the stage-2 overrides of the localizer that the committed
    localizer study names best (experiments/localizers/summary.json, chosen on the hold-out), and
    they compose in `experiment=paper` with each setting where the override puts it."""
    repo = Path(__file__).resolve().parents[1]
    best = json.loads((repo / "experiments" / "localizers" / "summary.json").read_text())["best"]
    makefile = (repo / "Makefile").read_text()
    variant = re.search(r"^BEST_VARIANT \?= (.*)$", makefile, re.MULTILINE).group(1).split()
    assert variant == best["overrides"], f"set BEST_VARIANT to the study's best: {best['row']}"
    cfg = compose_config("train", ["experiment=paper", "stage=2", *variant])
    choice = dict(o.split("=", 1) for o in variant if "." not in o.split("=")[0])
    expected = OmegaConf.load(config_dir() / "localizer" / f"{choice['localizer']}.yaml")
    assert cfg.localizer._target_ == expected._target_
    for key, value in (o.split("=", 1) for o in variant if "." in o.split("=")[0]):
        assert str(OmegaConf.select(cfg, key)) == value
    assert (cfg.data.image_size, cfg.data.source_size) == (224, 448)  # still the paper's protocol


@pytest.mark.slow
def test_serve_without_its_extra_is_refused_in_one_line(tmp_path: Path) -> None:
    """In an environment with the package and what composing needs, but not the serve extra:
    one line naming the extra, before torch would load."""
    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "hydra-core", "omegaconf", "setuptools>=77"], check=True)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(repo)], check=True)
    lacking = subprocess.run([str(venv / "bin" / "python"), "-c", "import litserve"])
    assert lacking.returncode != 0  # the environment this test is about
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "kalm_lightning.serve", "ckpt_path=model.ckpt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "kalm-serve: serve needs the serve extra: pip install 'kalm-lightning[serve]'"
    )
