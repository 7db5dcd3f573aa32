"""The serve command's DICOM node: a C-STORE SCP (pynetdicom) beside the HTTP API.

It accepts CR, DX and Secondary Capture image instances, groups them by StudyInstanceUID, and
when the association that sent them ends, scores each study through the server's own
`POST /predict` (the model and its batching live there: one model, one path) and writes a DICOM
Comprehensive SR (highdicom) per study into `dicom.output`: the study's probability and call, and
per image its probability and its box (a polyline on the image), each referencing its source
instance. An instance of another SOP class, or one whose pixels cannot be decoded, is answered
with a failure status and logged; the node keeps running.
"""

from __future__ import annotations

import io
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from omegaconf import DictConfig

from kalm_lightning.data.images import BadImageError, decode_image

IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7": "SC",  # Secondary Capture Image Storage
}
NOT_THIS_CLASS = 0xA900  # "Data set does not match SOP class": a storage class not scored here
CANNOT_UNDERSTAND = 0xC000  # the instance's pixels cannot be decoded
CODES = "99KALM"  # the private coding scheme of the report's concepts


def concept(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=CODES, meaning=meaning)


class StudyNode:
    """The SCP's state: the instances each open association has sent, by study."""

    def __init__(self, url: str, output: Path, api_key: str | None) -> None:
        self.url, self.output, self.api_key = url, output, api_key
        self.received: dict[int, dict[str, list[tuple[Any, bytes]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.lock = threading.Lock()
        self.reports: list[Path] = []

    def on_store(self, event: Any) -> int:
        """A C-STORE: kept for its study when it is an image we score, else a failure status."""
        from pydicom.filewriter import dcmwrite

        dataset = event.dataset
        dataset.file_meta = event.file_meta
        sop_class = str(dataset.get("SOPClassUID", ""))
        if sop_class not in IMAGE_CLASSES:
            print(
                f"kalm-serve: DICOM instance of SOP class {sop_class} refused: not an image "
                "class this node scores (CR, DX, Secondary Capture)",
                flush=True,
            )
            return NOT_THIS_CLASS
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        data = buffer.getvalue()
        name = f"{dataset.SOPInstanceUID}.dcm"
        try:
            decode_image(data, name)
        except BadImageError as error:
            print(f"kalm-serve: DICOM instance refused: {error}", flush=True)
            return CANNOT_UNDERSTAND
        with self.lock:
            self.received[id(event.assoc)][str(dataset.StudyInstanceUID)].append((dataset, data))
        return 0x0000

    def on_end(self, event: Any) -> None:
        """The association is over: score and report each study it sent."""
        with self.lock:
            studies = self.received.pop(id(event.assoc), {})
        for study, instances in studies.items():
            try:
                self.reports.append(self.report(study, instances))
            except Exception as error:  # a failed report must not stop the node
                print(f"kalm-serve: no report for study {study}: {error}", flush=True)

    def report(self, study: str, instances: list[tuple[Any, bytes]]) -> Path:
        files = [("file", (f"{ds.SOPInstanceUID}.dcm", data)) for ds, data in instances]
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        answer = httpx.post(f"{self.url}/predict", files=files, headers=headers, timeout=300)
        answer.raise_for_status()
        path = self.output / f"{study}.sr.dcm"
        write_report([ds for ds, _ in instances], answer.json(), path)
        print(
            f"kalm-serve: study {study}: p={answer.json()['study']['prob']:.4f}, report {path}",
            flush=True,
        )
        return path


# Patient and study attributes an SR copies from its evidence, Type 2 (present, possibly empty)
# in the image IODs; an instance that lacks one gets it empty, as the standard allows.
TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def write_report(sources: list[Any], answer: dict, path: Path) -> None:
    """A Comprehensive SR of one study's answer, referencing its source instances."""
    sources = [ds.copy() for ds in sources]
    for ds in sources:
        for keyword in TYPE_2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    import highdicom as hd
    from pydicom.uid import generate_uid

    unit = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    root = hd.sr.ContainerContentItem(name=concept("KALM-1", "Abnormality detection report"))
    study = answer["study"]
    items = [
        hd.sr.NumContentItem(
            name=concept("KALM-2", "Study probability of abnormality"),
            value=float(study["prob"]),
            unit=unit,
            relationship_type="CONTAINS",
        ),
        hd.sr.CodeContentItem(
            name=concept("KALM-3", "Study call"),
            value=concept("KALM-ABN", "Abnormal")
            if study["label"]
            else concept("KALM-NRM", "Normal"),
            relationship_type="CONTAINS",
        ),
        hd.sr.NumContentItem(
            name=concept("KALM-4", "Decision threshold"),
            value=float(study["threshold"]),
            unit=unit,
            relationship_type="CONTAINS",
        ),
    ]
    by_name = {f"{ds.SOPInstanceUID}.dcm": ds for ds in sources}
    for image in answer["images"]:
        ds = by_name[image["name"]]
        entry = hd.sr.ContainerContentItem(
            name=concept("KALM-5", "Image finding"), relationship_type="CONTAINS"
        )
        children = [
            hd.sr.ImageContentItem(
                name=concept("KALM-6", "Source image"),
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                relationship_type="CONTAINS",
            )
        ]
        if image.get("prob") is not None:
            children.append(
                hd.sr.NumContentItem(
                    name=concept("KALM-7", "Image probability of abnormality"),
                    value=float(image["prob"]),
                    unit=unit,
                    relationship_type="CONTAINS",
                )
            )
        if image.get("box"):
            x0, y0, x1, y1 = image["box"]
            corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
            box = hd.sr.ScoordContentItem(
                name=concept("KALM-8", "Key area (KALM box)"),
                graphic_type="POLYLINE",
                graphic_data=corners,
                pixel_origin_interpretation="VOLUME",
                relationship_type="CONTAINS",
            )
            box.ContentSequence = [
                hd.sr.ImageContentItem(
                    name=concept("KALM-6", "Source image"),
                    referenced_sop_class_uid=ds.SOPClassUID,
                    referenced_sop_instance_uid=ds.SOPInstanceUID,
                    relationship_type="SELECTED FROM",
                )
            ]
            children.append(box)
        entry.ContentSequence = children
        items.append(entry)
    root.ContentSequence = items
    report = hd.sr.ComprehensiveSR(
        evidence=sources,
        content=root,
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="kalm-lightning",
        is_complete=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    report.save_as(partial)
    partial.replace(path)


def start_node(cfg: DictConfig) -> Any:
    """Start the SCP on `dicom.port` (not blocking); returns pynetdicom's server, to shut down."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    node = StudyNode(f"http://127.0.0.1:{cfg.port}", Path(cfg.dicom.output), cfg.api_key)
    ae = AE(ae_title=str(cfg.dicom.ae_title))
    for sop_class in IMAGE_CLASSES:  # what is scored, in any transfer syntax (compressed too)
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    others = [c.abstract_syntax for c in AllStoragePresentationContexts]
    for sop_class in [c for c in others if c not in IMAGE_CLASSES][: 127 - len(IMAGE_CLASSES)]:
        ae.add_supported_context(sop_class)  # accepted, then answered with a failure status
    ae.add_supported_context("1.2.840.10008.1.1")  # C-ECHO
    handlers = [
        (evt.EVT_C_STORE, node.on_store),
        (evt.EVT_RELEASED, node.on_end),
        (evt.EVT_ABORTED, node.on_end),
    ]
    server = ae.start_server((cfg.host, int(cfg.dicom.port)), block=False, evt_handlers=handlers)
    print(
        f"kalm-serve: DICOM node {cfg.dicom.ae_title} on {cfg.host}:{cfg.dicom.port}, reports "
        f"in {cfg.dicom.output}",
        flush=True,
    )
    return server
