"""The serve command: a trained model behind an HTTP API, on LitServe (FastAPI + uvicorn, its
dynamic batching, `/health`, `/info`, OpenAPI), with the page a radiologist uses and, with
`dicom.port`, a DICOM node beside it (`tasks/dicom_node.py`).

    POST /predict   multipart `file` parts (PNG, JPEG, DICOM): one study; ?overlay=true adds
                    each image's overlay (box and heatmaps) as base64 PNG
    GET  /          the page (no external assets: it works on an offline hospital network)
    GET  /health    200 once the model is loaded
    GET  /info      the model card as JSON, and the server's settings

Requests are batched by LitServe (up to `max_batch_size` requests, waiting `batch_timeout` s);
their images run through the model at most `max_batch_size` at a time. One bad image of a batch
is that image's `error` and never another request's. Only uploaded bytes are read: no path a
client sends is opened.

This module does not use `from __future__ import annotations`: LitServe reads the request and
response types from `decode_request`'s and `encode_response`'s annotations.
"""

import logging
import threading
from importlib.resources import files
from typing import Annotated, Any

import litserve as ls
import torch
import uvicorn
from fastapi import Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from omegaconf import DictConfig
from pydantic import BaseModel, Field

from kalm_lightning.stages import load_stage
from kalm_lightning.tasks.inference import pick_device
from kalm_lightning.tasks.model_card import card_data
from kalm_lightning.tasks.scoring import StudyResult, StudyScorer, Upload

log = logging.getLogger("kalm_lightning.serve")
PAGE = files("kalm_lightning.tasks").joinpath("page.html")
NO_IMAGE = 422


class ImagePrediction(BaseModel):
    name: str = Field(description="the uploaded file's name")
    prob: float | None = Field(
        None, description="the decision score, calibrated where the model has a temperature"
    )
    prob_global: float | None = Field(None, description="CNN_g's abnormal probability")
    prob_local: float | None = Field(None, description="CNN_l's abnormal probability (stage 2)")
    box: list[float] | None = Field(
        None, description="the KALM box, x0, y0, x1, y1 in the image's own pixels"
    )
    error: str | None = Field(None, description="why this image was not scored")
    overlay_png: str | None = Field(
        None, description="?overlay=true: predict's overlay, base64 PNG"
    )


class StudyCall(BaseModel):
    prob: float | None = Field(description="the study's probability from its scored images")
    label: int | None = Field(description="1 abnormal, 0 normal, at the model's threshold")
    threshold: float
    aggregation: str = Field(description="how images make the study: mean (the paper's) or max")


class StudyPrediction(BaseModel):
    study: StudyCall
    images: list[ImagePrediction]


class StudyRequest(BaseModel):
    """What the worker receives: the uploads' bytes (read in the API process) and the options."""

    uploads: list[Upload]
    overlay: bool = False


async def read_study(
    file: Annotated[list[UploadFile], File(description="the study's images: PNG, JPEG or DICOM")],
    overlay: Annotated[bool, Query(description="add each image's overlay (base64 PNG)")] = False,
) -> StudyRequest:
    """The multipart request as bytes: LitServe's size limit has already cut it at max_upload_mb."""
    uploads = [Upload(f.filename or f"file{i}", await f.read()) for i, f in enumerate(file)]
    return StudyRequest(uploads=uploads, overlay=overlay)


class KALMAPI(ls.LitAPI):
    """The model side, in LitServe's inference worker: decode each upload, batch the requests'
    images through `StudyScorer`, answer each request on its own."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(
            max_batch_size=int(cfg["max_batch_size"]), batch_timeout=float(cfg["batch_timeout"])
        )
        self.settings = cfg
        self.batches: list[tuple[int, int]] = []  # (requests, images) of each batch run

    def setup(self, device: str) -> None:
        module = load_stage(self.settings["ckpt_path"])
        module.tta = self.settings["tta"]
        torch.set_grad_enabled(False)
        self.scorer = StudyScorer(
            module, pick_device(self.settings["device"]), self.settings["study_aggregation"]
        )
        print(
            f"kalm-serve: {self.settings['ckpt_path']} ready on {self.settings['url']}", flush=True
        )

    def authorize(self, request: Request) -> None:
        key = self.settings.get("api_key")
        if key and request.url.path != "/health" and request.headers.get("x-api-key") != key:
            raise HTTPException(401, "a valid X-API-Key header is required")

    def decode_request(self, request: Annotated[StudyRequest, Depends(read_study)]) -> tuple:
        return [self.scorer.decode(u) for u in request.uploads], request.overlay

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def predict(self, studies: list) -> list[StudyResult]:
        images = sum(len(decoded) for decoded, _ in studies)
        self.batches.append((len(studies), images))
        print(f"kalm-serve: batch of {len(studies)} request(s), {images} image(s)", flush=True)
        return self.scorer.score(
            [decoded for decoded, _ in studies], self.max_batch_size, [o for _, o in studies]
        )

    def unbatch(self, output: list) -> list:
        return list(output)

    def encode_response(self, output: StudyResult) -> StudyPrediction:
        answer = StudyPrediction(
            study=StudyCall(
                prob=output.prob,
                label=output.label,
                threshold=output.threshold,
                aggregation=output.aggregation,
            ),
            images=[ImagePrediction(**vars(image)) for image in output.images],
        )
        if output.prob is None:  # no image of the request could be read
            errors = "; ".join(i.error for i in output.images if i.error) or "no file part"
            return JSONResponse(
                status_code=NO_IMAGE,
                content={"error": f"no image could be read: {errors}", **answer.model_dump()},
            )
        return answer


def build_server(cfg: DictConfig) -> ls.LitServer:
    """The LitServer of a checkpoint, with the model card as its `/info`, the page at `/`, and
    one JSON error line for requests FastAPI refuses."""
    settings = {
        key: cfg[key]
        for key in ("ckpt_path", "max_batch_size", "batch_timeout", "api_key", "tta", "device")
    }
    settings["study_aggregation"] = cfg.study_aggregation
    settings["url"] = f"http://{cfg.host}:{cfg.port}"
    stage = load_stage(cfg.ckpt_path)  # the card; the worker loads its own copy
    meta = {
        **stage.preprocessing.to_dict(),
        "outputs": ["prob", "prob_global", "prob_local", "boxes"],
    }
    meta["shape"] = ["N", 3, stage.preprocessing.source_size, stage.preprocessing.source_size]
    card = card_data(stage, cfg.ckpt_path, meta, None)
    del stage
    server = ls.LitServer(
        KALMAPI(settings),
        accelerator="cpu" if pick_device(cfg.device).type == "cpu" else "cuda",
        devices=1,
        timeout=float(cfg.timeout_s),
        max_payload_size=int(cfg.max_upload_mb * 2**20),
        model_metadata=jsonable(card),
    )
    app = server.app
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.exception_handler(RequestValidationError)
    async def one_line(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            status_code=422,
            content={
                "error": f"{where}: {first.get('msg', 'invalid request')}; send the study's images "
                "as multipart/form-data parts named `file`"
            },
        )

    return server


def jsonable(data: Any) -> Any:
    """The card as plain JSON (paths and dates as text)."""
    import json

    return json.loads(json.dumps(data, default=str))


def run_server(cfg: DictConfig) -> None:
    """Build the server, start the DICOM node beside it if asked, and serve until stopped."""
    server = build_server(cfg)
    node = None
    if cfg.dicom.port is not None:
        from kalm_lightning.tasks.dicom_node import start_node

        node = start_node(cfg)
    try:
        server.run(
            host=cfg.host,
            port=int(cfg.port),
            generate_client_file=False,
            log_level="warning",
            api_server_worker_type="thread",
            num_api_servers=1,
        )
    finally:
        if node is not None:
            node.shutdown()
        stop_api_threads()
        print("kalm-serve: stopped", flush=True)


def stop_api_threads(timeout: float = 10.0) -> None:
    """Stop the uvicorn servers LitServe runs in threads (`api_server_worker_type="thread"`).

    On Ctrl-C LitServe 0.2.19 shuts its workers down and returns, but stops a thread-backed
    uvicorn server with `terminate()`, which a thread does not have (Lightning-AI/LitServe#684):
    the thread keeps serving and, not being a daemon, keeps the process alive. Each such server
    is asked to exit as uvicorn's own signal handler asks it (`should_exit`), then joined."""
    for thread in threading.enumerate():
        server = getattr(getattr(thread, "_target", None), "__self__", None)
        if isinstance(server, uvicorn.Server) and thread.is_alive():
            server.should_exit = True
            thread.join(timeout)
