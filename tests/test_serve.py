"""The serve command through the real server: started as a subprocess through the CLI on random
loopback ports (HTTP, and the DICOM node beside it), asked with httpx, storescu and Chromium.

One server serves the module (its start costs half a minute): an API key and a 1 MiB upload
limit are set, so that the refusals are tested on the server every other test uses."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import TINY_NET, check, dicom_dataset, run_cli
from PIL import Image

pytestmark = pytest.mark.xdist_group("serve")  # one worker: one server for the module
KEY = "test-key"
HEADERS = {"X-API-Key": KEY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dicom(path: Path, pixels: np.ndarray, study: str, sop_class: str | None = None) -> None:
    ds = dicom_dataset(path, *pixels.shape, 8, "MONOCHROME2")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, pydicom.uid.generate_uid()
    ds.PatientID, ds.PatientName = "KALM-TEST", "Test^Patient"
    if sop_class is not None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def study(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A study of three views: a PNG, a JPEG and a DICOM, from the synthetic valid split."""
    folder = tmp_path_factory.mktemp("study")
    pngs = sorted((trained["work"] / "data/synthetic/MURA-v1.1/valid").rglob("*.png"))[:3]
    shutil.copy(pngs[0], folder / "view0.png")
    Image.open(pngs[1]).convert("L").save(folder / "view1.jpg", quality=95)
    pixels = np.asarray(Image.open(pngs[2]).convert("L")).copy()
    pixels[0, 0], pixels[0, 1] = 0, 255  # the full range: an unwindowed DICOM is shown min to max
    write_dicom(folder / "view2.dcm", pixels, "1.2.826.0.1.3680043.8.498.1")
    return {"folder": folder, "files": sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def server(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """`python -m kalm_lightning.serve` on the tiny stage-2 checkpoint, with its DICOM node."""
    best = json.loads((trained["stage2"] / "result.json").read_text())["best_ckpt"]
    work = tmp_path_factory.mktemp("serve")
    port, dicom = free_port(), free_port()
    args = [
        f"ckpt_path={best}",
        f"port={port}",
        "max_batch_size=4",
        "batch_timeout=0.05",
        f"api_key={KEY}",
        "max_upload_mb=1",
        f"dicom.port={dicom}",
        f"dicom.output={work / 'reports'}",
    ]
    log = (work / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "kalm_lightning.serve", *args],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        start_new_session=True,
        preexec_fn=interruptible,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, (work / "server.log").read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        assert time.monotonic() < deadline, (work / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield {"url": url, "work": work, "ckpt": best, "dicom": dicom, "process": process}
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the server's terminal sends
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("kalm-serve did not stop on Ctrl-C (SIGINT to its process group)")
    finally:
        log.close()
    assert "kalm-serve: stopped" in (work / "server.log").read_text()


def interruptible() -> None:
    """In the server's process before it starts: SIGINT at its default, as a terminal's foreground
    job has it (a test run started in the background inherits it ignored, and Python then never
    sees Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def post(
    server: dict, files: list[tuple[str, bytes]], overlay: bool = False, **kw
) -> httpx.Response:
    parts = [("file", (name, data)) for name, data in files]
    query = "?overlay=true" if overlay else ""
    headers = kw.pop("headers", HEADERS)
    return httpx.post(
        f"{server['url']}/predict{query}", files=parts, headers=headers, timeout=120, **kw
    )


def of(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in paths]


def still_serving(server: dict, study: dict) -> None:
    """After any refusal: /health is 200 and a good request is answered in full."""
    assert httpx.get(f"{server['url']}/health", timeout=10).status_code == 200
    answer = post(server, of(study["files"]))
    assert answer.status_code == 200 and all(i["error"] is None for i in answer.json()["images"])


def test_health_and_info_say_what_model_is_served(server: dict) -> None:
    assert httpx.get(f"{server['url']}/health", timeout=10).text == "ok"  # no key needed
    info = httpx.get(f"{server['url']}/info", headers=HEADERS, timeout=10).json()["model"]
    assert info["name"] == f"kalm-lightning {TINY_NET} stage 2"
    assert info["preprocessing"]["source_size"] == 128 and "resize" in info["preprocessing"]
    assert {"threshold", "temperature"} <= set(info["operating_point"])
    assert info["software"]["torch"] and info["training_data"]["name"] == "synthetic"
    schema = httpx.get(f"{server['url']}/openapi.json", timeout=10).json()
    assert "/predict" in schema["paths"] and "StudyPrediction" in json.dumps(schema)
    page = httpx.get(f"{server['url']}/", headers=HEADERS, timeout=10).text
    assert "<form" in page and "http" not in re.sub(r'href="/info"', "", page).split("<script>")[0]


def test_a_study_of_png_jpeg_and_dicom_gets_predicts_numbers(
    server: dict, study: dict, tmp_path: Path
) -> None:
    answer = post(server, of(study["files"]))
    assert answer.status_code == 200, answer.text
    served = answer.json()
    out = tmp_path / "predict"
    check(
        run_cli(
            "predict",
            [
                f"ckpt_path={server['ckpt']}",
                f"images={study['folder']}",
                f"output={out}",
                "num_workers=0",
            ],
            tmp_path,
        )
    )
    rows = pd.read_csv(out / "predictions_images.csv")
    rows = rows.set_index(rows["path"].map(lambda p: Path(p).name))
    for image in served["images"]:
        row = rows.loc[image["name"]]
        for key in ("prob", "prob_global", "prob_local"):
            assert image[key] == pytest.approx(row[key], abs=1e-5), (image["name"], key)
        assert image["box"] == pytest.approx(
            row[["box_x0", "box_y0", "box_x1", "box_y1"]].tolist(), abs=0.11
        )
    studies = pd.read_csv(out / "predictions_studies.csv")
    assert served["study"]["prob"] == pytest.approx(studies["prob"].iloc[0], abs=1e-5)
    assert served["study"]["label"] == studies["call"].iloc[0]
    assert served["study"]["aggregation"] == "mean"


def test_overlay_is_predicts_drawing(server: dict, study: dict) -> None:
    png = study["files"][0]
    answer = post(server, of([png]), overlay=True).json()
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["overlay_png"])))
    with Image.open(png) as radiograph:  # CNN_g's and CNN_l's panels, then the colour scale
        assert overlay.width == 2 * radiograph.width + 44 and overlay.height == radiograph.height


def bomb() -> bytes:
    """A PNG whose header claims 40000 x 40000 pixels (1.6 gigapixels) in a few kilobytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (40000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(b"\0" * 40001 * 8)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def test_bad_images_get_their_error_and_the_others_are_scored(server: dict, study: dict) -> None:
    files = [
        *of(study["files"][:1]),
        ("broken.png", b"\x89PNG not really"),
        ("empty.png", b""),
        ("notes.txt", b"hello"),
        ("bomb.png", bomb()),
    ]
    answer = post(server, files)
    assert answer.status_code == 200
    images = {i["name"]: i for i in answer.json()["images"]}
    assert images["view0.png"]["error"] is None and images["view0.png"]["prob"] is not None
    assert "cannot decode image" in images["broken.png"]["error"]
    assert images["empty.png"]["error"] == "empty.png: the file is empty (0 bytes)"
    assert "cannot decode image" in images["notes.txt"]["error"]
    assert "pixels" in images["bomb.png"]["error"] and images["bomb.png"]["prob"] is None
    still_serving(server, study)


def test_each_refusal_is_one_json_error_and_the_server_keeps_serving(
    server: dict, study: dict
) -> None:
    nothing = post(server, [("broken.png", b"not an image")])
    assert nothing.status_code == 422 and nothing.json()["error"].startswith(
        "no image could be read"
    )
    no_part = httpx.post(f"{server['url']}/predict", data={"x": "1"}, headers=HEADERS, timeout=30)
    assert no_part.status_code == 422 and "`file`" in no_part.json()["error"]
    as_json = httpx.post(
        f"{server['url']}/predict", json={"file": "x.png"}, headers=HEADERS, timeout=30
    )
    assert as_json.status_code == 422 and "`file`" in as_json.json()["error"]
    too_big = post(server, [("big.png", b"\0" * (2 * 2**20))])
    assert too_big.status_code == 413 and too_big.json()
    no_key = post(server, of(study["files"][:1]), headers={})
    assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["detail"]
    still_serving(server, study)


@pytest.mark.slow
def test_sixteen_concurrent_requests_are_answered_in_batches(server: dict, study: dict) -> None:
    files = of(study["files"][:1])
    answers: list[httpx.Response] = []

    def ask() -> None:
        answers.append(post(server, files))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 16 and all(a.status_code == 200 for a in answers)
    assert len({a.json()["images"][0]["prob"] for a in answers}) == 1  # the same answer each time
    batches = [
        int(n)
        for n in re.findall(r"batch of (\d+) request", (server["work"] / "server.log").read_text())
    ]
    assert max(batches) > 1


@pytest.mark.slow
def test_the_dicom_node_answers_a_study_with_a_structured_report(
    server: dict, study: dict, tmp_path: Path
) -> None:
    """storescu (pynetdicom's own application) sends two views and an instance of a class the node
    does not score; the SR holds predict's study probability and a box per view."""
    pixels = np.asarray(Image.open(study["files"][0]).convert("L")).copy()
    pixels[0, 0], pixels[0, 1] = 0, 255
    uid = pydicom.uid.generate_uid()
    views = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    write_dicom(views[0], pixels, uid)
    write_dicom(views[1], pixels[:, ::-1].copy(), uid)
    other = tmp_path / "other.dcm"  # an Ultrasound image: a storage class, not one scored here
    write_dicom(other, pixels, uid, "1.2.840.10008.5.1.4.1.1.6.1")
    sent = subprocess.run(
        [
            sys.executable,
            "-m",
            "pynetdicom",
            "storescu",
            "127.0.0.1",
            str(server["dicom"]),
            *map(str, [*views, other]),
            "-aec",
            "KALM",
            "-v",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert re.search(r"0xA900|Failure", sent.stderr + sent.stdout), sent.stderr[-2000:]
    report = server["work"] / "reports" / f"{uid}.sr.dcm"
    deadline = time.monotonic() + 120
    while not report.is_file():
        assert time.monotonic() < deadline, (server["work"] / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    sr = pydicom.dcmread(report)
    values = {}
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            values[name] = float(item.MeasuredValueSequence[0].NumericValue)
        if item.ValueType == "CONTAINER":
            children = {c.ConceptNameCodeSequence[0].CodeMeaning: c for c in item.ContentSequence}
            assert children["Source image"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            assert children["Key area (KALM box)"].GraphicType == "POLYLINE"
    folder = tmp_path / "views"
    folder.mkdir()
    for view in views:
        shutil.copy(view, folder / view.name)
    out = tmp_path / "predict"
    check(
        run_cli(
            "predict",
            [f"ckpt_path={server['ckpt']}", f"images={folder}", f"output={out}", "num_workers=0"],
            tmp_path,
        )
    )
    expected = pd.read_csv(out / "predictions_studies.csv")["prob"].iloc[0]
    assert values["Study probability of abnormality"] == pytest.approx(expected, abs=1e-5)
    # the node is still up: a C-ECHO answers
    echo = subprocess.run(
        [
            sys.executable,
            "-m",
            "pynetdicom",
            "echoscu",
            "127.0.0.1",
            str(server["dicom"]),
            "-aec",
            "KALM",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode == 0, echo.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("KALM_REQUIRE_BROWSER"),
    reason="no chromium here (CI installs Debian's and sets KALM_REQUIRE_BROWSER: never skipped)",
)
def test_the_page_in_a_real_browser_shows_the_call_and_the_overlay(
    server: dict, study: dict, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI installs Debian's chromium (.ci/run)"
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page()
        page.goto(f"{server['url']}/")
        page.set_input_files("#files", str(study["files"][0]))
        page.fill("#key", KEY)
        page.click("#send")
        page.wait_for_selector(".image img", timeout=60_000)
        shown = page.inner_text("#study")
        image = page.eval_on_selector(".image img", "img => [img.naturalWidth, img.complete]")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert re.search(r"Study: (abnormal|normal)\s+p = 0\.\d{3}", shown), shown
    assert image[0] > 100 and image[1]
    assert (tmp_path / "page.png").stat().st_size > 10_000
