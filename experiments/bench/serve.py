"""The serving load test: `kalm-serve` on a trained model under N concurrent clients, against
`predict` on the same images, in one run on one machine.

    python experiments/bench/serve.py [--ckpt CKPT] [--clients 8] [--requests 1000] [--out serve.json]

Without --ckpt it trains a small stage 1 -> 2 model on synthetic data first (ResNet18, 112 px from
224 px: the demo's sizes). Offline: `predict` over the images, its scoring time from its own
progress line. Served: the server started through the CLI on a loopback port, then `--requests`
single-image requests from `--clients` threads (httpx, loopback only, each bounded in time).
Reported: served images/s over offline images/s, latency p50/p95/p99, the mean batch the server
formed (its log), the resident memory of the server's processes before and after, and failures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
MODEL = [
    "data.image_size=112",
    "data.source_size=224",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.synthetic.train_studies=60",
    "data.synthetic.valid_studies=80",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "~callbacks.progress_bar",
]


def cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", f"kalm_lightning.{module}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=ENV,
    )
    if result.returncode != 0:
        sys.exit(f"{module} failed:\n{result.stderr[-3000:]}")
    return result


def train(work: Path) -> Path:
    cli("train", ["stage=1", *MODEL], work)
    cli("train", ["stage=2", *MODEL], work)
    run = next((work / "outputs/synthetic/resnet18/stage2").iterdir())
    return Path(json.loads((run / "result.json").read_text())["best_ckpt"])


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, AttributeError):
            continue
        todo += [int(c) for c in children]
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--images", type=int, default=200, help="distinct images (cycled)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("serve.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kalm-serve-bench-"))
    ckpt = args.ckpt or train(work)
    root = work / "data/synthetic/MURA-v1.1/valid"
    if not root.is_dir():
        cli("train", ["stage=1", *MODEL, "trainer.max_epochs=0"], work)  # only the data
    images = sorted(root.rglob("*.png"))[: args.images]
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    for i in range(
        args.requests
    ):  # the images the requests send, each once: offline scores them all
        (folder / f"{i:05d}.png").write_bytes(images[i % len(images)].read_bytes())
    payloads = [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())]

    offline = cli(
        "predict",
        [
            f"ckpt_path={ckpt}",
            f"images={folder}",
            f"output={work / 'pred'}",
            "num_workers=0",
            f"batch_size={args.max_batch_size}",
        ],
        work,
    )
    scored = re.search(r"predict: \d+ batches done in ([\d.]+) s", offline.stdout + offline.stderr)
    seconds = float(scored.group(1)) if scored else float("nan")
    offline_rate = len(payloads) / seconds

    port = free_port()
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kalm_lightning.serve",
            f"ckpt_path={ckpt}",
            f"port={port}",
            f"max_batch_size={args.max_batch_size}",
            f"batch_timeout={args.batch_timeout}",
        ],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=ENV,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start:\n" + (work / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        with httpx.Client(timeout=60) as client:  # warm-up, outside the figures
            for name, data in payloads[: args.clients]:
                client.post(f"{url}/predict", files=[("file", (name, data))])
        rss_before = tree_rss(server.pid)
        log.flush()
        warm = len(re.findall(r"batch of \d+ request", (work / "server.log").read_text()))
        latencies: list[float] = []
        failed = [0]
        counter = iter(range(args.requests))
        lock = threading.Lock()

        def client_loop() -> None:
            with httpx.Client(timeout=60) as client:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    name, data = payloads[i % len(payloads)]
                    start = time.perf_counter()
                    try:
                        answer = client.post(f"{url}/predict", files=[("file", (name, data))])
                        ok = (
                            answer.status_code == 200
                            and answer.json()["images"][0]["error"] is None
                        )
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        failed[0] += not ok

        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        rss_after = tree_rss(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    batches = [
        int(n) for n in re.findall(r"batch of (\d+) request", (work / "server.log").read_text())
    ]
    served_rate = args.requests / wall
    p50, p95, p99 = (percentile(latencies, q) for q in (0.5, 0.95, 0.99))
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "clients": args.clients,
        "requests": args.requests,
        "offline_images_per_s": offline_rate,
        "served_images_per_s": served_rate,
        "served_over_offline": served_rate / offline_rate,
        "latency_p50_s": p50,
        "latency_p95_s": p95,
        "latency_p99_s": p99,
        "p99_over_p50": p99 / p50,
        "mean_batch": statistics.fmean(batches[warm:]) if batches[warm:] else None,
        "rss_before_mb": rss_before / 2**20,
        "rss_after_mb": rss_after / 2**20,
        "rss_growth": rss_after / rss_before - 1,
        "failed": failed[0],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| figure | value | goal |\n|---|---|---|")
    print(
        f"| served / offline images/s | {served_rate:.1f} / {offline_rate:.1f} = {result['served_over_offline']:.2f}x | >= 0.8x |"
    )
    print(
        f"| latency p50 / p95 / p99 | {p50 * 1000:.0f} / {p95 * 1000:.0f} / {p99 * 1000:.0f} ms (p99 = {result['p99_over_p50']:.1f}x p50) | p99 <= 3x p50 |"
    )
    print(f"| mean batch formed | {result['mean_batch']:.2f} requests | |")
    print(
        f"| server RSS before / after | {result['rss_before_mb']:.0f} / {result['rss_after_mb']:.0f} MiB ({result['rss_growth']:+.1%}) | <= +10% |"
    )
    print(f"| failed requests | {failed[0]} of {args.requests} | 0 |")


if __name__ == "__main__":
    main()
