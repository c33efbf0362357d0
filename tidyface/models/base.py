"""The five model protocols: what a task may call on a model, and nothing else.

Every registered model belongs to one (`WeightSpec.task` names it) and carries its `spec`
(`load_model` sets it). Each has one batched call; settings such as `min_score` are arguments
of that call, so a model shared through a cache is never changed by a task. A model class
subclasses its protocol (`class RetinaFace(nn.Module, Detector)`) to inherit the default
methods; a plugin does the same.

A model class whose forward is its network alone (decoding, if any, runs after it) may say
`reduced_precision = True`: `--precision bfloat16` / `float16` then runs that forward under
autocast (cache.in_precision). Without it a model stays float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..types import Detections

if TYPE_CHECKING:
    from ..registry import WeightSpec


@dataclass(frozen=True)
class PreparedImage:
    """One image as a detector's network will see it, made on any thread (a decoder's, so
    that resizing overlaps the models): `pixels` (h,w,3) RGB uint8, and the map back to the
    original image, original = (network - offset) * scale, per axis (x, y)."""

    pixels: np.ndarray
    scale: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)


def to_original(dets: Detections, prepared: Sequence[PreparedImage]) -> Detections:
    """Detections in prepared-image pixels -> in original pixels (each face by its image's map)."""
    if len(dets) == 0 or all(p.scale == (1.0, 1.0) and p.offset == (0.0, 0.0) for p in prepared):
        return dets
    dev = dets.boxes.device
    scale = torch.tensor([p.scale for p in prepared], device=dev, dtype=dets.boxes.dtype)[dets.image_index]
    offset = torch.tensor([p.offset for p in prepared], device=dev, dtype=dets.boxes.dtype)[dets.image_index]
    boxes = (dets.boxes - offset.repeat(1, 2)) * scale.repeat(1, 2)
    lm = dets.landmarks
    if lm is not None:
        lm = (lm - offset[:, None]) * scale[:, None]
    return Detections(boxes, dets.scores, lm, dets.image_index)


@runtime_checkable
class Detector(Protocol):
    """Frames -> faces, in the original image's pixels. The detector owns its input policy
    (resize, letterbox): `detect` applies it to a tensor batch; `prepare` applies it to one
    numpy image where the caller decodes (a video reader's thread), and `detect_prepared` runs
    the network on such images and maps the faces back."""

    task: ClassVar[str] = "detect"
    spec: "WeightSpec"

    def detect(self, images: Tensor, *, min_score: float | None = None,
               max_size: int | None = None) -> Detections:
        """images (B,3,H,W) (or one (3,H,W)) RGB 0..255, uint8 or float, on the model's
        device; an implementation starts with `ops.image.as_rgb_batch`, which refuses anything
        else (floats in 0..1 among it) with an InputError. min_score, max_size (the longer side
        the network sees; 0: full resolution): None takes the weights' defaults
        (`spec.defaults`)."""
        ...

    def prepare(self, image: np.ndarray, max_size: int | None = None) -> PreparedImage:
        """The default policy: the image as it is, or shrunk (area averaging) so its longer side
        is at most max_size (None: spec.defaults.max_size; 0: full resolution)."""
        cap = self.spec.defaults.max_size if max_size is None else (int(max_size) or None)
        h, w = image.shape[:2]
        if not cap or max(h, w) <= cap:
            return PreparedImage(image)
        import cv2

        s = cap / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        return PreparedImage(cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA), (w / nw, h / nh))

    def detect_prepared(self, images: Sequence[PreparedImage], *, min_score: float | None = None
                        ) -> Detections:
        """Detect in prepared images of one size (a batch); faces in original pixels."""
        dev = model_device(self)
        batch = torch.from_numpy(np.stack([p.pixels for p in images])).to(dev).permute(0, 3, 1, 2)
        return to_original(self.detect(batch, min_score=min_score, max_size=0), images)


@runtime_checkable
class Landmarker(Protocol):
    """Frames + faces -> the same faces with K landmarks each (`spec.meta.num_landmarks`)."""

    task: ClassVar[str] = "landmarks"
    spec: "WeightSpec"

    def landmarks(self, images: Tensor, detections: Detections) -> Detections: ...


@runtime_checkable
class Encoder(Protocol):
    """Aligned crops (N,3,S,S) RGB 0..255 (S, template: `spec.meta`) -> (N,D) L2-normalised
    embeddings."""

    task: ClassVar[str] = "embed"
    spec: "WeightSpec"

    def embed(self, crops: Tensor) -> Tensor: ...


@runtime_checkable
class Parser(Protocol):
    """Face crops (N,3,S,S) RGB 0..255 -> (N,C,S,S) class scores, C = len(spec.meta.class_names)."""

    task: ClassVar[str] = "parse"
    spec: "WeightSpec"

    def parse(self, crops: Tensor) -> Tensor: ...


@runtime_checkable
class Enhancer(Protocol):
    """Images (N,3,h,w) RGB 0..255 -> (N,3,h*s,w*s), s = spec.meta.scale."""

    task: ClassVar[str] = "enhance"
    spec: "WeightSpec"

    def enhance(self, images: Tensor) -> Tensor: ...


PROTOCOLS = {p.task: p for p in (Detector, Landmarker, Encoder, Parser, Enhancer)}


def model_device(model) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_protocol(model, task: str) -> None:
    """Refuse a model that does not implement its task's protocol (a plugin's mistake)."""
    proto = PROTOCOLS[task]
    if not isinstance(model, proto):
        raise TypeError(f"{type(model).__name__} is registered for task {task!r} but does not "
                        f"implement tidyface.models.base.{proto.__name__}")


def export_graphs(model) -> dict[str, tuple[torch.nn.Module, Tensor]]:
    """The forward graphs of a model that export to ONNX, each with an example input: the
    model itself at its fixed input size (or 320x320 for any-size models). A cascade (MTCNN)
    overrides `export_graphs` to give its stages."""
    own = getattr(model, "export_graphs", None)
    if own is not None:
        return own()
    w, h = model.spec.meta.input_size or (320, 320)
    return {"": (model, torch.randn(2, 3, h, w))}
