"""Face alignment and cropping for photo collections and frames.

detect (or read landmarks) -> choose faces -> align/crop (pipeline.align: the geometry of an
Alignment or a DECA BoxSquare, warped from the original-resolution pixels) -> `post` steps
(Faces -> Faces) -> write crops and their matrices (crops.json). `uncrop` and `paste_back` move
pixels back.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import ModelCache, resolve_device
from ..errors import UsageError
from ..ops.align import FACE_SPAN, PADDING_MODES, TEMPLATES, invert, template_for, unwarp
from ..ops.image import as_rgb_uint8, atomic_write_bytes, expand_paths, image_list, write_image
from ..options import CropOptions
from ..types import Detections, Faces
from . import pipeline as pl
from .common import load_models, progress, readable, warn
from .attributes import Routing
from .landmark_files import LandmarkEntry, LandmarkFileError, match_inputs, read_landmark_file, reduce_to_five
from .detect import DEFAULT_DETECTOR
from .outdir import OutputFolder
from .pipeline import DECA_BBOX_SCALE

STRATEGIES = ("all", "largest", "best")
CROP_MODES = ("align", "bbox")
DEFAULT_OUTPUT_SIZE = 256
MANIFEST = "crops.json"
JOURNAL = "crops.partial.jsonl"
REPORT_FILES = ("no_faces.txt", "unreadable.txt", "no_landmarks.txt", "unused_landmarks.txt")
# Pixels decoded into one warp call at most: bounds the float32 copy (~12 bytes per pixel).
MAX_BATCH_PIXELS = 32_000_000

PostStep = Callable[[Faces], Faces]
DEFAULT_PARSER = "bisenet_celebamask"
DEFAULT_ENHANCER = "realesrgan_x4plus_ncnn"  # real weights here; BSRGAN (face-crop-plus's) has the same RRDBNet


class CropError(UsageError):
    """A crop run that cannot start (bad option, output folder already holding results, ...)."""


# ----------------------------------------------------------------------------- options

def parse_size(value) -> tuple[int, int]:
    """256 -> (256, 256); "300,200", "300x200" or (300, 200) -> (width, height)."""
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").split(",")
    elif isinstance(value, (int, np.integer)):
        parts = [value, value]
    else:
        parts = list(value)
    if len(parts) == 1:
        parts = parts * 2
    try:
        w, h = (int(str(p).strip()) for p in parts)
    except (ValueError, TypeError):
        raise CropError(f"output size must be N or W,H (pixels), got {value!r}") from None
    if w < 2 or h < 2:
        raise CropError(f"output size must be at least 2x2 pixels, got {w}x{h}")
    return w, h


@dataclass(frozen=True)
class Template:
    """Five alignment points (5,2) float64 in pixel-centre coordinates of a frame (w, h)."""

    name: str
    points: Tensor
    frame: tuple[int, int]

    @property
    def natural_face_factor(self) -> float:
        span = self.points.amax(0) - self.points.amin(0)
        return float(span.max() * FACE_SPAN / min(self.frame))

    def max_face_factor(self, size: tuple[int, int]) -> float:
        """The largest face factor that keeps all five points inside an output of `size`
        (points move away from the frame centre as the face factor grows)."""
        centre = torch.tensor([(self.frame[0] - 1) / 2, (self.frame[1] - 1) / 2], dtype=torch.float64)
        off = (self.points - centre).abs().amax(0)  # per axis
        per_ff = min(size) / min(self.frame) / self.natural_face_factor  # scale per unit face factor
        half = torch.tensor([size[0] / 2, size[1] / 2], dtype=torch.float64)
        return float((half / (off * per_ff)).min())

    def for_output(self, size: tuple[int, int], face_factor: float | None = None) -> Tensor:
        """The points for an output (w, h), scaled about the frame centre (align.template_for's
        rule, extended to any frame: s = min(w,h)/min(frame) * face_factor/natural)."""
        if self.name in TEMPLATES:
            return template_for(size, self.name, face_factor)
        fw, fh = self.frame
        scale = min(size) / min(fw, fh)
        if face_factor is not None:
            scale *= face_factor / self.natural_face_factor
        centre_in = torch.tensor([(fw - 1) / 2, (fh - 1) / 2], dtype=torch.float64)
        centre_out = torch.tensor([(size[0] - 1) / 2, (size[1] - 1) / 2], dtype=torch.float64)
        return (self.points - centre_in) * scale + centre_out


def load_template(spec: str | Template) -> Template:
    """"arcface", "ffhq", or a file: .json {"size": [w, h] (or one int), "points": [[x, y] x 5]}
    (a flat list of 10 numbers also works); any other extension: whitespace/comma separated
    numbers, `w h` then `x1 y1 ... x5 y5`, # starts a comment. Points are pixel-centre
    coordinates in that frame, ordered left eye, right eye, nose, left mouth, right mouth."""
    if isinstance(spec, Template):
        return spec
    if spec in TEMPLATES:
        pts, side = TEMPLATES[spec]
        return Template(spec, pts, (side, side))
    path = Path(spec)
    if not path.is_file():
        raise CropError(f"template must be {' or '.join(TEMPLATES)} or a template file; "
                        f"{spec!r} is neither")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CropError(f"{path}: cannot read template ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
            size, pts = data["size"], data["points"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CropError(f"{path}: expected {{\"size\": [w, h], \"points\": [[x, y], ...5]}} "
                            f"({type(e).__name__}: {e})") from None
        size = [size, size] if isinstance(size, (int, float)) else size
        flat = [v for p in pts for v in (p if isinstance(p, list) else [p])]
        numbers = list(size) + flat
    else:
        body = " ".join(line.split("#", 1)[0] for line in text.splitlines())
        try:
            numbers = [float(t) for t in body.replace(",", " ").split()]
        except ValueError as e:
            raise CropError(f"{path}: template text must hold numbers only ({e})") from None
    if len(numbers) != 12:
        raise CropError(f"{path}: a template is the frame size w h and 5 points (12 numbers), "
                        f"got {len(numbers)}")
    try:
        arr = np.asarray(numbers, dtype=np.float64)
    except (TypeError, ValueError):
        raise CropError(f"{path}: template values must be numbers") from None
    frame_ok = arr[0] > 0 and arr[1] > 0 and arr[0] == int(arr[0]) and arr[1] == int(arr[1])
    if not np.isfinite(arr).all() or not frame_ok:
        raise CropError(f"{path}: the frame size must be two positive integers and points finite")
    pts = torch.from_numpy(arr[2:].reshape(5, 2))
    if float((pts - pts.mean(0)).norm(dim=1).max()) <= 1e-9:
        raise CropError(f"{path}: the five template points coincide")
    return Template(path.name, pts, (int(arr[0]), int(arr[1])))


# ----------------------------------------------------------------------------- geometry

def bbox_matrices(boxes: Tensor, size: tuple[int, int], scale: float = DECA_BBOX_SCALE,
                  from_landmarks: Tensor | bool = True) -> Tensor:
    """(N,3,3) float64 transforms of DECA's square crop (pipeline.BoxSquare) of these boxes:
    landmark bounding boxes (from_landmarks True) or a face detector's boxes."""
    n = boxes.shape[0]
    dets = Detections(boxes, torch.ones(n), None, torch.zeros(n, dtype=torch.long))
    return pl.BoxSquare(size, scale, from_landmarks).matrices(dets)


def select_faces(dets: Detections, strategy: str) -> Tensor:
    """Indices of the faces of ONE image to crop: all (in their order), or the largest box /
    the best score."""
    if strategy == "all" or len(dets) == 0:
        return torch.arange(len(dets))
    if strategy == "largest":
        wh = (dets.boxes[:, 2:] - dets.boxes[:, :2]).clamp(min=0)
        key = wh[:, 0] * wh[:, 1]
    elif strategy == "best":
        key = dets.scores
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return key.argmax().reshape(1)  # argmax keeps the first of ties (detector/file order)


# ----------------------------------------------------------------------------- the cropper

def _to_source_pixels(faces: Faces, scales: Sequence[float]) -> Faces:
    """Faces cut from enhanced copies (scale s per image) with their matrices and detections
    back in the source images' pixels, so crops.json, uncrop and paste_back see the source."""
    if all(s == 1 for s in scales):
        return faces
    from ..ops.align import scale_matrix, transform_points

    per_face = torch.tensor(scales, dtype=torch.float64)[faces.image_index.cpu()]
    to_big = torch.stack([scale_matrix(float(s)) for s in per_face.tolist()]).to(faces.crop_mat.device)
    back = torch.linalg.inv(to_big)
    d = faces.detections
    boxes = transform_points(d.boxes.to(torch.float64).reshape(-1, 2, 2), back.to(d.boxes.device)).reshape(-1, 4)
    lm = None if d.landmarks is None else transform_points(d.landmarks.to(torch.float64), back.to(d.boxes.device))
    dets = Detections(boxes.to(d.boxes.dtype), d.scores, None if lm is None else lm.to(d.landmarks.dtype),
                      d.image_index)
    return replace(faces, crop_mat=faces.crop_mat @ to_big.to(faces.crop_mat.dtype), detections=dets)



@dataclass
class CropBatch:
    """Crops of a batch of images. faces.image_index indexes `keys`; face_index (N,) is each
    face's position among its image's faces (detector order, or file order for landmarks)."""

    keys: list
    image_sizes: list[tuple[int, int]]
    faces: Faces
    face_index: Tensor


@dataclass
class _Item:
    key: object
    image: np.ndarray
    dets: Detections  # the selected faces, image_index 0
    face_index: Tensor
    from_landmarks: bool
    size: tuple[int, int] = (0, 0)  # (w, h) of the source image (image may be its enhanced copy)
    scale: float = 1.0  # image's pixels per source pixel (enh_threshold)


class Cropper:
    """Aligned (or DECA bbox) face crops, batched on one device.

    output_size: N or (W, H). face_factor in (0, 1): the larger side of the template points'
    bounding box as a share of the output's shorter side (None: the template's own framing,
    arcface 0.365, ffhq 0.278; see docs/face_factor.md). template: "arcface", "ffhq" or a file
    (load_template). allow_skew: affine instead of similarity. padding: constant | replicate |
    reflect | wrap (OpenCV border modes; fill: the constant's value). crop_mode: "align" or
    "bbox" (DECA square, bbox_scale). strategy: all | largest | best. det_model / det_threshold
    / weights_dir: the detector (not loaded when landmarks are given). post: steps Faces -> Faces
    applied to each batch after warping, before anything is written (enhance, parse, ...); each
    must return the same faces in the same order (it may change crops, their size and crop_mat).
    parser / routing: with attribute or mask groups (attributes.Routing), each face is parsed
    (pipeline.parse_into) and Faces.masks carries its class map in the crop's frame.
    """

    def __init__(self, output_size=DEFAULT_OUTPUT_SIZE, *, face_factor: float | None = None,
                 template: str | Template = "arcface", allow_skew: bool = False,
                 padding: str = "constant", fill: float | Sequence[float] = 0.0,
                 crop_mode: str = "align", bbox_scale: float = DECA_BBOX_SCALE,
                 strategy: str = "all", det_model: str = DEFAULT_DETECTOR,
                 det_threshold: float | None = None, device=None, precision: str = "float32",
                 batch_size: int = 8, weights_dir=None, post: Sequence[PostStep] = (),
                 models: ModelCache | None = None, parser: str = DEFAULT_PARSER, routing: Routing | None = None,
                 landmarks_model: str | None = None, enh_threshold: float | None = None,
                 enh_model: str = DEFAULT_ENHANCER, enh_tile: int = 256):
        self.size = parse_size(output_size)
        if crop_mode not in CROP_MODES:
            raise CropError(f"crop mode must be one of {', '.join(CROP_MODES)}, got {crop_mode!r}")
        if padding not in PADDING_MODES:
            raise CropError(f"padding must be one of {', '.join(PADDING_MODES)}, got {padding!r}")
        if strategy not in STRATEGIES:
            raise CropError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if face_factor is not None:
            if crop_mode == "bbox":
                raise CropError("--face-factor applies to --crop-mode align; bbox crops are sized "
                                "by --bbox-scale")
            if not 0 < float(face_factor) < 1:
                raise CropError(f"face factor must be in (0, 1), got {face_factor}")
            face_factor = float(face_factor)
        if not float(bbox_scale) > 0:
            raise CropError(f"bbox scale must be > 0, got {bbox_scale}")
        if det_threshold is not None and not 0 <= float(det_threshold) <= 1:
            raise CropError(f"detection threshold must be in [0, 1], got {det_threshold}")
        if int(batch_size) < 1:
            raise CropError(f"batch size must be >= 1, got {batch_size}")
        self.face_factor = face_factor
        self.template = load_template(template)
        self.template_points = self.template.for_output(self.size, face_factor)
        limit = self.template.max_face_factor(self.size)
        if crop_mode == "align" and face_factor is not None and face_factor > limit:
            warn(f"face factor {face_factor}: the {self.template.name} template's points leave the "
                 f"{self.size[0]}x{self.size[1]} crop (the face is cut off); they stay inside up to "
                 f"{limit:.3f} (see docs/face_factor.md)")
        self.allow_skew = bool(allow_skew)
        self.padding, self.fill = padding, fill
        self.crop_mode, self.bbox_scale = crop_mode, float(bbox_scale)
        self.strategy = strategy
        self.det_model, self.det_threshold = det_model, det_threshold
        self.device, self.precision = resolve_device(device), precision
        self.batch_size = int(batch_size)
        self.weights_dir = weights_dir
        self.post = list(post)
        self.models = models
        self.parser, self.routing = parser, routing or Routing()
        self.landmarks_model = landmarks_model
        if enh_threshold is not None and not 0 < float(enh_threshold) < 1:
            raise CropError(f"--enh-threshold is a share of the image's area in (0, 1), got {enh_threshold}")
        self.enh_threshold, self.enh_model, self.enh_tile = enh_threshold, enh_model, int(enh_tile)

    # -- geometry of one batch
    def _model(self, name: str):
        (model,) = load_models(self.models, self.device, self.weights_dir, name, precision=self.precision)
        return model

    def geometry(self, from_landmarks: Tensor | bool = False) -> pl.Geometry:
        """The crop geometry; from_landmarks (per face) tells bbox mode which boxes are landmark
        outlines. Align mode frames faces without landmarks by their boxes (pipeline.Alignment)."""
        if self.crop_mode == "bbox":
            return pl.BoxSquare(self.size, self.bbox_scale, from_landmarks)
        return pl.Alignment(self.size, self.template_points, self.allow_skew)

    # -- face sources
    def _item(self, key, image, dets: Detections, from_landmarks: bool) -> _Item:
        idx = select_faces(dets, self.strategy)
        item = _Item(key, image, dets.select(idx), idx, from_landmarks, (image.shape[1], image.shape[0]))
        return self._enhanced(item) if self.enh_threshold is not None else item

    def _enhanced(self, item: _Item) -> _Item:
        """face-crop-plus's enh_threshold: an image whose faces take on average less than that
        share of its area is enhanced whole (tiled) before cropping; its faces move with it."""
        from ..ops.align import scale_matrix, transform_points
        from .enhance import enhance_whole

        b = item.dets.boxes.to(torch.float64)
        if not len(b):
            return item
        share = float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean()) / (item.size[0] * item.size[1])
        if share >= self.enh_threshold:
            return item
        model = self._model(self.enh_model)
        s = float(model.spec.meta.scale)
        m = scale_matrix(s)[None]
        d = item.dets
        boxes = transform_points(d.boxes.to(torch.float64).reshape(-1, 2, 2), m.expand(len(d), 3, 3))
        lm = None if d.landmarks is None else transform_points(d.landmarks.to(torch.float64), m.expand(len(d), 3, 3))
        moved = Detections(boxes.reshape(-1, 4).to(d.boxes.dtype), d.scores,
                           None if lm is None else lm.to(d.landmarks.dtype), d.image_index)
        image = enhance_whole(model, item.image, self.enh_tile)
        return replace(item, image=image, dets=moved, scale=s)

    def detected(self, frames: Iterable[tuple[object, np.ndarray]]) -> Iterator[_Item]:
        """Faces from the detector, with the landmarker's points when there is one; bbox mode
        then frames each face by its points' box, as it does for points from a file."""
        detector = self._model(self.det_model)
        landmarker = None
        if self.landmarks_model:
            landmarker = self._model(self.landmarks_model)
        from_points = landmarker is not None and self.crop_mode == "bbox"
        for key, image, dets in pl.detect_stream(frames, detector, min_score=self.det_threshold,
                                                 batch_size=self.batch_size):
            dets = pl.add_landmarks(landmarker, pl.as_chw(image), dets)
            yield self._item(key, image, pl.points_box(dets) if from_points and len(dets) else dets, from_points)

    def given(self, frames: Iterable[tuple[object, np.ndarray]],
              landmarks: Mapping[object, Sequence[np.ndarray]]) -> Iterator[_Item]:
        """Faces from landmarks instead of a detector: landmarks[key] = [(K,2) points per face]."""
        for key, image in frames:
            yield self._item(key, image, detections_from_points(landmarks.get(key, [])), True)

    # -- warping
    def batches(self, items: Iterable[_Item]) -> Iterator[CropBatch]:
        """Group items into batches (batch_size images, bounded pixels) and crop each."""
        pending: list[_Item] = []
        pixels = 0
        for it in items:
            pending.append(it)
            pixels += it.image.shape[0] * it.image.shape[1] if len(it.dets) else 0
            if len(pending) >= self.batch_size or pixels >= MAX_BATCH_PIXELS:
                yield self._crop_batch(pending)
                pending, pixels = [], 0
        if pending:
            yield self._crop_batch(pending)

    def _crop_batch(self, items: list[_Item]) -> CropBatch:
        with_faces = [i for i, it in enumerate(items) if len(it.dets)]
        faces = Faces.empty(self.size, self.device)
        if with_faces:  # only images with faces go to the device
            dets = Detections.cat([items[i].dets.shift_images(j) for j, i in enumerate(with_faces)])
            flags = torch.cat([torch.full((len(items[i].dets),), items[i].from_landmarks) for i in with_faces])
            images = [pl.as_chw(items[i].image, self.device) for i in with_faces]
            faces = pl.align(images, dets, self.geometry(flags), self.padding, self.fill)
            if self.routing.active:
                parser = self._model(self.parser)
                faces = pl.parse_into(parser, images, faces)
            faces = _to_source_pixels(faces, [items[i].scale for i in with_faces])
            faces.detections.image_index = torch.tensor(with_faces, device=self.device)[faces.image_index]
        face_index = torch.cat([it.face_index for it in items]) if items else torch.zeros(0, dtype=torch.long)
        for step in self.post:
            out = step(faces)
            if not isinstance(out, Faces) or len(out) != len(faces):
                raise TypeError(f"post step {getattr(step, '__name__', step)!r} must return Faces "
                                f"with the same {len(faces)} faces in the same order")
            faces = out
        return CropBatch([it.key for it in items], [it.size for it in items], faces, face_index)

    # -- in-memory API
    def crop(self, images, landmarks: Sequence[Sequence[np.ndarray]] | None = None,
             detections: Detections | None = None) -> Faces:
        """Crop in-memory images; Faces.image_index indexes `images` (0 for a single image).

        images: one image or a list of them, each a path, a PIL image, a numpy array HxWx3 (HxW
        grey, HxWx4 alpha dropped) or a tensor CxHxW / HxWx3, RGB (not BGR), uint8 or float in
        0..255; a 4-D numpy array (B,H,W,3) or tensor (B,3,H,W) is a batch. Anything else
        (floats in 0..1 among it: pass x * 255) raises InputError naming what was given
        (ops.image.as_rgb_uint8). Faces come from the detector, or from `landmarks` (per image
        a list of (K,2) points per face, K = 5/68/98/106; for a single image, just its list of
        faces), or from `detections` already made (image_index into `images`, 5 landmarks for
        align mode). The strategy applies in every case."""
        images, single = image_list(images)
        if single and landmarks is not None:
            landmarks = [landmarks]
        frames = [(i, as_rgb_uint8(im, "image" if single else f"images[{i}]"))
                  for i, im in enumerate(images)]
        if landmarks is not None and detections is not None:
            raise ValueError("give landmarks or detections, not both")
        if landmarks is not None:
            if len(landmarks) != len(frames):
                raise ValueError(f"{len(landmarks)} landmark lists for {len(frames)} images")
            items = self.given(frames, dict(enumerate(landmarks)))
        elif detections is not None:
            dets = detections.to("cpu")
            items = (self._item(i, im, dets.for_image(i).shift_images(-i), False) for i, im in frames)
        else:
            items = self.detected(frames)
        parts = []
        for batch in self.batches(items):
            f = batch.faces
            keys = torch.tensor(batch.keys, dtype=torch.long)
            idx = keys[f.image_index.cpu()].to(f.image_index.device)
            parts.append(replace(f, detections=Detections(f.detections.boxes, f.detections.scores,
                                                          f.detections.landmarks, idx)))
        parts = [p for p in parts if len(p)]
        return Faces.cat(parts) if parts else Faces.empty(self.size)


def to_uint8(crops: Tensor) -> np.ndarray:
    """Float crops (N,C,h,w) 0..255 -> uint8 (N,h,w,C) numpy, rounded (half up), on the CPU."""
    return crops.clamp(0, 255).add_(0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def detections_from_points(faces: Sequence[np.ndarray]) -> Detections:
    """Detections for given landmarks: the 5 alignment points, the bounding box of all points,
    score 1 (the file's order is kept)."""
    if not len(faces):
        return Detections.empty()
    five = torch.from_numpy(np.stack([reduce_to_five(np.asarray(f, dtype=np.float64)) for f in faces]))
    boxes = torch.from_numpy(np.stack([np.concatenate([np.min(f, 0), np.max(f, 0)]) for f in faces]))
    n = len(faces)
    return Detections(boxes, torch.ones(n, dtype=torch.float64), five, torch.zeros(n, dtype=torch.long))


def crop(images, output_size=DEFAULT_OUTPUT_SIZE, landmarks=None, **options) -> Faces:
    """One-call crop of images (one or a list: paths, PIL images, numpy HxWx3 or tensors
    CxHxW, RGB uint8 or float in 0..255, as Cropper.crop takes them; options as for Cropper)."""
    return Cropper(output_size, **options).crop(images, landmarks)


# ----------------------------------------------------------------------------- pixels back

def _as_batch(x, what: str) -> tuple[Tensor, bool]:
    """numpy HxWxC / NxHxWxC or tensor CxHxW / NxCxHxW -> (N,C,H,W) tensor, and whether numpy."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t[None] if t.ndim == 3 else t
        if t.ndim != 4:
            raise ValueError(f"{what} must be HxWxC or NxHxWxC, got shape {x.shape}")
        return t.permute(0, 3, 1, 2), True
    t = x[None] if x.ndim == 3 else x
    if t.ndim != 4:
        raise ValueError(f"{what} must be CxHxW or NxCxHxW, got shape {tuple(x.shape)}")
    return t, False


def _as_mats(m, n: int) -> Tensor:
    t = torch.as_tensor(np.asarray(m) if not isinstance(m, Tensor) else m, dtype=torch.float64)
    t = t[None] if t.ndim == 2 else t
    if t.shape[1:] != (3, 3) or t.shape[0] not in (1, n):
        raise ValueError(f"matrix must be 3x3 or ({n},3,3), got {tuple(t.shape)}")
    return t.expand(n, 3, 3)


def _restore(t: Tensor, like_dtype, numpy_out: bool, squeeze: bool):
    if like_dtype in (np.uint8, torch.uint8):
        t = t.round().clamp(0, 255)
    if numpy_out:
        out = t.permute(0, 2, 3, 1).cpu().numpy()
        out = out.astype(like_dtype)
        return out[0] if squeeze else out
    out = t.to(like_dtype)
    return out[0] if squeeze else out


def uncrop(crops, matrices, image_size: Sequence[int]):
    """Warp crops back into their source image's space (image_size = (W, H)).

    crops: numpy HxWxC (or NxHxWxC) or tensors CxHxW (NxCxHxW); matrices: their image->crop
    3x3 (crops.json "matrix"). Returns (image, mask): the crop's pixels where the source image
    maps inside the crop, 0 elsewhere, in the crops' type and dtype; mask bool (True inside).
    """
    squeeze = crops.ndim == 3
    batch, is_np = _as_batch(crops, "crops")
    dtype = crops.dtype.type if is_np else crops.dtype
    mats = _as_mats(matrices, batch.shape[0])
    out, mask = unwarp(batch, mats, image_size)
    img = _restore(out, dtype, is_np, squeeze)
    m = mask[:, 0]
    if is_np:
        m = m.cpu().numpy()
    return img, (m[0] if squeeze else m)


def feather_mask(height: int, width: int, feather: float, valid: Tensor | None = None,
                 device=None) -> Tensor:
    """(N,1,h,w) soft paste mask in crop space: the valid area (whole crop, or `valid` (N,1,h,w)
    in [0,1], e.g. a parsing mask) eroded by e = feather * min(h, w) pixels, then blurred
    (Gaussian, sigma e/3, radius e), so it rises from 0 at the valid area's edge to 1 about
    2e inside it and the pasted crop leaves no seam."""
    m = torch.ones(1, 1, height, width, device=device) if valid is None else valid.float()
    e = int(round(feather * min(height, width)))
    if e <= 0:
        return m
    # Erosion = min filter; the outside counts as invalid, so the crop border erodes too.
    m = 1 - F.max_pool2d(F.pad(1 - m, (e, e, e, e), value=1.0), 2 * e + 1, stride=1)
    x = torch.arange(-e, e + 1, dtype=torch.float32, device=m.device)
    g = torch.exp(-0.5 * (x / (e / 3)) ** 2)
    g = g / g.sum()
    m = F.conv2d(F.pad(m, (e, e, 0, 0)), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(m, (0, 0, e, e)), g.view(1, 1, -1, 1))


def paste_back(image, crop, matrix, feather: float = 0.1, mask=None):
    """Blend crop(s) back into their source image through their image->crop matrices.

    image: numpy HxWxC or tensor CxHxW (returned in the same type/dtype, the input untouched);
    crop: HxWxC / NxHxWxC (numpy) or CxHxW / NxCxHxW (tensor) of any size (e.g. an enhanced,
    upscaled crop, whose matrix then includes the upscaling); matrix: 3x3 or (N,3,3).
    feather: soft-edge width as a share of the crop's shorter side (0 = hard edge); mask:
    optional (h,w) / (N,h,w) share of each crop to paste (e.g. skin from a parser), feathered
    the same way. Faces are pasted in order, later ones over earlier ones where they overlap.
    """
    img_b, img_np = _as_batch(image, "image")
    if img_b.shape[0] != 1:
        raise ValueError("paste_back takes one image")
    out_dtype = image.dtype.type if img_np else image.dtype
    canvas = img_b[0].to(torch.float32 if not img_b.is_floating_point() else img_b.dtype).clone()
    crops, _ = _as_batch(crop, "crop")
    crops = crops.to(canvas)
    n, c, h, w = crops.shape
    mats = _as_mats(matrix, n)
    valid = None
    if mask is not None:
        valid = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
        valid = valid.reshape(-1, 1, h, w).to(canvas).expand(n, 1, h, w)
    alpha = feather_mask(h, w, feather, valid, canvas.device).expand(n, 1, h, w)
    height, width = canvas.shape[1:]
    corners = torch.tensor([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]],
                           dtype=torch.float64)
    inv = invert(mats)
    # Sequential on purpose: overlapping faces compose in order. Each step touches only the
    # crop's footprint window, so a small face in a large image costs little.
    for k in range(n):
        pts = corners @ inv[k, :2, :2].T + inv[k, :2, 2]
        x0, y0 = (int(np.floor(float(v))) for v in pts.amin(0))
        x1, y1 = (int(np.ceil(float(v))) + 1 for v in pts.amax(0))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        shift = torch.eye(3, dtype=torch.float64)
        shift[:2, 2] = torch.tensor([x0, y0], dtype=torch.float64)
        layers = torch.cat([crops[k:k + 1], alpha[k:k + 1].to(crops)], 1)
        back, inside = unwarp(layers, (mats[k] @ shift)[None], (x1 - x0, y1 - y0))
        a = back[0, c:] * inside[0]
        win = canvas[:, y0:y1, x0:x1]
        canvas[:, y0:y1, x0:x1] = win + a * (back[0, :c] - win)
    return _restore(canvas[None], out_dtype, img_np, True)


# ----------------------------------------------------------------------------- files

def plan_inputs(inputs: Sequence[str | os.PathLike], exclude: Path | None = None
                ) -> tuple[list[Path], Path]:
    """Image files from files, folders (recursive) and .txt lists, without duplicates or files
    under `exclude` (the output folder); and the root folder whose tree the outputs mirror (the
    common folder of the folders given and of the files' parents)."""
    files: list[Path] = []
    bases: list[Path] = []
    for arg in inputs:
        p = Path(arg)
        found = list(expand_paths([p]))
        files += found
        if p.is_dir():
            bases.append(p)
        else:
            bases += [q.parent for q in found]
    excl = exclude.resolve() if exclude is not None else None
    seen: set[Path] = set()
    unique: list[Path] = []
    dropped = 0
    for f in files:
        r = f.resolve()
        if excl is not None and (r == excl or excl in r.parents):
            continue
        if r in seen:
            dropped += 1
            continue
        seen.add(r)
        unique.append(f)
    if dropped:
        warn(f"{dropped} input(s) given more than once; each is cropped once")
    root = Path(os.path.commonpath([str(b.resolve()) for b in bases])) if bases else Path.cwd()
    return unique, root


def output_stems(files: Sequence[Path], root: Path) -> dict[Path, str]:
    """Output name (posix, relative to the output folder, without face suffix and extension)
    for each input: its path under `root` without the extension. Inputs that would share a
    name (a.jpg and a.png in one folder) keep their extension in it (a.jpg_0.jpg, a.png_0.jpg)."""
    root = root.resolve()
    rel = {}
    for f in files:
        r = f.resolve()
        try:
            rel[f] = r.relative_to(root)
        except ValueError:
            rel[f] = Path(r.name)
    stems = {f: r.with_suffix("").as_posix() for f, r in rel.items()}
    counts: dict[str, int] = {}
    for s in stems.values():
        counts[s] = counts.get(s, 0) + 1
    for f in files:
        if counts[stems[f]] > 1:
            stems[f] = rel[f].as_posix()
    taken: set[str] = set()
    for f in files:  # a last resort, for names that still clash (a.png.jpg next to a.png)
        s, k = stems[f], 2
        while s in taken:
            s, k = f"{stems[f]}~{k}", k + 1
        stems[f] = s
        taken.add(s)
    return stems


def load_crops(out_dir: str | os.PathLike) -> dict[str, dict]:
    """The crop records of an output folder: crops.json, or for a run that was killed before
    it finished, the complete lines of its crops.partial.jsonl journal. Sources are returned
    as absolute paths."""
    out = Path(out_dir)
    manifest, journal = out / MANIFEST, out / JOURNAL
    if manifest.exists():
        data = json.loads(manifest.read_text())
    elif journal.exists():
        data = {}
        for line in journal.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            data[rec.pop("file")] = rec
    else:
        raise FileNotFoundError(f"{out} holds no {MANIFEST}")
    for rec in data.values():
        rec["source"] = str((out / rec["source"]).resolve())
    return data


def _prepare_output(out: Path, overwrite: bool) -> None:
    existing = [n for n in (MANIFEST, JOURNAL) if (out / n).exists()]
    if not existing:
        return
    if not overwrite:
        raise CropError(f"{out} already holds crop results ({existing[0]}); pass --overwrite to "
                        "replace them, or choose another --out")
    # Remove exactly what the previous run wrote, so old and new crops never mix.
    try:
        old = load_crops(out)
    except (json.JSONDecodeError, OSError) as e:
        raise CropError(f"{out / existing[0]} is unreadable ({e}); remove the folder's old "
                        "results by hand") from None
    root = out.resolve()
    for name in old:
        p = (out / name).resolve()
        if root in p.parents and p.is_file():
            p.unlink()
    for name in (MANIFEST, JOURNAL) + REPORT_FILES:
        (out / name).unlink(missing_ok=True)


def _rel_source(src: Path, out: Path) -> str:
    try:
        return Path(os.path.relpath(src.resolve(), out.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(src.resolve())


def _records(batch: CropBatch, out: Path) -> list[dict]:
    """crops.json entries of a batch's faces (small tensors moved to the CPU once, not per face)."""
    f = batch.faces
    mats = f.crop_mat.to("cpu", torch.float64).tolist()
    lms = None if f.detections.landmarks is None else f.detections.landmarks.cpu().tolist()
    boxes, scores = f.detections.boxes.cpu().tolist(), f.detections.scores.cpu().tolist()
    sources = [_rel_source(k, out) for k in batch.keys]
    rows = []
    for k, i in enumerate(f.image_index.cpu().tolist()):
        rows.append({
            "source": sources[i], "face_index": int(batch.face_index[k]), "matrix": mats[k],
            "landmarks": [] if lms is None else [[round(x, 3), round(y, 3)] for x, y in lms[k]],
            "box": [round(v, 3) for v in boxes[k]], "score": round(scores[k], 5),
            "image_size": list(batch.image_sizes[i])})
    return rows


def _routed_files(names: list[str], routing: Routing, faces: Faces
                  ) -> list[tuple[str, int, tuple[str, Tensor] | None]]:
    """(file, face, (mask file, mask) or None) for every crop a batch writes: one per face, or
    with attribute and mask groups one per group the face belongs to (attributes.Routing),
    its mask in <group>_mask/ under the same name as a .png."""
    if not routing.active:
        return [(name, k, None) for k, name in enumerate(names)]
    if len(faces) == 0:
        return []
    return [(f"{folder}/{name}", k, None if mask is None else
             (f"{folder}_mask/{Path(name).with_suffix('.png').as_posix()}", mask))
            for k, (name, routes) in enumerate(zip(names, routing.routes(faces.masks)))
            for folder, mask in routes]


def _write_manifest(out: Path, records: dict[str, dict]) -> None:
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in records.items())
    atomic_write_bytes(out / MANIFEST, ("{\n" + body + "\n}\n" if records else "{}\n").encode())


def _write_list(out: Path, name: str, items: Sequence) -> None:
    if items:
        atomic_write_bytes(out / name, "".join(f"{i}\n" for i in items).encode())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _preview(items: Sequence, n: int = 3) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


@dataclass
class CropSink:
    """Where a crop run's results go: the crop images (written on 2 threads: encoding releases
    the GIL), a journal of their records fsynced per batch (so a killed run stays readable),
    and at the end crops.json and the lists of images without faces or unreadable."""

    out: Path
    stems: dict
    ext: str
    suffixed: bool  # strategy all: name_0, name_1, ...
    total: int | None = None  # images, for the progress bar
    routing: Routing = field(default_factory=Routing)
    records: dict = field(default_factory=dict)
    no_faces: list = field(default_factory=list)
    images: int = 0
    unrouted: int = 0  # faces in no attribute or mask group, so not written

    def __enter__(self) -> "CropSink":
        self.out.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.out / JOURNAL, "a", encoding="utf-8")
        self._pool = ThreadPoolExecutor(2)
        self._bar = progress(self.total, "img", "crop")
        return self

    def add(self, batch: CropBatch) -> None:
        self.images += len(batch.keys)
        pixels = to_uint8(batch.faces.crops)
        image_index = batch.faces.image_index.cpu()
        names = [f"{self.stems[batch.keys[i]]}{f'_{int(batch.face_index[k])}' if self.suffixed else ''}.{self.ext}"
                 for k, i in enumerate(image_index.tolist())]
        files = _routed_files(names, self.routing, batch.faces)
        list(self._pool.map(lambda f: self._write(f[0], pixels[f[1]], f[2]), files))
        rows = _records(batch, self.out)
        lines = []
        for name, k, mask in files:
            rec = rows[k] if mask is None else {**rows[k], "mask": mask[0]}
            self.records[name] = rec
            lines.append(json.dumps({"file": name, **rec}) + "\n")
        self.unrouted += len(names) - len({k for _, k, _ in files})
        self._journal.write("".join(lines))
        self._journal.flush()
        os.fsync(self._journal.fileno())
        counts = torch.bincount(image_index, minlength=len(batch.keys)).tolist()
        self.no_faces += [key for key, c in zip(batch.keys, counts) if c == 0]
        self._bar.update(len(batch.keys))
        self._bar.set_postfix(crops=len(self.records))

    def _write(self, name: str, pixels: np.ndarray, mask: tuple[str, Tensor] | None) -> None:
        for file, image in ((name, pixels),) + (() if mask is None else
                                                ((mask[0], (mask[1].to("cpu", torch.uint8) * 255).numpy()),)):
            (self.out / file).parent.mkdir(parents=True, exist_ok=True)
            write_image(self.out / file, image)

    def __exit__(self, kind, *_):
        self._bar.close()
        self._pool.shutdown()
        self._journal.close()
        _write_manifest(self.out, self.records)
        (self.out / JOURNAL).unlink(missing_ok=True)
        _write_list(self.out, "no_faces.txt", self.no_faces)
        if kind is KeyboardInterrupt:
            print(f"tidyface: interrupted; {self.out / MANIFEST} lists the {len(self.records)} crops "
                  "written so far", file=sys.stderr)


def run_crop(inputs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
             options: CropOptions | None = None, post: Sequence[PostStep] = (),
             models: ModelCache | None = None, **flags) -> int:
    """The `tidyface crop` command: crops of the faces in `inputs` into `out` (flags: the
    fields of CropOptions, or `options` whole). Returns the exit code (0 ok; 1 some images
    unreadable or without landmarks in the landmark file); a run that cannot start raises a
    TidyfaceError before the output folder is touched."""
    o = options or CropOptions(out=None if out is None else str(out), **flags)
    if not inputs:
        raise UsageError("give at least one image, folder or .txt list")
    out = Path(o.out)
    cropper = Cropper(o.output_size, face_factor=o.face_factor, template=o.template,
                      allow_skew=o.allow_skew, padding=o.padding, crop_mode=o.crop_mode,
                      bbox_scale=o.bbox_scale, strategy=o.strategy, det_model=o.det_model,
                      det_threshold=o.det_threshold, device=o.device, precision=o.precision,
                      batch_size=o.batch_size, weights_dir=o.weights_dir, post=post, models=models,
                      parser=o.parse_model, routing=o.routing(), landmarks_model=o.landmarks_model,
                      enh_threshold=o.enh_threshold, enh_model=o.enh_model)
    with OutputFolder(out, "crop", inputs) as folder:
        files, root = plan_inputs(inputs, exclude=out)
        if not files:
            raise CropError("no images found in " + ", ".join(map(str, inputs)))
        match = None
        if o.landmarks is not None:
            table = read_landmark_file(o.landmarks)
            match = match_inputs(table, files, root)
            _check_given_faces(cropper, match.faces, table.path)
        else:  # the detector's weights before the output folder is touched
            load_models(models, o.device, o.weights_dir, o.det_model, *filter(None, [o.landmarks_model]),
                        precision=o.precision)
        if cropper.routing.active:
            load_models(models, o.device, o.weights_dir, o.parse_model, precision=o.precision)
        if o.enh_threshold is not None:
            load_models(models, o.device, o.weights_dir, o.enh_model, precision=o.precision)
        folder.claim(False, resume=True)  # refuses another command's folder, before anything goes
        _prepare_output(out, o.overwrite)  # crops.json names this command's files: exactly those go
        folder.record([MANIFEST, JOURNAL, *REPORT_FILES])
        return _crop_into(out, cropper, files, root, match, o)


def _crop_into(out: Path, cropper: Cropper, files: list[Path], root: Path, match, o: CropOptions) -> int:
    unreadable: list[Path] = []
    if match is None:
        items = cropper.detected(readable(files, unreadable))
    else:
        _report_landmark_match(match, len(files), o.landmarks, out)
        face_points = {p: [e.points for e in entries] for p, entries in match.faces.items()}
        items = cropper.given(readable([f for f in files if f in match.faces], unreadable), face_points)
    try:
        with CropSink(out, output_stems(files, root), o.ext, o.strategy == "all", total=len(files),
                      routing=cropper.routing) as sink:
            for batch in cropper.batches(items):
                sink.add(batch)
    finally:
        _write_list(out, "unreadable.txt", unreadable)
    _summary(sink, unreadable, match)
    return 1 if unreadable or (match is not None and match.missing) else 0


def _report_landmark_match(match, n_files: int, landmarks, out: Path) -> None:
    if match.missing:
        warn(f"{_count(len(match.missing), 'image')} of {n_files} have no entry in "
             f"{landmarks} and are not cropped (list: {out / REPORT_FILES[2]}): "
             f"{_preview(match.missing)}")
    if match.unused:
        warn(f"{landmarks}: no input image matches {_count(len(match.unused), 'name')} in it "
             f"(list: {out / REPORT_FILES[3]}): {_preview(match.unused)}")
    _write_list(out, "no_landmarks.txt", match.missing)
    _write_list(out, "unused_landmarks.txt", match.unused)


def _summary(sink: CropSink, unreadable: list[Path], match) -> None:
    out, no_faces = sink.out, sink.no_faces
    parts = [f"{_count(len(sink.records), 'crop')} from {_count(sink.images - len(no_faces), 'image')} "
             f"into {out}"]
    if no_faces:
        parts.append(f"{_count(len(no_faces), 'image')} without faces (list: {out / 'no_faces.txt'})")
    if unreadable:
        parts.append(f"{len(unreadable)} unreadable (list: {out / 'unreadable.txt'})")
    if match is not None and match.missing:
        parts.append(f"{len(match.missing)} without landmarks (list: {out / 'no_landmarks.txt'})")
    if sink.unrouted:
        parts.append(f"{_count(sink.unrouted, 'face')} in no attribute or mask group, not written")
    print("tidyface: " + "; ".join(parts), file=sys.stderr)


def _check_given_faces(cropper: Cropper, faces: Mapping[Path, list[LandmarkEntry]],
                       source: Path) -> None:
    """Fail before any work on a face of the landmark file that cannot be cropped, naming its line."""
    entries = [e for es in faces.values() for e in es]
    for e in entries:
        if cropper.crop_mode == "bbox":
            if len(e.points) == 5:
                raise LandmarkFileError(f"{source}:{e.line}: --crop-mode bbox needs a face outline "
                                        "(68, 98 or 106 points); this face has 5")
            continue
        five = reduce_to_five(e.points)
        centred = five - five.mean(0)
        var = float((centred ** 2).sum(1).mean())
        # The same tests umeyama applies (no spread; for an affine, no 2D spread).
        if var <= 1e-20 * (1 + float((five ** 2).sum(1).mean())):
            what = "coincide"
        elif cropper.allow_skew and np.linalg.det(centred.T @ centred / 5) <= 1e-12 * var ** 2:
            what = "are collinear (--allow-skew needs them spread in 2D)"
        else:
            continue
        raise LandmarkFileError(f"{source}:{e.line}: the face's 5 alignment points {what}; "
                                "no transform is defined")
