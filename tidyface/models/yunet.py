"""YuNet (Wu et al. 2023, libfacedetection) face detector, OpenCV zoo 2023mar: boxes + 5 landmarks.

Facts: the layer graph (depthwise-point units: a linear 1x1 conv, then a 3x3 depthwise conv with
BatchNorm folded in and ReLU; 2x2 max pools; a top-down neck that adds upsampled maps to the
backbone's; per-level cls / obj / bbox / kps heads without activation, sigmoid on cls and obj)
from the node list of face_detection_yunet_2023mar.onnx, whose named initializers keep
libfacedetection.train's module names. Pre- and post-processing from OpenCV's FaceDetectorYN
(`modules/objdetect/src/face_detect.cpp`): the BGR image as it is (0..255, no mean), padded at
the bottom and right to a multiple of 32, never resized (the caller picks the input size);
score sqrt(cls * obj) >= 0.9; box centre (col + dx, row + dy) * stride, size exp(dw, dh) *
stride; points (col + px, row + py) * stride; NMS 0.3 on the boxes truncated to integers
(cv::Rect2i), at most top_k 5000 candidates per image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert.onnx import (GraphWalker, OnnxError, check_resizes, onnx_converter, read_onnx,
                            skip_shape_constants)
from ..ops.distance import grid_points
from ..ops.image import as_rgb_batch
from ..ops.nms import batched_nms, group_by_image
from ..ops.priors import flatten_head
from ..ops.resize import network_size, resize_pixels, round_up, to_bgr
from ..registry import FIVE_POINTS, ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Detector
from .folded import (Conv2d, ConvReLU, depthwise_blocks, forward_by_image, out_channels,
                     sibling_convs)

STRIDES = (8, 16, 32)
PAD_TO = 32  # FaceDetectorYNImpl::divisor
DEFAULT_MIN_SCORE = 0.9  # FaceDetectorYN::create score_threshold default
DEFAULT_NMS_IOU = 0.3  # nms_threshold default
TOP_K = 5000  # top_k default: candidates per image that enter NMS
WIDTH = 64
HEADS = (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10))


class DepthwisePointUnit(nn.Module):
    """libfacedetection ConvDPUnit: 1x1 pointwise conv (bias, no activation), then 3x3 depthwise
    conv (BatchNorm folded) with ReLU, or without both when relu=False (the heads)."""

    def __init__(self, cin: int, cout: int, relu: bool = True):
        super().__init__()
        self.pointwise = Conv2d(cin, cout, 1)
        self.depthwise = ConvReLU(cout, cout, 3, groups=cout, relu=relu)

    def forward(self, x: Tensor) -> Tensor:
        return self.depthwise(self.pointwise(x))


class Stage(nn.Sequential):
    """Two units (upstream's model1..model5: conv1, conv2)."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.conv1 = DepthwisePointUnit(cin, mid)
        self.conv2 = DepthwisePointUnit(mid, cout)


class YuNetBackbone(nn.Module):
    """model0: 3x3 stride-2 conv + a unit; then 2x2 max pools before model1, model3, model4 and
    model5; returns the stride 8, 16, 32 outputs (model3, model4, model5)."""

    def __init__(self):
        super().__init__()
        self.model0 = nn.Sequential()
        self.model0.add_module("conv1", ConvReLU(3, 16, 3, 2))
        self.model0.add_module("conv2", DepthwisePointUnit(16, 16))
        self.model1 = Stage(16, 16, 32)
        self.model2 = Stage(32, 32, 64)
        self.model3 = Stage(WIDTH, WIDTH, WIDTH)
        self.model4 = Stage(WIDTH, WIDTH, WIDTH)
        self.model5 = Stage(WIDTH, WIDTH, WIDTH)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.model2(self.model1(self.pool(self.model0(x))))
        c3 = self.model3(self.pool(x))
        c4 = self.model4(self.pool(c3))
        return [c3, c4, self.model5(self.pool(c4))]


class YuNet(nn.Module, Detector):
    """forward: (B,3,H,W) BGR 0..255, H and W multiples of 32 -> cls (B,P,1), obj (B,P,1)
    (both after the sigmoid), bbox (B,P,4) (dx, dy, log w, log h in stride units), kps
    (B,P,10); P = sum over strides s of (H/s)*(W/s), rows then columns, level by level (the
    graph's twelve outputs, concatenated per kind). `detect` runs OpenCV's whole pipeline."""

    reduced_precision = True
    traceable_forward = True  # tensor ops whose shapes follow the input's: CPU graphs (ops.graphs)
    # Which anchor survives NMS is decided by scores that bfloat16 rounds: with these heads in
    # bfloat16 boxes moved by 4.4% of a face, with them in float32 by 0.14% (RESULTS.md).
    # _level_heads runs them stacked, in their weights' dtype, which in_precision keeps float32.
    float32_layers = ("cls_heads", "obj_heads", "bbox_heads", "kps_heads")

    onnx_outputs = ("cls", "obj", "boxes", "keypoints")
    peak_activation_per_pixel = 4  # model0's 16 channels at stride 2 (folded.images_per_forward)

    def __init__(self):
        super().__init__()
        self.backbone = YuNetBackbone()
        self.lateral_convs = nn.ModuleList(DepthwisePointUnit(WIDTH, WIDTH) for _ in STRIDES)
        for name, c in HEADS:
            setattr(self, f"{name}_heads", nn.ModuleList(DepthwisePointUnit(WIDTH, c, relu=False) for _ in STRIDES))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c3, c4, c5 = self.backbone(x)
        # Upsampled to the finer map's size: OpenCV's x2 at multiples of 32, and any size exports.
        p5 = self.lateral_convs[2](c5)
        p4 = self.lateral_convs[1](c4 + F.interpolate(p5, size=c4.shape[-2:], mode="nearest"))
        p3 = self.lateral_convs[0](c3 + F.interpolate(p4, size=c3.shape[-2:], mode="nearest"))
        levels = [self._level_heads(i, f) for i, f in enumerate((p3, p4, p5))]
        outs = []
        for k, (name, c) in enumerate(HEADS):
            out = torch.cat([flatten_head(level[k], c) for level in levels], 1)
            outs.append(out.sigmoid() if name in ("cls", "obj") else out)
        return tuple(outs)

    def _level_heads(self, i: int, f: Tensor) -> tuple[Tensor, ...]:
        """Level i's cls, obj, bbox and kps units as one pointwise and one depthwise convolution,
        their filters stacked (720p, 2 threads: 26 against 30 ms a frame, the same values)."""
        units = [getattr(self, f"{name}_heads")[i] for name, _ in HEADS]
        y = sibling_convs(f, [u.pointwise for u in units])
        depthwise = [u.depthwise.conv for u in units]
        return depthwise_blocks(y, depthwise).split(out_channels(depthwise), 1)

    @torch.no_grad()
    def detect(self, images: Tensor, *, min_score: float | None = None,
               max_size: int | None = None) -> Detections:
        """images (B,3,H,W) RGB 0..255 on the model's device -> Detections in input pixels.

        As OpenCV runs it: at the image's own size (padded to a multiple of 32, never
        letterboxed). max_size: shrink first (bilinear, aspect kept) so the longer side is at most
        this; default None: full resolution, as FaceDetectorYN with setInputSize(image size).
        min_score: default 0.9 (kept if score >= it)."""
        images = as_rgb_batch(images)
        h, w = network_size(images.shape[-2:], self._cap(max_size))
        fmt = torch.channels_last if images.device.type == "cpu" else torch.contiguous_format
        padded = (round_up(h, PAD_TO), round_up(w, PAD_TO))

        def network_input(batch: Tensor) -> Tensor:
            x = torch.empty((len(batch), 3, *padded), dtype=torch.float32, device=batch.device, memory_format=fmt)
            x[..., h:, :].zero_()  # zeros at bottom/right
            x[..., :h, w:].zero_()
            x[..., :h, :w].copy_(resize_pixels(to_bgr(batch), (h, w)))  # swapped as 8 bits, cast as written
            return x

        dets = postprocess(*forward_by_image(self, images, network_input), padded,
                           DEFAULT_MIN_SCORE if min_score is None else min_score)
        sy, sx = images.shape[-2] / h, images.shape[-1] / w
        if (sy, sx) == (1.0, 1.0):
            return dets
        scale = torch.tensor([sx, sy], dtype=dets.boxes.dtype, device=dets.boxes.device)
        return Detections(dets.boxes * scale.repeat(2), dets.scores, dets.landmarks * scale, dets.image_index)

    def _cap(self, max_size: int | None) -> int | None:
        return None if max_size is None else (int(max_size) or None)


def postprocess(cls: Tensor, obj: Tensor, bbox: Tensor, kps: Tensor, input_hw: Sequence[int],
                min_score: float = DEFAULT_MIN_SCORE, nms_iou: float = DEFAULT_NMS_IOU,
                top_k: int = TOP_K) -> Detections:
    """FaceDetectorYNImpl::postProcess, batched: head outputs for a padded input of size
    input_hw -> Detections (xyxy, float) in that input's pixels, by image then decreasing score."""
    points = grid_points(int(input_hw[0]), int(input_hw[1]), STRIDES, 1, device=cls.device, dtype=cls.dtype)
    if points.shape[0] != cls.shape[1]:
        raise ValueError(f"{cls.shape[1]} head outputs but {points.shape[0]} grid cells for {tuple(input_hw)}")
    scores = (cls[..., 0].clamp(0, 1) * obj[..., 0].clamp(0, 1)).sqrt()
    passed = scores >= min_score
    if passed.any() and int(passed.sum(1).max()) > top_k:  # rare: each image's best top_k
        passed &= torch.zeros_like(passed).scatter_(1, scores.topk(top_k, dim=1).indices, True)
    image_index, point_index = passed.nonzero(as_tuple=True)
    p = points[point_index]
    stride = p[:, 2:]
    b = bbox[image_index, point_index]
    centre = p[:, :2] + b[:, :2] * stride
    size = b[:, 2:].exp() * stride
    top_left = centre - size / 2
    boxes = torch.cat([top_left, top_left + size], 1)
    pts = p[:, None, :2] + kps[image_index, point_index].unflatten(-1, (5, 2)) * stride[:, None]
    score = scores[image_index, point_index]
    # cv::Rect2i(int(x), int(y), int(w), int(h)): NMS sees truncated corners and sizes.
    tl, wh = top_left.trunc(), size.trunc()
    keep = batched_nms(torch.cat([tl, tl + wh], 1), score, image_index, nms_iou)
    keep = group_by_image(keep, image_index)
    return Detections(boxes[keep], score[keep], pts[keep], image_index[keep])


# --- conversion from the OpenCV zoo ONNX graph ---------------------------------------------------

def _unit(walk: GraphWalker, value: str, key: str, upstream: str, relu: bool = True) -> str:
    """A DepthwisePointUnit: its named 1x1 conv reads `value`; the depthwise conv reads that
    (renamed where its BatchNorm was folded in; named conv2 in the heads, which have none)."""
    node = walk.model.consumer(value, ("Conv",), lambda n: n.inputs[1] == f"{upstream}.conv1.weight")
    if node is None:
        raise OnnxError(f"{walk.model.source}: {upstream}.conv1 does not read {value!r}")
    walk.named(f"{upstream}.conv1", f"{key}.pointwise", node)
    if f"{upstream}.conv2.weight" not in walk.model.initializers:  # BatchNorm folded: renamed
        return walk.conv(node.outputs[0], f"{key}.depthwise.conv", relu=relu)
    dw = walk.model.consumer(node.outputs[0], ("Conv",), lambda n: n.inputs[1] == f"{upstream}.conv2.weight")
    if dw is None:
        raise OnnxError(f"{walk.model.source}: {upstream}.conv2 does not follow {upstream}.conv1")
    walk.named(f"{upstream}.conv2", f"{key}.depthwise.conv", dw)
    return walk.relu(dw.outputs[0], key) if relu else dw.outputs[0]


def _pool(walk: GraphWalker, value: str) -> str:
    node = walk.op(value, "MaxPool", "backbone.pool")
    if node.attrs.get("kernel_shape") != [2, 2] or node.attrs.get("strides") != [2, 2]:
        raise OnnxError(f"{walk.model.source}: max pool {node.outputs[0]} is {node.attrs}, expected 2x2 stride 2")
    return node.outputs[0]


def map_onnx(path: str | Path, model: YuNet) -> GraphWalker:
    """Walk the YuNet graph from its input and map every initializer to `model`'s parameters."""
    g = read_onnx(path)
    walk = GraphWalker(g, model, where=lambda n: not n.inputs[1].startswith(("backbone.", "neck.", "bbox_head.")))
    v = walk.conv(g.inputs[0].name, "backbone.model0.conv1.conv", relu=True)
    v = _pool(walk, _unit(walk, v, "backbone.model0.conv2", "backbone.model0.conv2"))
    taps = []
    for i in range(1, 6):
        if i >= 3:
            v = _pool(walk, v)
        for j in (1, 2):
            v = _unit(walk, v, f"backbone.model{i}.conv{j}", f"backbone.model{i}.conv{j}")
        taps.append(v)
    c3, c4, c5 = taps[2:]
    p5 = _unit(walk, c5, "lateral_convs.2", "neck.lateral_convs.2")
    p4 = _unit(walk, _merge(walk, c4, p5), "lateral_convs.1", "neck.lateral_convs.1")
    p3 = _unit(walk, _merge(walk, c3, p4), "lateral_convs.0", "neck.lateral_convs.0")
    for i, f in enumerate((p3, p4, p5)):
        for name, _ in HEADS:
            _unit(walk, f, f"{name}_heads.{i}", f"bbox_head.multi_level_{name}.{i}", relu=False)
    check_resizes(g)
    skip_shape_constants(walk.tracker)
    return walk.finish()


def _merge(walk: GraphWalker, backbone: str, coarse: str) -> str:
    """The Add of a backbone map and the upsampled coarser neck map; returns its output."""
    up = walk.op(coarse, "Resize", "neck upsample").outputs[0]
    add = walk.op(up, "Add", "neck merge")
    if sorted(add.inputs) != sorted([backbone, up]):
        raise OnnxError(f"{walk.model.source}: neck adds {add.inputs}, expected {[backbone, up]}")
    return add.outputs[0]


FILENAME = "face_detection_yunet_2023mar.onnx"
_ZOO = "opencv/opencv_zoo/main/models/face_detection_yunet/" + FILENAME

register(
    WeightSpec(
        name="yunet",
        task="detect",
        files=(UpstreamFile(FILENAME, "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4", 232589,
                            urls=("https://media.githubusercontent.com/media/" + _ZOO,
                                  "https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
                                  + FILENAME)),),
        license="MIT",
        origin="opencv/opencv_zoo (ShiqiYu/libfacedetection.train)",
        converter=onnx_converter(FILENAME, YuNet, map_onnx),
        meta=ModelMeta(colour="BGR", num_landmarks=5, landmark_markup=FIVE_POINTS, num_params=53_104),
        defaults=TaskDefaults(min_score=DEFAULT_MIN_SCORE, nms_iou=DEFAULT_NMS_IOU, max_size=None),
        description="YuNet 2023mar (OpenCV FaceDetectorYN), boxes + 5 landmarks, runs at the image's size",
    ),
    YuNet,
)
