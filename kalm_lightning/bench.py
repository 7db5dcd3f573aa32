"""Timings that matter for KALM: what the localizer and crop add to a stage-2 step, and what the
image cache saves over PNG decoding. `python -m kalm_lightning.bench [--device cuda --bf16]`."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kalm_lightning.data.cache import ImageCache
from kalm_lightning.data.images import load_grayscale, resize_square
from kalm_lightning.data.index import read_mura_index
from kalm_lightning.data.synthetic import SyntheticSettings, generate_synthetic_mura
from kalm_lightning.models.kalm import KALMNet, crop


def timed(step: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of step() over repeats, synchronising the device around each call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def localizer_crop_share(
    backbone: str,
    batch: int,
    image: int,
    source: int,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    repeats: int,
) -> dict:
    """A stage-2 training step (frozen CNN_g, CE on S_l, Adam) against KALM's own part of it."""
    net = KALMNet(backbone, image_size=image, source_size=source).to(device)
    net.global_cnn.requires_grad_(False).eval()
    memory = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    images = torch.randn(batch, 3, source, source, device=device).contiguous(memory_format=memory)
    labels = torch.randint(0, 2, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def train_step() -> None:
        with autocast:
            loss = F.cross_entropy(net(images).local_logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.no_grad(), autocast:
        features = net.global_cnn.forward_features(F.interpolate(images, size=image))

    def kalm_step() -> None:
        with autocast:
            patches = crop(images, net.localizer(features), image)
        patches.float().sum().backward()

    step, kalm = timed(train_step, device, repeats), timed(kalm_step, device, repeats)
    return {
        "backbone": backbone,
        "batch": batch,
        "image_size": image,
        "source_size": source,
        "device": str(device),
        "bf16": bf16,
        "channels_last": channels_last,
        "stage2_step_s": step,
        "localizer_crop_s": kalm,
        "share": kalm / step,
    }


def cache_speedup(images: int, size: int) -> dict:
    """Seconds per image to decode and resize a PNG, against reading it from the cache."""
    with tempfile.TemporaryDirectory() as folder:
        studies = max(4, images // 2)
        generate_synthetic_mura(
            folder, SyntheticSettings(train_studies=studies, valid_studies=1, seed=0), workers=2
        )
        paths = read_mura_index(folder, "train")["path"].tolist()[:images]
        cache = ImageCache(Path(folder) / "cache", paths, size, "stretch")
        cache.build()
        decode = timed(
            lambda: [resize_square(load_grayscale(p), size) for p in paths],
            torch.device("cpu"),
            3,
            1,
        )
        cached = timed(lambda: [cache.get(i) for i in range(len(paths))], torch.device("cpu"), 3, 1)
    n = len(paths)
    return {
        "images": n,
        "size": size,
        "decode_ms_per_image": 1e3 * decode / n,
        "cache_ms_per_image": 1e3 * cached / n,
        "speedup": decode / cached,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=448)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-images", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    results = {
        "kalm_share": localizer_crop_share(
            args.backbone,
            args.batch,
            args.image_size,
            args.source_size,
            torch.device(args.device),
            args.bf16,
            args.channels_last,
            args.repeats,
        ),
        "cache": cache_speedup(args.cache_images, args.source_size),
    }
    share, cache = results["kalm_share"], results["cache"]
    print(
        f"stage-2 step ({share['backbone']}, batch {share['batch']}, {share['image_size']}/{share['source_size']}, "
        f"{share['device']}): {share['stage2_step_s'] * 1e3:.1f} ms; localizer + crop "
        f"{share['localizer_crop_s'] * 1e3:.2f} ms = {share['share']:.2%} of the step"
    )
    print(
        f"image loading at {cache['size']} px: decode {cache['decode_ms_per_image']:.2f} ms/image, cache "
        f"{cache['cache_ms_per_image']:.3f} ms/image ({cache['speedup']:.0f}x faster)"
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
