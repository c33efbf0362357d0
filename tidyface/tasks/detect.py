"""Face detection over images: batched by size, any registered detector, one Detections type."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..ops.image import ImageReadError, expand_paths, to_tensor_batch, write_image
from ..types import Detections
from .common import cached_model, read_ahead, resolve_device, warn

DEFAULT_DETECTOR = "retinaface_mnet025"


@dataclass
class ImageResult:
    """Detections of one image (image_index all 0), with where it came from."""

    path: Path | None
    image: np.ndarray
    detections: Detections


def size_kwargs(max_size: int | None) -> dict:
    """--max-size: None keeps the detector's own input-size policy, 0 means full resolution."""
    if max_size is None:
        return {}
    return {"max_size": None if int(max_size) == 0 else int(max_size)}


def detect_batches(frames: Iterable[tuple[object, np.ndarray]], model: str = DEFAULT_DETECTOR,
                   min_score: float | None = None, device=None, batch_size: int = 8,
                   weights_dir=None, max_size: int | None = None) -> Iterator[tuple[object, np.ndarray, Detections]]:
    """Detect faces in a stream of (key, RGB uint8 image), batching consecutive same-size images.

    max_size: the longer side the detector sees (None: its default policy; 0: full resolution);
    boxes always come back in input pixels. Yields (key, image, Detections with image_index 0)
    in input order.
    """
    import torch

    dev = resolve_device(device)
    net = cached_model(model, dev, weights_dir)
    pending: list[tuple[object, np.ndarray]] = []

    def flush():
        batch = to_tensor_batch([im for _, im in pending], dev, torch.uint8)
        dets = net.detect(batch, min_score=min_score, **size_kwargs(max_size)).to("cpu")
        for i, (key, im) in enumerate(pending):
            yield key, im, dets.for_image(i).shift_images(-i)
        pending.clear()

    for key, im in frames:
        if pending and (im.shape != pending[0][1].shape or len(pending) >= batch_size):
            yield from flush()
        pending.append((key, im))
    if pending:
        yield from flush()


def detect(images: Sequence[np.ndarray | str | os.PathLike] | np.ndarray | str | os.PathLike,
           model: str = DEFAULT_DETECTOR, min_score: float | None = None, device=None,
           batch_size: int = 8, weights_dir=None, max_size: int | None = None) -> Detections:
    """Detect faces in images (RGB uint8 arrays or paths); Detections.image_index indexes `images`.

    A path that cannot be read raises ImageReadError naming it; use `tidyface detect` (or
    `detect_files`) to skip bad files instead.
    """
    from ..ops.image import read_image

    if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    frames = ((i, read_image(im) if isinstance(im, (str, os.PathLike)) else np.asarray(im))
              for i, im in enumerate(images))
    parts = [d.shift_images(i) for i, _, d in
             detect_batches(frames, model, min_score, device, batch_size, weights_dir, max_size)]
    return Detections.cat(parts)


def detect_files(paths: Iterable[str | os.PathLike], model: str = DEFAULT_DETECTOR, **kw
                 ) -> Iterator[ImageResult | tuple[Path, ImageReadError]]:
    """Detect in files, folders (recursive) and .txt lists; unreadable files are yielded as
    (path, error) and the rest go on."""
    errors: list[tuple[Path, ImageReadError]] = []

    def readable():
        for p, im in read_ahead(expand_paths(paths)):
            if isinstance(im, Exception):
                errors.append((p, im))  # reported before the next result, never dropped
            else:
                yield p, im

    for p, im, d in detect_batches(readable(), model, **kw):
        yield from errors
        errors.clear()
        yield ImageResult(p, im, d)
    yield from errors


def draw(image: np.ndarray, det: Detections) -> np.ndarray:
    """A copy of the image with boxes, scores and landmarks drawn (landmark colours follow the
    order left eye, right eye, nose, left mouth, right mouth)."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    thick = max(1, round(max(image.shape[:2]) / 500))
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (0, 255, 255)]
    lms = None if det.landmarks is None else det.landmarks.tolist()
    for k, (box, score) in enumerate(zip(det.boxes.tolist(), det.scores.tolist())):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 255, 0), thick)
        cv2.putText(out, f"{score:.2f}", (x1, max(0, y1 - 3 * thick)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thick, (0, 255, 0), thick)
        for (x, y), c in zip(lms[k] if lms else [], colours):
            cv2.circle(out, (int(round(x)), int(round(y))), thick + 1, c, -1)
    return out


def run_detect(paths: Sequence[str], model: str = DEFAULT_DETECTOR, min_score=None, device=None,
               batch_size: int = 8, out: str | None = None, weights_dir=None, max_size=None) -> int:
    """The `tidyface detect` command: JSON Lines on stdout; returns the exit code."""
    failed = 0
    files = list(expand_paths(paths))
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files])) if files else Path(".")
    for res in detect_files(files, model, min_score=min_score, device=device,
                            batch_size=batch_size, weights_dir=weights_dir, max_size=max_size):
        if isinstance(res, tuple):
            failed += 1
            warn(str(res[1]))
            continue
        h, w = res.image.shape[:2]
        rec = {"image": str(res.path), "width": w, "height": h,
               "faces": res.detections.to_records(1)[0]}
        sys.stdout.write(json.dumps(rec) + "\n")
        sys.stdout.flush()
        if out:
            rel = res.path.resolve().relative_to(root)
            write_image(Path(out) / rel, draw(res.image, res.detections))
    if not files:
        warn("no images found in " + ", ".join(map(str, paths)))
        return 1
    return 1 if failed else 0
