"""The face pipeline: detect -> (landmarks) -> align/crop -> (enhance) -> (parse) -> embed ->
dedup -> group, each step one function over a batch of faces.

`crop`, `embed`, `group` and `video2faces` are arrangements of these steps between a source
(images, video frames) and a sink (files, tables). Steps take models through their protocols
(models/base.py) and settings as arguments; no step holds state.

Geometry facts: the similarity fit, templates and face-factor definition are ops/align.py's; the
bbox crop is DECA's (yfeng95/DECA decalib/datasets/datasets.py, `bbox2point` and the 3-corner
similarity onto [0, res-1]): for landmark boxes the square has side scale * 1.1 * (w + h)/2,
centred on the box; for a detector box, side scale * (w + h)/2, centred 0.12 * (w + h)/2 below
the box centre.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ..models.base import PreparedImage, model_device
from ..ops.align import FACE_SPAN, invert, umeyama, warp, warp_labels
from ..types import Detections, Faces, FaceTable
from . import dedup as dd
from . import grouping as gp

DECA_BBOX_SCALE = 1.25
DECA_LANDMARK_ENLARGE = 1.1  # bbox2point, type 'kpt68'
DECA_DETECTOR_SHIFT = 0.12  # bbox2point, type 'bbox': centre moved down by this * (w + h)/2


# ----------------------------------------------------------------------------- detect

def detect_stream(frames: Iterable[tuple[object, np.ndarray]], detector, *,
                  min_score: float | None = None, max_size: int | None = None,
                  batch_size: int = 8) -> Iterator[tuple[object, np.ndarray, Detections]]:
    """Detect faces in a stream of (key, RGB uint8 image), batching consecutive images that the
    detector prepares to one size. Yields (key, image, Detections on the CPU, image_index 0,
    in the image's pixels) in input order."""
    pending: list[tuple[object, np.ndarray, PreparedImage]] = []

    def flush():
        dets = detector.detect_prepared([p for _, _, p in pending], min_score=min_score).to("cpu")
        for i, (key, im, _) in enumerate(pending):
            yield key, im, dets.for_image(i).shift_images(-i)
        pending.clear()

    for key, im in frames:
        prepared = detector.prepare(im, max_size)
        if pending and (prepared.pixels.shape != pending[0][2].pixels.shape or len(pending) >= batch_size):
            yield from flush()
        pending.append((key, im, prepared))
    if pending:
        yield from flush()


def add_landmarks(landmarker, image: Tensor, dets: Detections) -> Detections:
    """The landmarks step: one image's (3,H,W) faces with the landmarker's K points each (in
    place of the detector's), boxes and scores kept; on the CPU like detect_stream's."""
    if landmarker is None:
        return dets
    dev = model_device(landmarker)
    return landmarker.landmarks(image.to(dev)[None], dets.to(dev)).to("cpu")


def points_box(dets: Detections) -> Detections:
    """The faces with their boxes replaced by the bounding boxes of their points (DECA's bbox
    crop starts from the landmarks' box, not the detector's)."""
    lm = dets.landmarks.to(dets.boxes.dtype)
    return replace(dets, boxes=torch.cat([lm.amin(1), lm.amax(1)], 1))


# ----------------------------------------------------------------------------- crop geometry

def box_face_matrices(boxes: Tensor, face_square: Tensor) -> Tensor:
    """(N,3,3) float64 for faces without alignment points: the square of side (w + h)/2 on each
    box's centre maps onto `face_square` (cx, cy, side) in the crop, no rotation."""
    b = boxes.to(torch.float64)
    side = ((b[:, 2:] - b[:, :2]).sum(1) / 2).clamp(min=1e-6)
    centre = (b[:, :2] + b[:, 2:]) / 2
    s = float(face_square[2]) / side
    out = torch.zeros(len(b), 3, 3, dtype=torch.float64, device=b.device)
    out[:, 0, 0], out[:, 1, 1], out[:, 2, 2] = s, s, 1
    out[:, 0, 2] = float(face_square[0]) - s * centre[:, 0]
    out[:, 1, 2] = float(face_square[1]) - s * centre[:, 1]
    return out


@dataclass(frozen=True)
class Alignment:
    """Crops of `size` (w, h) whose 5 alignment points land on `points` (5,2) (a template for
    that size, ops.align.template_for): a least-squares similarity, or an affine with
    allow_skew. A face without points (a detector that gives none) is framed by its box
    instead: the box's square maps onto the template's face square (FACE_SPAN times the
    larger side of the points' extent, on their centre)."""

    size: tuple[int, int]
    points: Tensor
    allow_skew: bool = False

    def matrices(self, dets: Detections) -> Tensor:
        dev = dets.boxes.device
        out = torch.zeros(len(dets), 3, 3, dtype=torch.float64, device=dev)
        five = dets.five_points()
        has = torch.zeros(len(dets), dtype=torch.bool, device=dev) if five is None else \
            torch.isfinite(five).flatten(1).all(1)
        if bool(has.any()):
            out[has] = umeyama(five[has].to(torch.float64), self.points.to(dev), self.allow_skew)
        if not bool(has.all()):
            lo, hi = self.points.amin(0), self.points.amax(0)
            square = torch.cat([(lo + hi) / 2, (hi - lo).max().reshape(1) * FACE_SPAN])
            out[~has] = box_face_matrices(dets.boxes[~has], square)
        return out


@dataclass(frozen=True)
class BoxSquare:
    """DECA's square crop of `size` (no rotation). from_landmarks: per face (or for all),
    whether its box is the bounding box of landmarks (enlarged by 1.1) or a detector's box
    (moved down by 0.12 of its mean side). The square's corners land on output pixel centres
    0 and res - 1 (DECA's DST_PTS); for a non-square output, on the shorter side, centred."""

    size: tuple[int, int]
    scale: float = DECA_BBOX_SCALE
    from_landmarks: Tensor | bool = False

    def matrices(self, dets: Detections) -> Tensor:
        b = dets.boxes.to(torch.float64)
        n = b.shape[0]
        lm = torch.as_tensor(self.from_landmarks, dtype=torch.bool, device=b.device).expand(n)
        base = (b[:, 2:] - b[:, :2]).sum(1) / 2
        centre = (b[:, :2] + b[:, 2:]) / 2
        centre[:, 1] += torch.where(lm, 0.0, DECA_DETECTOR_SHIFT * base)
        side = self.scale * base * torch.where(lm, DECA_LANDMARK_ENLARGE, 1.0)
        if n and not bool((side > 0).all()):
            raise ValueError("bbox crop: a face box has no extent")
        w, h = self.size
        square = torch.tensor([(w - 1) / 2, (h - 1) / 2, min(w, h) - 1], dtype=torch.float64)
        out = box_face_matrices(torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], 1), square)
        return out


@dataclass(frozen=True)
class BoxArea:
    """The `area` fractions (x1, y1, x2, y2) of each face box stretched onto `size`: the
    unaligned input that video-to-faces tools feed their encoders."""

    size: tuple[int, int]
    area: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    def matrices(self, dets: Detections) -> Tensor:
        x1, y1, x2, y2 = self.area
        b = dets.boxes.to(torch.float64)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        left, top = b[:, 0] + x1 * w, b[:, 1] + y1 * h
        sx = self.size[0] / ((x2 - x1) * w).clamp(min=1e-6)
        sy = self.size[1] / ((y2 - y1) * h).clamp(min=1e-6)
        m = torch.zeros(len(b), 3, 3, dtype=torch.float64, device=b.device)
        # pixel-centre convention: source edge (left - 0.5) lands on crop edge -0.5
        m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1
        m[:, 0, 2] = -(left - 0.5) * sx - 0.5
        m[:, 1, 2] = -(top - 0.5) * sy - 0.5
        return m


def crop_points(points: Tensor | None, mats: Tensor, fallback: Tensor) -> Tensor:
    """(N,K,2) float64: face points (N,K,2) in image pixels moved into their crops (image->crop
    `mats`); a face without points (NaN, or None for all) gets `fallback` (5,2), the template
    points its box was framed onto (then every face has its 5 points)."""
    from ..ops.align import transform_points
    from ..ops.markup import reduce_to_five

    if points is None or points.shape[1] == 0:
        return fallback.to(mats.device, torch.float64).expand(len(mats), -1, -1).clone()
    pts = transform_points(points.to(mats.device, torch.float64), mats)
    bad = ~torch.isfinite(pts).flatten(1).all(1)
    if bool(bad.any()) and pts.shape[1] != fallback.shape[0]:
        return crop_points(reduce_to_five(points.to(torch.float64)), mats, fallback)
    pts[bad] = fallback.to(pts)
    return pts


@dataclass(frozen=True)
class UpperFace:
    """An encoder's aligned crops (`base`) with everything below each face's nose tip blanked
    (filled with the mean colour of the part above; ops.masks.keep_upper_face): embeddings of
    the eyes, brows and upper nose, which a mask or a hand over the mouth leaves. The crop keeps
    the encoder's own geometry: blanking beat zooming the upper part onto the whole crop
    (mobilefacenet, masked deepface pairs: ROC AUC 0.996 against 0.877; benchmarks/eval_masked.py)."""

    base: Alignment
    fill: str = "mean"

    @property
    def size(self) -> tuple[int, int]:
        return self.base.size

    def matrices(self, dets: Detections) -> Tensor:
        return self.base.matrices(dets)

    def finish(self, crops: Tensor, mats: Tensor, dets: Detections) -> Tensor:
        from ..ops.masks import keep_upper_face

        return keep_upper_face(crops, crop_points(dets.five_points(), mats, self.base.points), self.fill)


Geometry = Alignment | BoxSquare | BoxArea | UpperFace
ENC_REGIONS = ("full", "upper")


def finish_crops(geometry, crops: Tensor, mats: Tensor, dets: Detections) -> Tensor:
    """The crops as `geometry` leaves them after the warp (UpperFace blanks below the nose); a
    task that cuts crops itself through geometry's matrices calls it too."""
    finish = getattr(geometry, "finish", None)
    return crops if finish is None or not len(crops) else finish(crops, mats, dets)


# ----------------------------------------------------------------------------- align / crop

def as_chw(image: np.ndarray | Tensor, device=None) -> Tensor:
    """An RGB image (h,w,3) numpy (a view, no copy) or (3,h,w) tensor -> (3,h,w) tensor on device."""
    t = torch.from_numpy(image).permute(2, 0, 1) if isinstance(image, np.ndarray) else image
    return t if device is None else t.to(device)


def cut(images: Sequence[Tensor], mats: Tensor, image_index: Tensor, size: tuple[int, int],
        padding: str = "replicate", fill: float | Sequence[float] = 0.0) -> Tensor:
    """Crops (N,3,h,w) float32 through image->crop `mats` of the (3,H,W) `images` (any sizes,
    one device): one warp call per image size when faces are spread evenly over those images,
    else one per image (a batched call samples max-faces-per-image slots for every image, and
    a single 8-bit image converts only the crops' footprint)."""
    n = len(mats)
    if n == 0:
        return torch.zeros(0, 3, size[1], size[0], device=images[0].device if images else "cpu")
    idx = image_index.cpu()
    counts = torch.bincount(idx, minlength=len(images))
    by_shape: dict[tuple, list[int]] = {}
    for i in torch.nonzero(counts).flatten().tolist():
        by_shape.setdefault(tuple(images[i].shape), []).append(i)
    out = None
    # 8-bit images one at a time: warp then converts only the crops' footprint to float, where a
    # stacked batch would copy and convert every full frame
    footprint = padding in ("constant", "replicate") and not images[0].is_floating_point()
    for members in by_shape.values():
        even = int(counts[members].max()) * len(members) <= 1.5 * int(counts[members].sum())
        calls = [members] if even and not footprint else [[i] for i in members]
        for group in calls:
            rows = torch.nonzero(torch.isin(idx, torch.tensor(group))).flatten()
            local = torch.searchsorted(torch.tensor(group), idx[rows])
            pixels = torch.stack([images[i] for i in group]) if len(group) > 1 else images[group[0]][None]
            crops = warp(pixels, mats[rows.to(mats.device)], local, size, padding, fill)
            if out is None:
                out = crops.new_empty(n, *crops.shape[1:])
            out[rows.to(out.device)] = crops
    return out


def align(images: Sequence[Tensor], dets: Detections, geometry: Geometry, padding: str = "replicate",
          fill: float | Sequence[float] = 0.0) -> Faces:
    """The align/crop step: Faces cut from `images` (dets.image_index indexes them) by
    `geometry`, with their image->crop matrices. Every task crops through this one function."""
    if len(dets) == 0:
        dev = images[0].device if images else "cpu"
        return Faces(torch.zeros(0, 3, geometry.size[1], geometry.size[0], device=dev),
                     torch.zeros(0, 3, 3, dtype=torch.float64, device=dev), dets.to(dev))
    dev = images[0].device
    mats = geometry.matrices(dets.to(dev))
    crops = cut(images, mats, dets.image_index, geometry.size, padding, fill)
    return Faces(finish_crops(geometry, crops, mats, dets.to(dev)), mats, dets.to(dev))


def slice_boxes(boxes: Tensor, w: int, h: int, scale: Sequence[float], square: bool) -> Tensor:
    """Integer crop boxes (N,4) for pictures cut straight from the frame (no resampling): each
    border moved from the box centre by its factor (left, right, up, down); with square, the
    shorter side grows to the longer one, and at frame borders the box is shifted back inside,
    never shrunk, unless it is larger than the frame."""
    sl, sr, su, sd = scale
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    xc, yc = boxes[:, 0] + bw / 2, boxes[:, 1] + bh / 2
    x1, x2 = xc - sl * bw / 2, xc + sr * bw / 2
    y1, y2 = yc - su * bh / 2, yc + sd * bh / 2
    if square:
        side = torch.maximum(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        x1, x2, y1, y2 = cx - side / 2, cx + side / 2, cy - side / 2, cy + side / 2
        dx = (-x1).clamp(min=0) - (x2 - w).clamp(min=0)
        dy = (-y1).clamp(min=0) - (y2 - h).clamp(min=0)
        x1, x2, y1, y2 = x1 + dx, x2 + dx, y1 + dy, y2 + dy
    out = torch.stack([x1.floor(), y1.floor(), x2.ceil(), y2.ceil()], 1)
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out.long()


def slice_matrices(slices: Tensor) -> Tensor:
    """(N,3,3) image -> picture matrices of integer slices (N,4): pure translations."""
    m = torch.eye(3, dtype=torch.float64).repeat(len(slices), 1, 1)
    m[:, 0, 2] = -slices[:, 0].double()
    m[:, 1, 2] = -slices[:, 1].double()
    return m


# ----------------------------------------------------------------------------- embed

def encoder_geometry(encoder, area: Sequence[float] | None = None, region: str = "full") -> Geometry:
    """The crops an encoder's weights expect (spec.meta): aligned onto its template, or with
    `area` (or the template "box": anime encoders, whose faces have no points) the box region
    stretched to its input size. region "upper": the aligned crop blanked below the nose tip
    (UpperFace), for any aligned encoder."""
    from ..ops.align import template_for

    if region not in ENC_REGIONS:
        raise ValueError(f"encoder region must be full or upper, got {region!r}")
    meta = encoder.spec.meta
    size = tuple(meta.input_size)
    if area is not None or meta.template == "box":
        if region != "full":
            raise ValueError("the upper-face region needs aligned crops (face points), not a box area")
        return BoxArea(size, tuple(area) if area is not None else (0.0, 0.0, 1.0, 1.0))
    aligned = Alignment(size, template_for(size, meta.template or "arcface", meta.face_factor))
    return UpperFace(aligned) if region == "upper" else aligned


@torch.inference_mode()
def encode(encoder, crops: Tensor, batch_size: int = 32) -> Tensor:
    """(N,3,S,S) RGB 0..255 crops -> (N,D) L2-normalised embeddings, in chunks of batch_size."""
    if len(crops) == 0:
        return crops.new_zeros(0, encoder.spec.meta.embedding_dim)
    crops = crops.contiguous(memory_format=torch.channels_last)
    if not crops.is_floating_point():
        crops = crops.float()
    return torch.cat([encoder.embed(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)])


def embed(encoder, faces: Faces, batch_size: int = 32) -> Faces:
    """The embed step: Faces whose crops the encoder takes -> the same Faces with embeddings."""
    return replace(faces, embeddings=encode(encoder, faces.crops, batch_size))


# ----------------------------------------------------------------------------- parse

def parser_geometry(parser, size: int | None = None) -> Alignment:
    """The crops a parser's weights expect (spec.meta: template and face factor), at its input
    size or `size` pixels square (the parser resizes to its own)."""
    from ..ops.align import template_for

    meta = parser.spec.meta
    side = (size, size) if size else tuple(meta.input_size)
    return Alignment(side, template_for(side, meta.template or "ffhq", meta.face_factor))


@torch.inference_mode()
def parse(parser, faces: Faces, batch_size: int = 4) -> Faces:
    """The parse step: each crop's class map (N,h,w) uint8, ids in spec.meta.class_names order,
    as Faces.masks; the crops should be cut with parser_geometry. Batches of 4: a 512 px face's
    19 score maps take 20 MB, and only their argmax is kept."""
    maps = [parser.parse(c.float()).argmax(1).to(torch.uint8)
            for c in faces.crops.split(batch_size)]
    masks = torch.cat(maps) if maps else faces.crops.new_zeros(0, *faces.crops.shape[2:], dtype=torch.uint8)
    return replace(faces, masks=masks)


def parse_into(parser, images: Sequence[Tensor], faces: Faces, batch_size: int = 4) -> Faces:
    """`faces` (cut in any geometry from `images`) with the class maps of their parse, moved
    into each crop's own frame: the parser sees its own crops (parser_geometry), and each map
    goes through parse crop -> image -> output crop, so attribute shares and mask groups are
    measured on the pixels the parser was trained for."""
    own = parse(parser, align(images, faces.detections, parser_geometry(parser)), batch_size)
    to_out = faces.crop_mat.to(torch.float64) @ invert(own.crop_mat.to(torch.float64))
    h, w = faces.crops.shape[2:]
    return replace(faces, masks=warp_labels(own.masks, to_out, (w, h)))


# ----------------------------------------------------------------------------- dedup and group

def to_uint8(crops: Tensor) -> Tensor:
    """Float crops 0..255 -> uint8, rounded to nearest."""
    return crops if crops.dtype == torch.uint8 else crops.round().clamp(0, 255).to(torch.uint8)


def describe(faces: Faces) -> Faces:
    """The measures dedup needs, from the crops: 64-bit average hashes, and quality = box area x
    (sharpness + 1) (the face of a duplicate set that is kept)."""
    pixels = to_uint8(faces.crops)
    b = faces.detections.boxes.to(pixels.device, torch.float64)
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=1)
    quality = area * (dd.sharpness(pixels).to(area) + 1)
    return replace(faces, hashes=dd.average_hash(pixels), quality=quality)


@dataclass
class DedupOutcome:
    keep: np.ndarray  # (N,) bool
    logs: dict[int, list[dict]]  # pass (1: hash, 2: embedding) -> one row per dropped face


def dedup(table: FaceTable, hash_thr: int = -1, enc_dup_thr: float = -1,
          fill_embeddings: Callable[[FaceTable, np.ndarray], None] | None = None,
          confirm_thr: float = dd.STRICTEST_HASH_CONFIRM) -> DedupOutcome:
    """The dedup step: the cheap hash pass over all faces, then the embedding pass over what
    survived it; each duplicate set keeps its best-quality face. Two faces of one picture (a
    video frame, a photo) are never duplicates, and a hash match drops a face only if their
    embeddings agree (cosine distance <= confirm_thr, on the encoder's scale: its
    spec.defaults.hash_confirm, see dd.hash_confirm_threshold; -1: the hash alone decides).
    fill_embeddings(table, needed (N,) bool) fills deferred (NaN) embeddings in place: called
    for the faces with a hash match (to confirm it), then for every face the hash pass keeps."""
    n = len(table)
    keep = np.ones(n, bool)
    logs: dict[int, list[dict]] = {}
    names = [str(v) for v in table.name]
    keys = dd.frame_keys(table.source, table.frame)

    def embeddings(needed: np.ndarray) -> np.ndarray:
        if fill_embeddings is not None:
            fill_embeddings(table, needed)
        return table.embeddings

    if n and hash_thr != -1:
        r = dd.hash_duplicates(torch.from_numpy(table.hash), table.quality, hash_thr, keys=keys,
                               embeddings=embeddings, confirm_thr=confirm_thr)
        keep &= r.keep
        logs[1] = dd.dedup_log_rows(r, names)
    if fill_embeddings is not None:
        fill_embeddings(table, keep)
    if keep.any() and enc_dup_thr != -1:
        idx = np.flatnonzero(keep)
        r = dd.embedding_duplicates(torch.from_numpy(table.embeddings[idx]), table.quality[idx], enc_dup_thr,
                                    keys=keys[idx])
        keep[idx[~r.keep]] = False
        logs[2] = dd.dedup_log_rows(r, [names[i] for i in idx])
    return DedupOutcome(keep, logs)


GROUP_MODES = ("auto", "cluster", "classify")


@dataclass(frozen=True)
class GroupOptions:
    """How faces are grouped. mode: auto (average-linkage threshold, no k), cluster (KMeans, k
    chosen by silhouette over `clusters`) or classify (nearest reference person)."""

    mode: str = "auto"
    clusters: str = "2-9"
    clusters_save_all: bool = False
    random_state: int = 0
    auto_thr: float | None = None
    enc_oth_thr: float = -1

    def check(self) -> "GroupOptions":
        if self.mode not in GROUP_MODES:
            raise ValueError(f"grouping mode must be auto, cluster or classify, got {self.mode!r}")
        gp.parse_clusters(self.clusters)  # in every mode: a bad value is refused, never ignored
        return self


def group(embeddings: Tensor, options: GroupOptions, encoder_spec=None,
          references: Callable[[], tuple[Tensor, list[str]]] | None = None) -> gp.Grouping:
    """The group step over L2-normalised embeddings. auto mode chooses its cut from the data
    (grouping.choose_cut), or cuts at options.auto_thr when given; the encoder's
    spec.defaults.group_threshold serves only where no cut can be chosen (2 faces, all alike).
    classify calls references() for the people's embeddings and names."""
    if options.mode == "cluster":
        return gp.cluster(embeddings, options.clusters, random_state=options.random_state,
                          save_all=options.clusters_save_all)
    if options.mode == "auto":
        fallback = encoder_spec.defaults.group_threshold if encoder_spec is not None else None
        return gp.auto(embeddings, options.auto_thr,
                       fallback_threshold=gp.AUTO_THRESHOLD if fallback is None else fallback)
    ref_emb, ref_labels = references()
    return gp.classify(embeddings, ref_emb, ref_labels, options.enc_oth_thr)


def masked_crops(faces: Faces, geometry: Geometry) -> Tensor:
    """(S*N,3,h,w): each aligned crop of `faces` wearing each synthetic mask of ops.masks.SHAPES
    (shape-major), drawn from the face's points in the crop (the template's where it has none)."""
    from ..ops.masks import SHAPES, draw_masks

    base = geometry.base if isinstance(geometry, UpperFace) else geometry
    if not isinstance(base, Alignment):
        raise ValueError("synthetic masks need aligned crops (face points), not a box area")
    pts = crop_points(faces.detections.landmarks, faces.crop_mat, base.points)
    return torch.cat([finish_crops(geometry, draw_masks(faces.crops, pts, s), faces.crop_mat, faces.detections)
                      for s in SHAPES])


def _detect_bordered(images: list[tuple[object, np.ndarray]], detector, min_score
                     ) -> Iterator[tuple[object, np.ndarray, Detections]]:
    """detect_stream's output for each image placed in the middle of a black canvas three times
    its size, with the faces moved back into the image's own pixels."""
    def canvases():
        for key, image in images:
            h, w = image.shape[:2]
            canvas = np.zeros((3 * h, 3 * w, image.shape[2]), image.dtype)
            canvas[h:2 * h, w:2 * w] = image
            yield (key, image), canvas

    for (key, image), _, det in detect_stream(canvases(), detector, min_score=min_score, batch_size=1):
        h, w = image.shape[:2]
        yield key, image, det.moved(torch.tensor([-w, -h], dtype=torch.float32))


def reference_embeddings(ref_dir: Path, encoder, detector, *, min_score=None, area=None,
                         batch_size: int = 32, region: str = "full", masked: bool = False
                         ) -> tuple[Tensor, list[str]]:
    """One embedding per reference image, labelled by its subfolder: its largest face. An image
    with no detectable face is left out with a warning naming it: embedded whole, a blank or
    non-face image became a "person" that drew faces to itself. Tight face crops work: RetinaFace
    finds their faces as they are (every crop of Video_2's database, padded or not;
    tests/test_dedup_real.py), and an image where a detector finds none is tried again inside a
    black border (SCRFD and YuNet need that). A person left without a usable image is an InputError.
    region: encoder_geometry's. masked: each reference also wears each synthetic mask
    (masked_crops), same label, so classify's min distance over a person's references matches a
    masked face to the masked versions."""
    from ..errors import InputError
    from ..ops.image import expand_paths, read_image
    from .common import warn

    classes = sorted(d for d in ref_dir.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"{ref_dir}: no class subfolders; --ref-dir needs one folder per person "
                         "holding one or more reference images")
    images = []
    for c in classes:
        for p in expand_paths([c]):
            try:
                images.append(((c.name, p), read_image(p)))
            except ValueError as e:
                warn(str(e))
    labels, embs = [], []
    dev = model_device(encoder)
    geometry = encoder_geometry(encoder, area, region)
    found = list(detect_stream(images, detector, min_score=min_score, batch_size=1))
    # A tight face crop fills a letterboxing detector's whole input: SCRFD finds no face in any
    # of Video_2's 14 database crops. Such an image is searched again inside a black border; the
    # face is then aligned from the image itself, as every other reference is.
    missed = [(key, img) for key, img, det in found if not len(det)]
    found = [f for f in found if len(f[2])] + list(_detect_bordered(missed, detector, min_score))
    for (label, path), img, det in found:
        if not len(det):
            warn(f"{path}: no face found in this reference image; it is left out")
            continue
        b = det.boxes
        det = det.select(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax().reshape(1))
        faces = align([as_chw(img, dev)], det, geometry)
        crops = torch.cat([faces.crops, masked_crops(faces, geometry)]) if masked else faces.crops
        embs.append(encode(encoder, crops, batch_size).cpu())
        labels.extend([label] * len(crops))
    missing = [str(c) for c in classes if c.name not in set(labels)]
    if missing:
        raise InputError(f"{', '.join(missing)}: no usable reference image (none readable with a detectable "
                         f"face); add a picture of the person's face there, or remove the folder")
    return torch.cat(embs), labels
