"""SCRFD (Guo et al. 2021, "Sample and Computation Redistribution for Efficient Face Detection"):
boxes + 5 keypoints; 500M (MobileNetV1), 2.5G and 10G (ResNet-vd BasicBlock) variants.

Facts: architecture widths and depths from insightface `detection/scrfd/configs/scrfd/
scrfd_{500m,2.5g,10g}_bnkps.py` (backbone stage_blocks/stage_planes, PAFPN out_channels, head
stacked_convs / feat_channels / dw_conv / scale_mode); the layer graph (BatchNorm folded into
the convs, 2x2 max-pool stem, avg-pool shortcuts, no activation in the neck, ReLU in the head
towers, per-level head weights, sigmoid scores) from the node lists of det_500m.onnx and
det_2.5g.onnx themselves; pre- and post-processing (640 letterbox at the top left, RGB
(x-127.5)/128, anchor points at cell corners, distances times the stride, score >= 0.5,
NMS 0.4 with +1 areas) from insightface `python-package/insightface/model_zoo/scrfd.py`.
det_10g.onnx is not available here: its converter is exercised on a stand-in written with the
10G config's shapes (tests/test_models.py); that the real file's graph follows the 2.5G layout
at those widths is inferred from the shared config family, not seen.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert.onnx import (GraphWalker, OnnxError, check_resizes, onnx_converter, read_onnx,
                            skip_shape_constants)
from ..ops.distance import distance_to_boxes, distance_to_points, grid_points
from ..ops.image import as_rgb_batch
from ..ops.nms import batched_nms, group_by_image
from ..ops.priors import flatten_head
from ..ops.resize import resize_pixels, round_up
from ..registry import FIVE_POINTS, ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Detector, PreparedImage
from .folded import (Conv2d, ConvReLU, DepthwiseSeparable, forward_by_image, out_channels,
                     sibling_convs)

STRIDES = (8, 16, 32)
NUM_ANCHORS = 2  # anchor_generator scales [1, 2]: two anchors per cell, same point
MEAN, STD = 127.5, 128.0  # img_norm_cfg, on RGB
INPUT_SIZE = 640  # upstream's det_size: the letterbox square
DEFAULT_MIN_SCORE = 0.5  # insightface detect(threshold=0.5)
DEFAULT_NMS_IOU = 0.4  # insightface SCRFD.nms_threshold
PAD_TO = 32  # the coarsest stride: a full-resolution input is padded to a multiple of it
# Library choice (upstream keeps every point over the threshold): bounds NMS time when a very low
# min_score lets most of the 16800 points of a 640 input through; at 0.5 real images pass dozens.
PRE_NMS_TOP_K = 5000

# scrfd_*_bnkps.py: backbone blocks and widths, neck width, head tower depth/width, dw head, scales.
VARIANTS = {
    "500m": dict(body="mobilenet", blocks=(2, 3, 2, 6), planes=(16, 16, 40, 72, 152, 288),
                 neck=16, stacked=2, feat=64, dw=True, scales=False),
    "2.5g": dict(body="resnet", blocks=(3, 5, 3, 2), planes=(24, 48, 48, 80), base=24,
                 neck=24, stacked=2, feat=64, dw=False, scales=True),
    "10g": dict(body="resnet", blocks=(3, 4, 2, 3), planes=(56, 88, 88, 224), base=56,
                neck=56, stacked=3, feat=80, dw=False, scales=True),
}


class MobileNetV1Body(nn.Module):
    """SCRFD's MobileNetV1: a stem (3x3 stride-2 conv, one depthwise-separable unit), then four
    stages of units whose first one has stride 2; returns the stride 8, 16, 32 stage outputs."""

    def __init__(self, blocks: Sequence[int], planes: Sequence[int]):
        super().__init__()
        self.stem = nn.Sequential(ConvReLU(3, planes[0], 3, 2), DepthwiseSeparable(planes[0], planes[1]))
        stages, cin = [], planes[1]
        for n, cout in zip(blocks, planes[2:]):
            stages.append(nn.Sequential(DepthwiseSeparable(cin, cout, 2),
                                        *(DepthwiseSeparable(cout, cout) for _ in range(n - 1))))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(planes[3:])

    def forward(self, x: Tensor) -> list[Tensor]:
        return _stage_outputs(self.stages, self.stem(x))


class AvgDownsample(nn.Sequential):
    """ResNet-D shortcut: 2x2 average pool (ceil mode, as the graph's AveragePool), then 1x1 conv."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if stride > 1:
            self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        self.conv = Conv2d(cin, cout, 1)


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first carries the stride) plus a shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = ConvReLU(cin, cout, 3, stride)
        self.conv2 = ConvReLU(cout, cout, 3, relu=False)
        self.downsample = AvgDownsample(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class ResNetV1eBody(nn.Module):
    """mmdet ResNetV1e with depth 0 (stages from block_cfg): three-conv deep stem, 2x2 max pool,
    four BasicBlock stages (strides 1, 2, 2, 2); returns the stride 8, 16, 32 stage outputs."""

    def __init__(self, blocks: Sequence[int], planes: Sequence[int], base: int):
        super().__init__()
        self.stem = nn.Sequential(ConvReLU(3, base // 2, 3, 2), ConvReLU(base // 2, base // 2),
                                  ConvReLU(base // 2, base))
        self.maxpool = nn.MaxPool2d(2, 2)
        stages, cin = [], base
        for i, (n, cout) in enumerate(zip(blocks, planes)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1)
                                          for b in range(n))))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(planes[1:])

    def forward(self, x: Tensor) -> list[Tensor]:
        return _stage_outputs(self.stages, self.maxpool(self.stem(x)))


def _stage_outputs(stages: nn.ModuleList, x: Tensor) -> list[Tensor]:
    """The stages run in turn; the outputs of all but the first (strides 8, 16, 32)."""
    outs = []
    for stage in stages:
        x = stage(x)
        outs.append(x)
    return outs[1:]


class PAFPN(nn.Module):
    """Path-aggregation FPN (mmdet PAFPN, no activations): 1x1 laterals, top-down nearest
    upsampling + add, 3x3 fpn convs, then bottom-up stride-2 convs + add and 3x3 pafpn convs."""

    def __init__(self, in_channels: Sequence[int], out: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList(Conv2d(c, out, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(Conv2d(out, out, 3, 1, 1) for _ in in_channels)
        self.downsample_convs = nn.ModuleList(Conv2d(out, out, 3, 2, 1) for _ in in_channels[1:])
        self.pafpn_convs = nn.ModuleList(Conv2d(out, out, 3, 1, 1) for _ in in_channels[1:])

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        inter = [conv(x) for conv, x in zip(self.fpn_convs, lat)]
        for i, down in enumerate(self.downsample_convs):
            inter[i + 1] = inter[i + 1] + down(inter[i])
        return [inter[0]] + [conv(x) for conv, x in zip(self.pafpn_convs, inter[1:])]


class SCRFDHead(nn.Module):
    """One head per level (strides_share=False): a tower of `stacked` ConvReLUs (depthwise-
    separable units for 500M), then 3x3 convs for scores, box distances and keypoint offsets;
    2.5G/10G scale each level's distances by a learnt scalar (scale_mode=2)."""

    def __init__(self, cin: int, feat: int, stacked: int, dw: bool, scales: bool):
        super().__init__()
        def tower():
            unit = DepthwiseSeparable if dw else partial(ConvReLU, kernel=3)
            return nn.Sequential(*(unit(cin if i == 0 else feat, feat) for i in range(stacked)))
        self.towers = nn.ModuleList(tower() for _ in STRIDES)
        self.cls = nn.ModuleList(Conv2d(feat, NUM_ANCHORS, 3, 1, 1) for _ in STRIDES)
        self.box = nn.ModuleList(Conv2d(feat, NUM_ANCHORS * 4, 3, 1, 1) for _ in STRIDES)
        self.kps = nn.ModuleList(Conv2d(feat, NUM_ANCHORS * 10, 3, 1, 1) for _ in STRIDES)
        self.box_scales = nn.Parameter(torch.ones(len(STRIDES))) if scales else None

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        scores, boxes, points = [], [], []
        for i, f in enumerate(feats):
            heads = (self.cls[i], self.box[i], self.kps[i])
            cls, box, kps = sibling_convs(self.towers[i](f), heads).split(out_channels(heads), 1)
            if self.box_scales is not None:
                box = box * self.box_scales[i]
            scores.append(flatten_head(cls, 1).sigmoid())
            boxes.append(flatten_head(box, 4))
            points.append(flatten_head(kps, 10))
        return torch.cat(scores, 1), torch.cat(boxes, 1), torch.cat(points, 1)


class SCRFD(nn.Module, Detector):
    """forward: (B,3,H,W) normalised RGB -> scores (B,P,1) after the sigmoid, box distances
    (B,P,4) (left, top, right, bottom in units of the level's stride), keypoint offsets (B,P,10)
    (same units); P = sum over strides s of ceil(H/s)*ceil(W/s)*2. Per level these are the ONNX
    graph's nine outputs (there for batch 1). `detect` runs the whole pipeline."""

    reduced_precision = True
    traceable_forward = True  # tensor ops whose shapes follow the input's: CPU graphs (ops.graphs)

    onnx_outputs = ("scores", "boxes", "keypoints")

    def __init__(self, variant: str = "500m"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        cfg = VARIANTS[variant]
        self.variant = variant
        stem = cfg["planes"][0] if cfg["body"] == "mobilenet" else cfg["base"]
        self.peak_activation_per_pixel = stem / 4  # the stem's channels at stride 2 (folded.images_per_forward)
        self.body = (MobileNetV1Body(cfg["blocks"], cfg["planes"]) if cfg["body"] == "mobilenet"
                     else ResNetV1eBody(cfg["blocks"], cfg["planes"], cfg["base"]))
        self.neck = PAFPN(self.body.channels, cfg["neck"])
        self.head = SCRFDHead(cfg["neck"], cfg["feat"], cfg["stacked"], cfg["dw"], cfg["scales"])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.head(self.neck(self.body(x)))

    @torch.no_grad()
    def detect(self, images: Tensor, *, min_score: float | None = None,
               max_size: int | None = None) -> Detections:
        """images (B,3,H,W) RGB 0..255 on the model's device -> Detections in input pixels.

        max_size: the side of the letterbox square (default 640, rounded up to a multiple of 32):
        each image is resized, aspect kept, to fit it (also upscaled, as upstream does) and padded
        with black at the bottom and right; 0: no resize, only that padding. min_score: default
        0.5 (kept if score >= it)."""
        images = as_rgb_batch(images)
        # oneDNN runs these convs faster on NHWC input (as RetinaFace)
        size, cpu = self._square(max_size), images.device.type == "cpu"
        scores, boxes, kps = forward_by_image(self, images, lambda batch: network_input(batch, size, cpu)[0])
        _, scale, input_hw = input_geometry(*images.shape[-2:], size)
        dets = postprocess(scores, boxes, kps, input_hw,
                           DEFAULT_MIN_SCORE if min_score is None else min_score, DEFAULT_NMS_IOU)
        if scale == 1.0:
            return dets
        return Detections(dets.boxes / scale, dets.scores, dets.landmarks / scale, dets.image_index)

    def prepare(self, image: np.ndarray, max_size: int | None = None) -> PreparedImage:
        """Upstream's letterbox in numpy: cv2.resize (INTER_LINEAR) into the top-left corner of a
        black square; the map back divides by upstream's one det_scale on both axes."""
        import cv2

        size = self._square(max_size)
        h, w = image.shape[:2]
        if size is None:
            return PreparedImage(_pad_np(image, round_up(h, PAD_TO), round_up(w, PAD_TO)))
        nh, nw, det_scale = letterbox_size(h, w, size)
        resized = cv2.resize(image, (nw, nh))
        return PreparedImage(_pad_np(resized, size, size), (1 / det_scale, 1 / det_scale))

    def _square(self, max_size: int | None) -> int | None:
        size = INPUT_SIZE if max_size is None else int(max_size)
        return round_up(size, PAD_TO) if size else None


def _pad_np(image: np.ndarray, h: int, w: int) -> np.ndarray:
    if image.shape[:2] == (h, w):
        return image
    out = np.zeros((h, w, image.shape[2]), image.dtype)
    out[:image.shape[0], :image.shape[1]] = image
    return out


def letterbox_size(h: int, w: int, size: int) -> tuple[int, int, float]:
    """(new h, new w, det_scale) exactly as insightface's SCRFD.detect computes them (int()
    truncation; det_scale from the height, used for both axes)."""
    if h / w > 1.0:
        nh, nw = size, int(size / (h / w))
    else:
        nw, nh = size, int(size * (h / w))
    return nh, nw, nh / h


def input_geometry(h: int, w: int, size: int | None) -> tuple[tuple[int, int], float, tuple[int, int]]:
    """((resized h, w), det_scale, (input h, w)) of an h x w image in network_input."""
    if size is None:
        return (h, w), 1.0, (round_up(h, PAD_TO), round_up(w, PAD_TO))
    nh, nw, det_scale = letterbox_size(h, w, size)
    return (nh, nw), det_scale, (size, size)


def network_input(images: Tensor, size: int | None, channels_last: bool = False) -> tuple[Tensor, float]:
    """RGB 0..255 (B,3,H,W) -> (normalised input (B,3,S,S), det_scale): resized bilinearly into
    the top-left of a black S x S square (S=size), or, for size None, padded to multiples of 32;
    then (x - MEAN) / STD. Written once into the input (channels-last if asked), with no padded
    copy and no layout copy after it."""
    (nh, nw), det_scale, (sh, sw) = input_geometry(*images.shape[-2:], size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty((len(images), 3, sh, sw), dtype=torch.float32, device=images.device, memory_format=fmt)
    x[..., nh:, :].fill_(-MEAN / STD)
    x[..., :nh, nw:].fill_(-MEAN / STD)
    x[..., :nh, :nw].copy_(resize_pixels(images, (nh, nw))).sub_(MEAN).div_(STD)
    return x, det_scale


def postprocess(scores: Tensor, boxes: Tensor, kps: Tensor, input_hw: Sequence[int],
                min_score: float = DEFAULT_MIN_SCORE, nms_iou: float = DEFAULT_NMS_IOU) -> Detections:
    """Head outputs for an input of size input_hw -> Detections in that input's pixels: points
    with score >= min_score (at most PRE_NMS_TOP_K per image) are decoded (distances times their
    stride), NMS per image (+1 areas, as upstream), ordered by image then decreasing score."""
    points = grid_points(int(input_hw[0]), int(input_hw[1]), STRIDES, NUM_ANCHORS,
                         device=scores.device, dtype=scores.dtype)
    if points.shape[0] != scores.shape[1]:
        raise ValueError(f"{scores.shape[1]} head outputs but {points.shape[0]} anchor points "
                         f"for an input of size {tuple(input_hw)}")
    passed = scores[..., 0] >= min_score
    if passed.any() and int(passed.sum(1).max()) > PRE_NMS_TOP_K:  # rare: keep each image's best k
        top = scores[..., 0].topk(PRE_NMS_TOP_K, dim=1).indices
        passed &= torch.zeros_like(passed).scatter_(1, top, True)
    image_index, point_index = passed.nonzero(as_tuple=True)
    p = points[point_index]
    stride = p[:, 2:]
    box = distance_to_boxes(p[:, :2], boxes[image_index, point_index] * stride)
    pts = distance_to_points(p[:, :2], kps[image_index, point_index] * stride)
    score = scores[image_index, point_index, 0]
    keep = group_by_image(batched_nms(box, score, image_index, nms_iou, offset=1.0), image_index)
    return Detections(box[keep], score[keep], pts[keep], image_index[keep])


# --- conversion from the insightface ONNX graph --------------------------------------------------

def _numeric(node) -> bool:
    """A conv whose weights the exporter renamed (BatchNorm folded in): backbone and towers."""
    return not node.inputs[1].startswith(("neck.", "bbox_head."))


def _walk_units(walk: GraphWalker, value: str, key: str, seq: nn.Module) -> str:
    """Follow a Sequential of ConvReLU / DepthwiseSeparable / BasicBlock units along the graph."""
    for name, unit in seq.named_children():
        k = f"{key}.{name}"
        if isinstance(unit, BasicBlock):
            value = _walk_block(walk, value, k, unit)
        elif isinstance(unit, DepthwiseSeparable):
            value = walk.conv(value, f"{k}.depthwise.conv", relu=True)
            value = walk.conv(value, f"{k}.pointwise.conv", relu=True)
        else:
            value = walk.conv(value, f"{k}.conv", relu=hasattr(unit, "act"))
    return value


def _walk_block(walk: GraphWalker, x: str, key: str, block: BasicBlock) -> str:
    y = walk.conv(x, f"{key}.conv1.conv", relu=True, kernel=3)
    y = walk.conv(y, f"{key}.conv2.conv")
    shortcut = x
    if block.downsample is not None:
        if hasattr(block.downsample, "pool"):
            pool = walk.op(x, "AveragePool", key)
            if pool.attrs.get("kernel_shape") != [2, 2] or pool.attrs.get("ceil_mode") != 1:
                raise OnnxError(f"{walk.model.source}: {key} shortcut pool is {pool.attrs}")
            x = pool.outputs[0]
        shortcut = walk.conv(x, f"{key}.downsample.conv", kernel=1)
    add = walk.op(y, "Add", key)
    if sorted(add.inputs) != sorted([y, shortcut]):
        raise OnnxError(f"{walk.model.source}: {key} adds {add.inputs}, expected {[y, shortcut]}")
    return walk.relu(add.outputs[0], key)


def _walk_body(walk: GraphWalker, model: SCRFD) -> list[str]:
    """The backbone from the graph input; returns the three stage outputs it hands the neck."""
    value = _walk_units(walk, walk.model.inputs[0].name, "body.stem", model.body.stem)
    if isinstance(model.body, ResNetV1eBody):
        pool = walk.op(value, "MaxPool", "body.maxpool")
        if pool.attrs.get("kernel_shape") != [2, 2] or pool.attrs.get("strides") != [2, 2]:
            raise OnnxError(f"{walk.model.source}: stem max pool is {pool.attrs}, expected 2x2 stride 2")
        value = pool.outputs[0]
    outs = []
    for i, stage in enumerate(model.body.stages):
        value = _walk_units(walk, value, f"body.stages.{i}", stage)
        outs.append(value)
    return outs[1:]


def _walk_heads(walk: GraphWalker, model: SCRFD, neck_outs: Sequence[str]) -> None:
    for i, s in enumerate(STRIDES):
        top = _walk_units(walk, neck_outs[i], f"head.towers.{i}", model.head.towers[i])
        for ours, theirs in (("cls", "stride_cls"), ("box", "stride_reg"), ("kps", "stride_kps")):
            node = walk.model.consumer(top, ("Conv",), lambda n: n.inputs[1] == f"bbox_head.{theirs}.({s}, {s}).weight")
            if node is None:
                raise OnnxError(f"{walk.model.source}: no bbox_head.{theirs}.({s}, {s}) conv on level {i}'s tower")
            walk.named(f"bbox_head.{theirs}.({s}, {s})", f"head.{ours}.{i}", node)


def map_onnx(path: str | Path, model: SCRFD) -> GraphWalker:
    """Walk an insightface SCRFD graph and map every initializer to `model`'s parameters (or to
    why it is none); the walker holds the state dict, the node of each layer and every use."""
    g = read_onnx(path)
    walk = GraphWalker(g, model, where=_numeric)
    taps = _walk_body(walk, model)
    for i, tap in enumerate(taps):  # the laterals must read exactly the stage outputs
        node = g.consumer(tap, ("Conv",), lambda n: n.inputs[1] == f"neck.lateral_convs.{i}.conv.weight")
        walk.named(f"neck.lateral_convs.{i}.conv", f"neck.lateral_convs.{i}", node)
    for group, count in (("fpn_convs", 3), ("downsample_convs", 2), ("pafpn_convs", 2)):
        for i in range(count):
            walk.named(f"neck.{group}.{i}.conv", f"neck.{group}.{i}")
    outs = [walk.nodes[k].outputs[0] for k in ("neck.fpn_convs.0", "neck.pafpn_convs.0", "neck.pafpn_convs.1")]
    _walk_heads(walk, model, outs)
    if model.head.box_scales is not None:
        walk.state["head.box_scales"] = np.stack(
            [walk.tracker.take(f"bbox_head.scales.{i}.scale", f"head.box_scales[{i}]").reshape(()) for i in range(3)])
    check_resizes(g)
    skip_shape_constants(walk.tracker)
    return walk.finish()


def builder(variant: str):
    """The SCRFD variant's constructor, named for conversion reports."""
    def build() -> SCRFD:
        return SCRFD(variant)
    build.__name__ = f"scrfd_{variant}"
    return build


def _spec(variant: str, file: UpstreamFile, num_params: int, description: str) -> WeightSpec:
    return WeightSpec(
        name=f"scrfd_{variant.replace('.', 'p')}", task="detect", files=(file,),
        license="insightface: non-commercial research use only",
        origin="deepinsight/insightface", converter=onnx_converter(file.filename, builder(variant), map_onnx),
        meta=ModelMeta(colour="RGB", mean=(MEAN,) * 3, std=(STD,) * 3, num_landmarks=5,
                       landmark_markup=FIVE_POINTS, num_params=num_params),
        defaults=TaskDefaults(min_score=DEFAULT_MIN_SCORE, nms_iou=DEFAULT_NMS_IOU, max_size=INPUT_SIZE),
        description=description)


# Upstream files: members of insightface's v0.7 release packs (buffalo_s/_m/_l.zip, not plain
# URLs); the URLs are HuggingFace mirrors of those members whose sha256 public projects pin to
# the values here (not downloaded from this machine).
register(_spec("500m", UpstreamFile(
    "det_500m.onnx", "5e4447f50245bbd7966bd6c0fa52938c61474a04ec7def48753668a9d8b4ea3a", 2524817,
    urls=("https://huggingface.co/deepghs/insightface/resolve/main/buffalo_s/det_500m.onnx",)),
    626_354, "SCRFD-500M with keypoints (insightface buffalo_s), boxes + 5 landmarks"),
    partial(SCRFD, "500m"))
register(_spec("2.5g", UpstreamFile(
    "det_2.5g.onnx", "041f73f47371333d1d17a6fee6c8ab4e6aecabefe398ff32cca4e2d5eaee0af9", 3292009,
    urls=("https://huggingface.co/immich-app/buffalo_m/resolve/main/detection/model.onnx",)),
    817_969, "SCRFD-2.5G with keypoints (insightface buffalo_m), boxes + 5 landmarks"),
    partial(SCRFD, "2.5g"))
register(_spec("10g", UpstreamFile(
    "det_10g.onnx", "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91", 16923827,
    urls=("https://huggingface.co/public-data/insightface/resolve/main/models/buffalo_l/det_10g.onnx",
          "https://huggingface.co/Aitrepreneur/insightface/resolve/main/models/buffalo_l/det_10g.onnx")),
    4_225_937, "SCRFD-10G with keypoints (insightface buffalo_l), boxes + 5 landmarks; converter checked "
       "on a stand-in only"),
    partial(SCRFD, "10g"))
