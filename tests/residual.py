"""Faces left after anonymisation, counted by detectors that the anonymiser does not use:
OpenCV's YuNet (cv2.FaceDetectorYN, the file in ../shared/weights) and insightface's SCRFD-2.5g
(its own scrfd.py on onnxruntime; `pip install --no-deps insightface==0.7.3`). Each counts the
faces of an original and of its anonymised copy (N and M; M/N is the residual rate) at its own
default threshold (YuNet 0.9, SCRFD 0.5). Videos are compared on every `stride`-th frame.

Used by tests/test_anonymize.py and benchmarks/bench_anonymize.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Iterator

import os

import cv2
import numpy as np

SHARED = Path(os.environ.get("TIDYFACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))

YUNET = SHARED / "weights/face_detection_yunet_2023mar.onnx"
SCRFD = SHARED / "weights/det_2.5g.onnx"


def yunet_counter() -> Callable[[np.ndarray], int]:
    """Faces YuNet finds in a BGR image, run at the image's own size."""
    det = cv2.FaceDetectorYN.create(str(YUNET), "", (320, 320), 0.9, 0.3, 5000)

    def count(bgr: np.ndarray) -> int:
        det.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = det.detect(bgr)
        return 0 if faces is None else len(faces)
    return count


def scrfd_counter() -> Callable[[np.ndarray], int]:
    """Faces insightface's SCRFD-2.5g finds in a BGR image (its 640 letterbox, score 0.5)."""
    found = importlib.util.find_spec("insightface")
    if found is None:
        raise ImportError("insightface is not installed (pip install --no-deps insightface==0.7.3)")
    # insightface's package __init__ imports scikit-image and more; its scrfd.py needs only
    # numpy, cv2 and onnxruntime, so it is loaded alone
    spec = importlib.util.spec_from_file_location(
        "insightface_scrfd", found.submodule_search_locations[0] + "/model_zoo/scrfd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    det = module.SCRFD(str(SCRFD))
    det.prepare(-1)

    def count(bgr: np.ndarray) -> int:
        boxes, _ = det.detect(bgr, input_size=(640, 640))
        return len(boxes)
    return count


def frames(path: Path, stride: int = 1) -> Iterator[np.ndarray]:
    """BGR frames of an image (one) or a video (every stride-th frame, from the first)."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise OSError(f"{path}: cannot be read")
    k = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if k % stride == 0:
            yield frame
        k += 1
    cap.release()


def residuals(original: Path, anonymised: Path, counters: dict[str, Callable], stride: int = 1) -> dict:
    """{detector: (faces in the original, faces in the anonymised copy)} over the same frames."""
    out = {name: [0, 0] for name in counters}
    for a, b in zip(frames(original, stride), frames(anonymised, stride)):
        for name, count in counters.items():
            out[name][0] += count(a)
            out[name][1] += count(b)
    return {k: tuple(v) for k, v in out.items()}
