"""The benchmark: KALM against a plain timm classifier, side by side, and the loader against the step.

`python experiments/bench/bench.py` (or `make bench`) times, after warm-up and alternating the
contenders round by round so that machine noise hits them alike (medians over the rounds):

- a plain timm classifier's training step and forward, at the CNN input size and at the source size;
- the stage-1 and stage-2 training steps and KALM inference, through the project's own modules
  (`KALMStage.training_loss`, the loss a training step takes); stage 2 also with CNN_g's feature
  maps read from a cache (`stage.cache_global`), and with the shipped navigator (`localizer=
  navigator`, past its warm-up: its teacher pass included);
- the localizer + crop share of the stage-2 step;
- stage.cache_global's build (seconds and MB per 1,000 images) against stage 1's training forward
  over the same images, and against CNN_g's inference forward over them (what the store adds);
- image loading: PNG decode + resize against the cache, and the DataModule's train loader in
  images/s (cache at the source size, its workers) against the images/s the stage-1 step consumes;
- peak memory of each training step, each in its own subprocess (on CUDA the allocator's peak;
  on the CPU the growth of the process's peak resident memory over its size before the model).

It prints a table and writes bench.json (every figure and the ratios named in RATIOS).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf

from kalm_lightning.data.cache import ImageCache
from kalm_lightning.data.features import GLOBAL_FEATURES, FeatureCache
from kalm_lightning.data.images import load_grayscale, resize_square
from kalm_lightning.data.index import read_mura_index
from kalm_lightning.data.mura import MURADataModule
from kalm_lightning.data.synthetic import SyntheticSettings, generate_synthetic_mura
from kalm_lightning.data.transfer import model_input
from kalm_lightning.evaluation.studies import KALM
from kalm_lightning.models.kalm import crop, resize_view
from kalm_lightning.runs import write_atomic
from kalm_lightning.settings import config_dir
from kalm_lightning.stages.global_stage import GlobalStage
from kalm_lightning.stages.kalm_stage import KALMStage

RATIOS = (
    "stage2_over_plain_train",
    "stage2_cached_over_plain_train",
    "navigator_stage2_over_plain_train",
    "kalm_over_plain_infer",
    "localize_crop_share",
    "cache_speedup",
    "stage2_over_plain_memory",
    "loader_over_step_throughput",
    "feature_cache_over_stage1_forward",
    "feature_cache_over_inference_forward",
)
TRAINING = ("plain_train@input", "stage2_train")  # the steps whose memory is measured


@dataclass
class Settings:
    backbone: str = "resnet18"
    batch: int = 8
    image_size: int = 224
    source_size: int = 448
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile: bool = False
    rounds: int = 9
    warmup: int = 1
    loader_studies: int = 160
    loader_batch: int = 64
    workers: int = 2
    loader_epochs: int = 4
    decode_images: int = 48
    navigator: str = (
        ""  # options of the navigator contender over its shipped ones: "train_crops=1,..."
    )


def autocast(s: Settings):
    device = torch.device(s.device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")


def prepared(module: torch.nn.Module, s: Settings) -> torch.nn.Module:
    module = module.to(s.device)
    if s.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if s.compile:
        module.compile()  # in place, as model.compile=true does in training
    return module


def inputs(s: Settings, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(s.batch, 3, size, size, generator=generator).to(s.device)
    if s.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 2, (s.batch,), generator=generator).to(s.device)


def train_step(model: Callable, images: torch.Tensor, labels: torch.Tensor, params, s: Settings):
    """forward, cross-entropy, backward, Adam: what every training contender does per batch."""
    optimizer = torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast(s):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def loss_step(loss: Callable[[], torch.Tensor], params, s: Settings) -> Callable[[], None]:
    """A stage's own training loss, backward, Adam."""
    optimizer = torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast(s):
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step


def infer_step(model: Callable, images: torch.Tensor, s: Settings) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad(), autocast(s):
            model(images)

    return step


def stage_nodes(s: Settings, stage: int, localizer: str | None = None) -> tuple[dict, dict]:
    """A stage's `net` and `preprocessing` nodes (the rest as the model's defaults): stage 1's net
    is the backbone, stage 2's a KALMNet around it, with the paper's localizer or one of
    conf/localizer/ as shipped."""
    net = {"name": s.backbone} if stage == 1 else {"backbone": s.backbone}
    if localizer is not None:
        node = OmegaConf.load(config_dir() / "localizer" / f"{localizer}.yaml")
        options = OmegaConf.from_dotlist([o for o in s.navigator.split(",") if o])
        net["localizer"] = OmegaConf.to_container(OmegaConf.merge(node, options))
    return net, {"image_size": s.image_size, "source_size": s.source_size}


def stage2_step(s: Settings, source, labels, localizer: str | None, cached: bool):
    """KALMStage.training_loss on a batch past the warm-up epochs (epoch 1), then backward and
    Adam; cached: CNN_g's feature maps come with the batch, as the cache's loader gives them."""
    stage2 = prepared(KALMStage(*stage_nodes(s, 2, localizer)), s)
    batch = {"image": source, "label": labels, "body_part": ["XR_WRIST"] * len(labels)}
    if cached:
        with torch.no_grad(), autocast(s):
            view = resize_view(source, s.image_size)
            batch[GLOBAL_FEATURES] = stage2.net.global_cnn.forward_features(view).float()
    return loss_step(lambda: stage2.training_loss(batch, epoch=1)[0], stage2.parameters(), s)


def build(s: Settings, name: str) -> Callable[[], None]:
    """One contender's step, with its own model and inputs (so that its memory is its own)."""
    small, labels = inputs(s, s.image_size)
    source, _ = inputs(s, s.source_size)
    if name.startswith("plain"):
        plain = prepared(timm.create_model(s.backbone, pretrained=False, num_classes=2), s)
        images = small if name.endswith("@input") else source
        if name.startswith("plain_train"):
            return train_step(plain, images, labels, plain.parameters(), s)
        return infer_step(plain.eval(), images, s)
    if name == "stage1_train":
        stage1 = prepared(GlobalStage(*stage_nodes(s, 1)), s)
        return train_step(stage1, source, labels, stage1.parameters(), s)
    if name in ("stage2_train", "stage2_cached_train", "navigator_stage2_train"):
        localizer = "navigator" if name.startswith("navigator") else None
        return stage2_step(s, source, labels, localizer, cached=name == "stage2_cached_train")
    stage2 = prepared(KALMStage(*stage_nodes(s, 2)), s)
    if name == "kalm_infer":
        stage2.eval()
        return infer_step(lambda x: stage2.score(x)[KALM], source, s)
    with torch.no_grad(), autocast(s):
        features = stage2.net.global_cnn.forward_features(resize_view(source, s.image_size))
    features.requires_grad_(True)

    def localize_crop() -> None:  # the part of the stage-2 step that is KALM's own
        with autocast(s):
            boxes = stage2.net.localizer(features, stage2.net.class_weights())
            patches = crop(source, boxes, s.image_size)
        patches.float().sum().backward()

    return localize_crop


CONTENDERS = (
    "plain_train@input",
    "plain_train@source",
    "stage1_train",
    "stage2_train",
    "stage2_cached_train",
    "navigator_stage2_train",
    "plain_infer@input",
    "plain_infer@source",
    "kalm_infer",
    "localize_crop",
)


def sync(s: Settings) -> None:
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()


def time_contenders(s: Settings) -> dict[str, float]:
    """Median seconds per step of every contender, over rounds that alternate them."""
    steps = {name: build(s, name) for name in CONTENDERS}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(s.warmup + s.rounds):
        for name, step in steps.items():
            sync(s)
            start = time.perf_counter()
            step()
            sync(s)
            if round_ >= s.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_mb(s: Settings, name: str) -> float:
    """This process's peak memory for one contender's steps, over what it held before the model."""
    cuda = s.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else resident_bytes()
    step = build(s, name)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    sync(s)
    if cuda:
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (peak_resident_bytes() - before) / 2**20


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    """This process's peak resident memory since it started (VmHWM; unlike getrusage's
    ru_maxrss, it does not carry over the parent's peak through fork and exec)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def memory_in_subprocesses(s: Settings) -> dict[str, float]:
    """Each training contender's peak memory, measured in a fresh process of its own (the
    processes run side by side: what each holds is its own, whatever the other does)."""
    args = [
        f"--{'' if v else 'no-'}{k.replace('_', '-')}"
        if isinstance(v, bool)
        else f"--{k.replace('_', '-')}={v}"
        for k, v in asdict(s).items()
    ]
    children = {
        name: subprocess.Popen(
            [sys.executable, __file__, *args, f"--memory-of={name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in TRAINING
    }
    found = {}
    for name, child in children.items():
        out, err = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"measuring the memory of {name} failed: {err.strip()[-2000:]}")
        found[name] = float(out.strip().splitlines()[-1])
    return found


def decode_against_cache(s: Settings, root: Path) -> dict[str, float]:
    """Milliseconds per image to decode and resize a PNG, against reading it from the cache."""
    paths = read_mura_index(root, "train")["path"].tolist()[: s.decode_images]
    cache = ImageCache(root / "decode_cache", paths, s.source_size, "stretch")
    cache.build()

    def decode() -> None:
        for path in paths:
            resize_square(load_grayscale(path), s.source_size)

    def cached() -> None:
        for i in range(len(paths)):
            cache.get(i)

    rounds = {"decode": [], "cached": []}
    for round_ in range(3):
        for name, step in (("decode", decode), ("cached", cached)):
            start = time.perf_counter()
            step()
            if round_:
                rounds[name].append(time.perf_counter() - start)
    decode_s, cached_s = (statistics.median(rounds[k]) / len(paths) for k in ("decode", "cached"))
    return {"decode_ms": 1e3 * decode_s, "cache_ms": 1e3 * cached_s, "speedup": decode_s / cached_s}


def tree_data(s: Settings, root: Path, batch: int, **options) -> MURADataModule:
    """The generated tree's DataModule, set up for fit: the decode cache at the source size, the
    bench's workers."""
    datamodule = MURADataModule(
        str(root),
        image_size=s.image_size,
        source_size=s.source_size,
        batch_size=batch,
        num_workers=s.workers,
        pin_memory=s.device.startswith("cuda"),
        cache=True,
        cache_dir=str(root / "cache"),
        **options,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def loader_throughput(s: Settings, root: Path) -> dict[str, float]:
    """Images per second out of the DataModule's train loader: cache at the source size, uint8
    pixels, its workers; the first epoch (workers starting) is not counted."""
    datamodule = tree_data(s, root, s.loader_batch, augment={"hflip": 0.5, "rotate_degrees": 10})
    loader = datamodule.train_dataloader()
    images, seconds = 0, 0.0
    for epoch in range(s.loader_epochs + 1):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = 0
        for batch in loader:
            count += len(batch["label"])
        if epoch:
            images, seconds = images + count, seconds + time.perf_counter() - start
    del loader  # its persistent workers stop here, not during the timings that follow
    batch = {k: v.to(s.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    times = []
    for _ in range(4):  # the first call warms up
        sync(s)
        start = time.perf_counter()
        model_input(batch, datamodule.mean, datamodule.std)
        sync(s)
        times.append(time.perf_counter() - start)
    return {
        "loader_images_per_s": images / seconds,
        "device_transforms_ms_per_image": 1e3 * statistics.median(times[1:]) / len(batch["label"]),
        "images": len(datamodule.dataset("train")),
    }


def feature_cache_build(s: Settings, root: Path) -> dict[str, float]:
    """stage.cache_global's build over the tree's training images (KALMStage.global_features,
    as a stage 2 runs it, into a FeatureCache), against two references over the same images,
    through the same loader and device transform: the forward half of a stage-1 training epoch
    (GlobalStage.training_loss in train mode with autograd recording, no backward: what the
    goal "<= 1 epoch of stage 1's forward time" compares with), and CNN_g's inference forward
    with nothing stored (the same computation as the build, so the build over it is what the
    store adds). Seconds and MB per 1,000 images; each reference runs before and after the build,
    and the mean of the two is the reference."""
    datamodule = tree_data(s, root, s.batch)
    stage2 = prepared(KALMStage(*stage_nodes(s, 2)), s).eval()
    stage1 = prepared(GlobalStage(*stage_nodes(s, 1)), s).train()
    train, cnn = datamodule.dataset("train"), stage2.net.global_cnn
    shape = (cnn.num_features, *cnn.feature_size(s.image_size))
    cache = FeatureCache(root / "features", train.paths, {"bench": 1}, shape)

    def features():
        return stage2.global_features(
            datamodule.every_image("train"), datamodule, lambda: autocast(s)
        )

    def stage1_forward() -> int:
        images = 0
        for batch in datamodule.every_image("train"):
            if batch is None or len(batch["label"]) < 2:  # train-mode BatchNorm needs two
                continue
            batch = datamodule.on_after_batch_transfer(move_data_to_device(batch, s.device), 0)
            with autocast(s):
                stage1.training_loss(batch)  # its graph is dropped here, as backward would
            images += len(batch["label"])
        return images

    def timed(work: Callable[[], object]) -> tuple[float, object]:
        start = time.perf_counter()
        done = work()
        sync(s)
        return time.perf_counter() - start, done

    def per_1000(work: Callable[[], int]) -> float:
        seconds, images = timed(work)
        return seconds / images * 1000

    def forward() -> int:
        return sum(len(ids) for ids, _ in features())

    inference = [per_1000(forward)]
    training = [per_1000(stage1_forward)]
    build = timed(lambda: cache.build(features()))[0] / cache.count * 1000
    training.append(per_1000(stage1_forward))
    inference.append(per_1000(forward))
    return {
        "feature_cache_s_per_1000": build,
        "stage1_forward_epoch_s_per_1000": statistics.mean(training),
        "forward_epoch_s_per_1000": statistics.mean(inference),
        "feature_cache_mb_per_1000": cache.nbytes / cache.count * 1000 / 2**20,
    }


def run(s: Settings) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generate_synthetic_mura(
            root,
            SyntheticSettings(train_studies=s.loader_studies, valid_studies=2, seed=0),
            workers=max(1, s.workers),
        )
        loading = {**decode_against_cache(s, root), **loader_throughput(s, root)}
        loading.update(feature_cache_build(s, root))
    seconds = time_contenders(s)
    memory = memory_in_subprocesses(s)
    step_images_per_s = s.batch / seconds["stage1_train"]
    ratios = {
        "stage2_over_plain_train": seconds["stage2_train"] / seconds["plain_train@input"],
        "stage2_cached_over_plain_train": seconds["stage2_cached_train"]
        / seconds["plain_train@input"],
        "navigator_stage2_over_plain_train": seconds["navigator_stage2_train"]
        / seconds["plain_train@input"],
        "kalm_over_plain_infer": seconds["kalm_infer"] / seconds["plain_infer@input"],
        "localize_crop_share": seconds["localize_crop"] / seconds["stage2_train"],
        "cache_speedup": loading["speedup"],
        "stage2_over_plain_memory": memory["stage2_train"] / memory["plain_train@input"],
        "loader_over_step_throughput": loading["loader_images_per_s"] / step_images_per_s,
        "feature_cache_over_stage1_forward": loading["feature_cache_s_per_1000"]
        / loading["stage1_forward_epoch_s_per_1000"],
        "feature_cache_over_inference_forward": loading["feature_cache_s_per_1000"]
        / loading["forward_epoch_s_per_1000"],
    }
    return {
        "settings": asdict(s),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if s.device.startswith("cuda") else "cpu",
        "step_s": seconds,
        "peak_memory_mb": memory,
        "loading": {**loading, "stage1_step_images_per_s": step_images_per_s},
        **ratios,
    }


def print_table(result: dict) -> None:
    s = result["settings"]
    print(
        f"{s['backbone']}, batch {s['batch']}, {s['image_size']} / {s['source_size']} px, "
        f"{s['device']} ({result['device_name']}), {s['precision']}"
        f"{', channels_last' if s['channels_last'] else ''}{', compiled' if s['compile'] else ''}"
        f"{', navigator ' + s['navigator'] if s['navigator'] else ''}; "
        f"medians of {s['rounds']} alternating rounds"
    )
    print(f"{'contender':<24}{'ms / step':>12}{'images / s':>12}{'peak MB':>10}")
    for name, seconds in result["step_s"].items():
        memory = result["peak_memory_mb"].get(name)
        print(
            f"{name:<24}{seconds * 1e3:>12.1f}{s['batch'] / seconds:>12.1f}"
            f"{'' if memory is None else f'{memory:.0f}':>10}"
        )
    loading = result["loading"]
    print(
        f"loading at {s['source_size']} px: decode {loading['decode_ms']:.2f} ms / image, cache "
        f"{loading['cache_ms']:.3f} ms / image; train loader {loading['loader_images_per_s']:.0f} "
        f"images / s (batch {s['loader_batch']}, {s['workers']} workers, {loading['images']} "
        f"images) against {loading['stage1_step_images_per_s']:.1f} consumed by the stage-1 step"
    )
    print(
        f"stage.cache_global: built in {loading['feature_cache_s_per_1000']:.1f} s and "
        f"{loading['feature_cache_mb_per_1000']:.0f} MB per 1,000 images (over them, stage 1's "
        f"training forward: {loading['stage1_forward_epoch_s_per_1000']:.1f} s; CNN_g's inference "
        f"forward, nothing stored: {loading['forward_epoch_s_per_1000']:.1f} s)"
    )
    for name in RATIOS:
        print(f"{name:<36}{result[name]:>10.3f}")


def settings_from(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, default in asdict(Settings()).items():
        flag = f"--{field.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--memory-of", choices=TRAINING, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fields = {k: getattr(args, k) for k in asdict(Settings())}
    return Settings(**fields), args


def main(argv: list[str] | None = None) -> None:
    s, args = settings_from(argv)
    torch.manual_seed(0)
    if args.memory_of:  # one contender in this fresh process: print its peak memory
        print(peak_memory_mb(s, args.memory_of))
        return
    result = run(s)
    print_table(result)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
