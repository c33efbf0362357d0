"""Embedding faces: align each detected face to its encoder's template, encode, L2-normalise."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops.align import template_for, umeyama, warp
from ..ops.image import atomic_path
from ..types import Detections, Faces
from .common import cached_model, read_ahead, resolve_device, warn
from .detect import DEFAULT_DETECTOR, detect_batches

DEFAULT_ENCODER = "facenet_casia_tf"


def parse_area(area) -> tuple[float, float, float, float] | None:
    """--enc-area "x1 y1 x2 y2" (fractions of the face image) -> a 4-tuple, validated."""
    if area is None or area == "":
        return None
    vals = [float(v) for v in (area.replace(",", " ").split() if isinstance(area, str) else area)]
    if len(vals) != 4 or not (0 <= vals[0] < vals[2] <= 1 and 0 <= vals[1] < vals[3] <= 1):
        raise ValueError(f"--enc-area needs 4 fractions x1 y1 x2 y2 with 0<=x1<x2<=1, 0<=y1<y2<=1, got {area!r}")
    return tuple(vals)


def encoder_geometry(encoder) -> tuple[int, str, float | None]:
    """(input side, template kind, face factor) the encoder's weights expect."""
    pre = encoder.spec.preprocess
    return int(pre["input_size"]), pre.get("template", "arcface"), pre.get("face_factor")


def embedding_dim(encoder) -> int:
    return int(encoder.spec.preprocess["embedding_dim"])


def area_matrices(boxes: Tensor, area, size: int) -> Tensor:
    """Image -> crop matrices that stretch the `area` fractions of each box onto size x size
    (the unaligned input the video-to-faces tool used)."""
    x1, y1, x2, y2 = area
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    left, top = boxes[:, 0] + x1 * w, boxes[:, 1] + y1 * h
    sx, sy = size / ((x2 - x1) * w).clamp(min=1e-6), size / ((y2 - y1) * h).clamp(min=1e-6)
    m = torch.zeros(len(boxes), 3, 3, dtype=torch.float64, device=boxes.device)
    # pixel-centre convention: source edge (left - 0.5) lands on crop edge -0.5
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1
    m[:, 0, 2] = -(left - 0.5) * sx - 0.5
    m[:, 1, 2] = -(top - 0.5) * sy - 0.5
    return m


def encoder_faces(images: Tensor, dets: Detections, encoder, enc_area=None) -> Faces:
    """Crops as the encoder wants them: landmark-aligned to its template, or with enc_area (or
    when there are no landmarks) the box region stretched to the input size."""
    size, kind, factor = encoder_geometry(encoder)
    boxes = dets.boxes.to(images.device, torch.float64)
    if enc_area is None and dets.landmarks is not None:
        dst = template_for(size, kind, factor).to(images.device)
        mats = umeyama(dets.landmarks.to(images.device, torch.float64), dst)
    else:
        mats = area_matrices(boxes, enc_area or (0, 0, 1, 1), size)
    crops = warp(images, mats, dets.image_index.to(images.device), (size, size), padding="replicate")
    return Faces(crops, mats.float(), dets)


@torch.inference_mode()
def encode(encoder, crops: Tensor, batch_size: int = 32) -> Tensor:
    """(N,3,S,S) RGB 0..255 crops -> (N,D) L2-normalised embeddings, in chunks of batch_size."""
    if len(crops) == 0:
        return crops.new_zeros(0, embedding_dim(encoder))
    crops = crops.contiguous(memory_format=torch.channels_last)
    return torch.cat([encoder.embed(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)])


@dataclass
class FaceTable:
    """One row per face: where it came from, where it is, and its embedding."""

    embeddings: np.ndarray  # (N,D) float32, L2-normalised
    source: list[str] = field(default_factory=list)
    face_index: list[int] = field(default_factory=list)
    boxes: np.ndarray | None = None  # (N,4)
    scores: np.ndarray | None = None  # (N,)
    landmarks: np.ndarray | None = None  # (N,5,2)

    def __len__(self) -> int:
        return len(self.source)

    def save(self, path: str | os.PathLike) -> None:
        """An .npz (written atomically) with embeddings, source, face_index, boxes, scores, landmarks."""
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: the name is kept as given
            np.savez(fh, embeddings=self.embeddings, source=np.array(self.source, dtype=str),
                     face_index=np.array(self.face_index, dtype=np.int64), boxes=self.boxes,
                     scores=self.scores, landmarks=self.landmarks)

    @classmethod
    def load(cls, path) -> "FaceTable":
        z = np.load(path)
        return cls(z["embeddings"], [str(s) for s in z["source"]], z["face_index"].tolist(),
                   z["boxes"], z["scores"], z["landmarks"])


def embed_images(items: Iterable[tuple[object, np.ndarray]], model: str = DEFAULT_ENCODER,
                 det_model: str = DEFAULT_DETECTOR, min_score=None, device=None, batch_size: int = 32,
                 det_batch_size: int = 8, enc_area=None, weights_dir=None):
    """Detect, align and embed every face of (key, RGB image) items.

    Yields (key, image, Faces, embeddings (N,D) tensor on CPU) per image, in input order.
    """
    dev = resolve_device(device)
    enc = cached_model(model, dev, weights_dir)
    area = parse_area(enc_area)
    for key, img, det in detect_batches(items, det_model, min_score, dev, det_batch_size, weights_dir):
        if len(det) == 0:
            yield key, img, None, torch.zeros(0, embedding_dim(enc))
            continue
        t = torch.from_numpy(img).to(dev).permute(2, 0, 1)[None]  # uint8: warp reads only the faces
        faces = encoder_faces(t, det.to(dev), enc, area)
        yield key, img, faces, encode(enc, faces.crops, batch_size).cpu()


def embed_crops(images: Sequence[np.ndarray], model: str = DEFAULT_ENCODER, device=None,
                batch_size: int = 32, enc_area=None, weights_dir=None) -> Tensor:
    """Embed face crops given as images (already cut around one face each): the enc_area of
    each (default the whole image) is resized to the encoder's input."""
    dev = resolve_device(device)
    enc = cached_model(model, dev, weights_dir)
    size = encoder_geometry(enc)[0]
    area = parse_area(enc_area) or (0, 0, 1, 1)
    out = []
    for im in images:  # crops differ in size; each is one small warp
        t = torch.from_numpy(np.ascontiguousarray(im)).to(dev).permute(2, 0, 1)[None].float()
        h, w = im.shape[:2]
        box = torch.tensor([[0, 0, w, h]], dtype=torch.float64, device=dev)
        out.append(warp(t, area_matrices(box, area, size), None, (size, size), padding="replicate"))
    if not out:
        return torch.zeros(0, embedding_dim(enc))
    return encode(enc, torch.cat(out), batch_size).cpu()


def embed(paths: Sequence[str | os.PathLike], model: str = DEFAULT_ENCODER, det_model: str = DEFAULT_DETECTOR,
          min_score=None, device=None, batch_size: int = 32, enc_area=None, weights_dir=None) -> FaceTable:
    """Embed every face in images, folders (recursive) and .txt lists; unreadable files are
    warned about and skipped. Returns a FaceTable (one row per face)."""
    from ..ops.image import expand_paths

    rows_src, rows_idx, embs, boxes, scores, lms = [], [], [], [], [], []

    def readable():
        for p, im in read_ahead(expand_paths(paths)):
            if isinstance(im, Exception):
                warn(str(im))
            else:
                yield p, im

    for p, _, faces, e in embed_images(readable(), model, det_model, min_score, device, batch_size,
                                       enc_area=enc_area, weights_dir=weights_dir):
        if faces is None:
            continue
        d = faces.detections.to("cpu")
        rows_src += [str(p)] * len(d)
        rows_idx += list(range(len(d)))
        embs.append(e.numpy())
        boxes.append(d.boxes.numpy())
        scores.append(d.scores.numpy())
        lms.append(d.landmarks.numpy() if d.landmarks is not None else np.full((len(d), 5, 2), np.nan, np.float32))
    if not embs:
        return FaceTable(np.zeros((0, 0), np.float32), [], [], np.zeros((0, 4), np.float32),
                         np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
    return FaceTable(np.concatenate(embs).astype(np.float32), rows_src, rows_idx, np.concatenate(boxes),
                     np.concatenate(scores), np.concatenate(lms))
