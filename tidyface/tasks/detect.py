"""Face detection over images: batched by size, any registered detector, one Detections type."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cache import ModelCache
from ..errors import UsageError
from ..ops.image import expand_paths, write_image
from ..options import DetectOptions, LandmarksOptions
from ..types import Detections
from .common import load_models, progress, readable, warn
from .outdir import OutputFolder
from .pipeline import add_landmarks, as_chw, detect_stream

DEFAULT_DETECTOR = "retinaface_mnet025"


def detect(images: Sequence[np.ndarray | str | os.PathLike] | np.ndarray | str | os.PathLike,
           model: str = DEFAULT_DETECTOR, min_score: float | None = None, device=None,
           batch_size: int = 8, weights_dir=None, max_size: int | None = None,
           models: ModelCache | None = None, precision: str = "float32") -> Detections:
    """Detect faces in images; Detections.image_index indexes `images` (0 for a single image).

    images: one image or a list of them, each a path, a PIL image, a numpy array HxWx3 (HxW
    grey, HxWx4 alpha dropped) or a tensor CxHxW / HxWx3, RGB (not BGR), uint8 or float in
    0..255; a 4-D numpy array (B,H,W,3) or tensor (B,3,H,W) is a batch. Anything else (floats
    in 0..1 among it: pass x * 255) raises InputError naming what was given
    (ops.image.as_rgb_uint8). max_size: the longer side the detector sees (None: its default;
    0: full resolution); boxes are always in the input pixels. A path that cannot be read
    raises ImageReadError naming it; `tidyface detect` skips bad files instead.
    """
    from ..ops.image import as_rgb_uint8, image_list

    images, single = image_list(images)
    frames = ((i, as_rgb_uint8(im, "image" if single else f"images[{i}]"))
              for i, im in enumerate(images))
    (detector,) = load_models(models, device, weights_dir, model, precision=precision)
    parts = [d.shift_images(i) for i, _, d in
             detect_stream(frames, detector, min_score=min_score, max_size=max_size, batch_size=batch_size)]
    return Detections.cat(parts)


def landmarks(images, model: str = "dlib68", det_model: str = DEFAULT_DETECTOR, min_score: float | None = None,
              device=None, batch_size: int = 8, weights_dir=None, models: ModelCache | None = None,
              precision: str = "float32") -> Detections:
    """Detect faces and add each face's K points with the landmark `model`; images as for
    detect(); Detections.landmarks (N,K,2) in the images' pixels."""
    from ..ops.image import as_rgb_uint8, image_list

    images, single = image_list(images)
    frames = ((i, as_rgb_uint8(im, "image" if single else f"images[{i}]")) for i, im in enumerate(images))
    detector, landmarker = load_models(models, device, weights_dir, det_model, model, precision=precision)
    parts = [add_landmarks(landmarker, as_chw(im), d).shift_images(i) for i, im, d in
             detect_stream(frames, detector, min_score=min_score, batch_size=batch_size)]
    return Detections.cat(parts)


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
        points = lms[k] if lms else []
        for (x, y), c in zip(points, colours if len(points) == 5 else [(255, 255, 255)] * len(points)):
            if x == x:  # NaN: no point
                cv2.circle(out, (int(round(x)), int(round(y))), thick + (1 if len(points) == 5 else 0), c, -1)
    return out


def run_detect(paths: Sequence[str], o: DetectOptions | LandmarksOptions, models: ModelCache | None = None) -> int:
    """The `tidyface detect` and `tidyface landmarks` commands: JSON Lines on stdout, with each
    face's K points from the landmark model when there is one; returns the exit code (1: some
    images unreadable, or none found)."""
    if not paths:
        raise UsageError("give at least one image, folder or .txt list")
    folder = OutputFolder(o.out, "detect", paths) if o.out else None
    if folder is not None:
        folder.check()
    files = list(expand_paths(paths))
    if not files:
        warn("no images found in " + ", ".join(map(str, paths)))
        return 1
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    (detector,) = load_models(models, o.device, o.weights_dir, o.detector, precision=o.precision)
    landmarker = (load_models(models, o.device, o.weights_dir, o.landmarker, precision=o.precision)[0]
                  if o.landmarker else None)
    if folder is not None:
        folder.claim(False, resume=True)  # its own earlier drawings are redrawn; nobody else's
    failed: list[Path] = []
    recorded: set[str] = set()  # owner.json is rewritten only for a new top-level entry
    with folder or contextlib.nullcontext(), progress(len(files), "img", "detect") as bar:
        for path, image, dets in detect_stream(readable(files, failed), detector, min_score=o.min_score,
                                               max_size=o.max_size, batch_size=o.batch_size):
            dets = add_landmarks(landmarker, as_chw(image), dets)
            h, w = image.shape[:2]
            rec = {"image": str(path), "width": w, "height": h, "faces": dets.to_records(1)[0]}
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()
            if folder is not None:
                rel = path.resolve().relative_to(root)
                if rel.parts[0] not in recorded:
                    recorded.add(rel.parts[0])
                    folder.record([rel.parts[0]])
                write_image(folder.path / rel, draw(image, dets))
            bar.update(1)
    return 1 if failed else 0
