"""YOLOv3 (Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement") trained for faces on
WIDER FACE: sthanhng/yoloface's `yolov3-wider_16000.weights` with its `cfg/yolov3-face.cfg`
(one class, boxes only).

Facts: the layer graph and the .weights layout from that cfg (Darknet-53: a 3x3 conv to 32, five
stages of a 3x3 stride-2 conv and 1, 2, 8, 8, 4 residual blocks of 1x1 (c/2) + 3x3 (c) convs;
per level five alternating 1x1 / 3x3 convs, a 3x3 conv and a 1x1 linear conv with bias to
3 * (5 + 1) = 18 outputs; the coarser level's fifth conv, reduced by a 1x1 conv and upsampled
2x (nearest), goes first in a concatenation with backbone layer 61, then 36; every other conv
has BatchNorm and LeakyReLU 0.1; anchors the COCO ones, masks 6,7,8 / 3,4,5 / 0,1,2 for strides
32 / 16 / 8, as video-to-faces' own converted copy of these weights also uses them), read with
tidyface.convert.darknet (pjreddie/darknet's parser.c). BatchNorm eps 1e-5 as in pytorchyolo
1.8.0 `models.py` (darknet's CPU path divides by sqrt(var) + 1e-6 instead: 4e-6 relative at
variance 1). Pre- and post-
processing from nsndp/video-to-faces (read in its fork sephirot-github/video-to-faces, HEAD
071cd07) `src/videotofaces/detectors/yolo.py` + `operations/prep.py` (RGB / 255,
the longer side resized to the input size with cv2 INTER_LINEAR, shorter side int(x * s + 0.5),
zero padding at the bottom and right to multiples of 32, boxes scaled back per axis;
video-to-faces uses 608, sthanhng/yoloface 416) and sthanhng/yoloface `utils.py` (score =
objectness * class probability > 0.5, NMS 0.4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete
from ..convert.darknet import Conv, DarknetError, Section, conv_layers, parse_cfg, read_weights
from ..ops.image import as_rgb_batch
from ..ops.nms import batched_nms, group_by_image
from ..ops.resize import resize_bilinear, round_up
from ..ops.yolo import decode_yolo, flatten_yolo_maps, yolo_priors
from ..registry import ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Detector, PreparedImage

LEAKY_SLOPE = 0.1
BN_EPS = 1e-5
DEPTHS = (1, 2, 8, 8, 4)  # residual blocks per Darknet-53 stage
WIDTHS = (64, 128, 256, 512, 1024)  # output channels per stage
STRIDES = (32, 16, 8)  # of the three outputs, in forward order (as the cfg's [yolo] layers come)
NECK_WIDTHS = (512, 256, 128)  # the 1x1 convs of each level's five-conv block
# The cfg's anchors (w, h in input pixels) per output, masks 6,7,8 / 3,4,5 / 0,1,2.
ANCHORS = (((116, 90), (156, 198), (373, 326)), ((30, 61), (62, 45), (59, 119)), ((10, 13), (16, 30), (33, 23)))
ROUTED = {16: 61, 8: 36}  # the backbone layer (cfg numbering) each finer level concatenates
INPUT_SIZE = 416  # the cfg's width/height and sthanhng/yoloface's IMG_WIDTH: the longer side
PAD_TO = 32  # the coarsest stride
DEFAULT_MIN_SCORE = 0.5  # sthanhng/yoloface CONF_THRESHOLD (kept if score > it)
DEFAULT_NMS_IOU = 0.4  # sthanhng/yoloface NMS_THRESHOLD


class ConvBNLeaky(nn.Module):
    """A darknet [convolutional] with batch_normalize=1, activation=leaky: conv (no bias), BN,
    LeakyReLU 0.1; padding size // 2 (pad=1)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.bn(self.conv(x)), LEAKY_SLOPE)


class Residual(nn.Module):
    """1x1 conv to c/2, 3x3 conv back to c, plus the input ([shortcut] from=-3, linear)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = ConvBNLeaky(c, c // 2, 1)
        self.conv2 = ConvBNLeaky(c // 2, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


class DarknetStage(nn.Module):
    """A 3x3 stride-2 conv (`down`), then residual blocks block1..blockN."""

    def __init__(self, cin: int, cout: int, depth: int):
        super().__init__()
        self.down = ConvBNLeaky(cin, cout, 3, 2)
        for j in range(1, depth + 1):
            self.add_module(f"block{j}", Residual(cout))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.children():
            x = layer(x)
        return x


class Darknet53(nn.Module):
    """stem (3x3 conv to 32) and stage1..stage5; returns the outputs of stages 3, 4, 5
    (strides 8, 16, 32: cfg layers 36, 61, 74)."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNLeaky(3, 32, 3)
        for i, (depth, cin, cout) in enumerate(zip(DEPTHS, (32,) + WIDTHS[:-1], WIDTHS), 1):
            self.add_module(f"stage{i}", DarknetStage(cin, cout, depth))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.stage2(self.stage1(self.stem(x)))
        c3 = self.stage3(x)
        c4 = self.stage4(c3)
        return c3, c4, self.stage5(c4)


class DetectionBlock(nn.Sequential):
    """Five convs alternating 1x1 to c and 3x3 to 2c (conv1..conv5), ending at c channels."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        for k in range(1, 6):
            odd = k % 2 == 1
            self.add_module(f"conv{k}", ConvBNLeaky(cin if k == 1 else (2 * c if odd else c),
                                                    c if odd else 2 * c, 1 if odd else 3))


class YoloOutput(nn.Module):
    """A 3x3 conv to 2c (`conv`), then the linear 1x1 conv with bias (`pred`) to A*(5+C)."""

    def __init__(self, c: int, outputs: int):
        super().__init__()
        self.conv = ConvBNLeaky(c, 2 * c, 3)
        self.pred = nn.Conv2d(2 * c, outputs, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pred(self.conv(x))


def _upsample_onto(x: Tensor, lateral: Tensor) -> Tensor:
    """Nearest 2x upsampling, cropped to the map it is concatenated with: at multiples of 32
    the sizes already agree; the crop keeps other sizes (ONNX's odd test sizes) running."""
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return torch.cat([up[..., :lateral.shape[-2], :lateral.shape[-1]], lateral], 1)


class YOLOv3(nn.Module, Detector):
    """forward: (B,3,H,W) RGB 0..1 -> raw head maps (B, 3*(5+C), H/s, W/s) for s = 32, 16, 8,
    each anchor's (t_x, t_y, t_w, t_h, objectness, class logits) along the channels: the inputs
    of the cfg's three [yolo] layers. `detect` letterboxes, decodes (ops.yolo) and runs NMS."""

    onnx_outputs = ("stride32", "stride16", "stride8")

    def __init__(self, num_classes: int = 1, anchors=ANCHORS):
        super().__init__()
        self.anchors = tuple(tuple(tuple(a) for a in level) for level in anchors)
        self.num_classes = num_classes
        outputs = len(self.anchors[0]) * (5 + num_classes)
        self.backbone = Darknet53()
        self.neck, self.head = nn.Module(), nn.Module()
        for s, c, cin in zip(STRIDES, NECK_WIDTHS, (1024, 512 + 256, 256 + 128)):
            if s != 32:  # the coarser level's fifth conv, reduced to c for upsampling
                setattr(self.neck, f"lateral{s}", ConvBNLeaky(2 * c, c, 1))
            setattr(self.neck, f"stride{s}", DetectionBlock(cin, c))
            setattr(self.head, f"stride{s}", YoloOutput(c, outputs))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c3, c4, c5 = self.backbone(x)
        n, h = self.neck, self.head
        f32 = n.stride32(c5)
        f16 = n.stride16(_upsample_onto(n.lateral16(f32), c4))
        f8 = n.stride8(_upsample_onto(n.lateral8(f16), c3))
        return h.stride32(f32), h.stride16(f16), h.stride8(f8)

    @torch.no_grad()
    def detect(self, images: Tensor, *, min_score: float | None = None,
               max_size: int | None = None) -> Detections:
        """images (B,3,H,W) RGB 0..255 on the model's device -> Detections in input pixels,
        landmarks None.

        max_size: the longer side the network sees (default 416): each image is resized to it,
        aspect kept (also upscaled, as video-to-faces does), and zero-padded at the bottom and
        right to multiples of 32; 0: no resize, only that padding. min_score: default 0.5 (kept
        if objectness * face probability > it)."""
        images = as_rgb_batch(images)
        x, factors = letterbox(images, self._side(max_size))
        # NCHW: channels-last input (RetinaFace's, SCRFD's choice) costs this net 25% more CPU time
        # (benchmarks/bench_yolov3.py --cpu-cost)
        dets = postprocess(self(x / 255), self.anchors, DEFAULT_MIN_SCORE if min_score is None else min_score)
        scale = torch.tensor(factors, dtype=dets.boxes.dtype, device=dets.boxes.device).repeat(2)
        return Detections(dets.boxes * scale, dets.scores, None, dets.image_index)

    def prepare(self, image: np.ndarray, max_size: int | None = None) -> PreparedImage:
        """The letterbox in numpy (cv2 INTER_LINEAR, as video-to-faces resizes), per-axis map back."""
        import cv2

        side = self._side(max_size)
        h, w = image.shape[:2]
        nh, nw = (h, w) if side is None else letterbox_size(h, w, side)
        resized = image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        out = np.zeros((round_up(nh, PAD_TO), round_up(nw, PAD_TO), 3), image.dtype)
        out[:nh, :nw] = resized
        return PreparedImage(out, (w / nw, h / nh))

    def export_graphs(self) -> dict[str, tuple[nn.Module, Tensor]]:
        # ~33 GMAC at 416x416: a small example keeps the ONNX check quick (any size runs)
        return {"": (self, torch.rand(2, 3, 96, 128))}

    @staticmethod
    def _side(max_size: int | None) -> int | None:
        side = INPUT_SIZE if max_size is None else int(max_size)
        return side or None


def letterbox_size(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) with the longer side `side` and the shorter int(x * s + 0.5), as video-to-faces'
    resize_cv2 computes them."""
    s = side / max(h, w)
    return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def letterbox(images: Tensor, side: int | None) -> tuple[Tensor, tuple[float, float]]:
    """RGB 0..255 (B,3,H,W) -> (float pixels resized bilinearly so the longer side is `side`
    (None: not resized), zero-padded at the bottom and right to multiples of 32; the (x, y)
    factors that map the network's pixels back to the image's)."""
    h, w = images.shape[-2:]
    nh, nw = (h, w) if side is None else letterbox_size(h, w, side)
    x = resize_bilinear(images, (nh, nw))
    return F.pad(x, (0, round_up(nw, PAD_TO) - nw, 0, round_up(nh, PAD_TO) - nh)), (w / nw, h / nh)


def postprocess(maps: Sequence[Tensor], anchors=ANCHORS, min_score: float = DEFAULT_MIN_SCORE,
                nms_iou: float = DEFAULT_NMS_IOU) -> Detections:
    """Head maps (strides 32, 16, 8) -> Detections in network-input pixels: class 0 (faces)
    scores > min_score, NMS per image, ordered by image then decreasing score."""
    H, W = maps[-1].shape[-2] * STRIDES[-1], maps[-1].shape[-1] * STRIDES[-1]
    pred = flatten_yolo_maps(maps, len(anchors[0]))
    priors = yolo_priors(H, W, STRIDES, anchors, device=pred.device, dtype=pred.dtype)
    if priors.shape[0] != pred.shape[1]:
        raise ValueError(f"{pred.shape[1]} predictions but {priors.shape[0]} priors for maps of "
                         f"{[tuple(m.shape[-2:]) for m in maps]}")
    boxes, scores = decode_yolo(pred, priors)
    image_index, index = (scores[..., 0] > min_score).nonzero(as_tuple=True)
    boxes, score = boxes[image_index, index], scores[image_index, index, 0]
    keep = group_by_image(batched_nms(boxes, score, image_index, nms_iou), image_index)
    return Detections(boxes[keep], score[keep], None, image_index[keep])


# --- conversion from the darknet .cfg and .weights ------------------------------------------------

def darknet_layout(num_classes: int = 1, anchors=ANCHORS) -> list[tuple[str, str | None, tuple]]:
    """The cfg's layers in order, as this module builds them: (kind, our name for a conv or
    None, detail), the detail as `_found` reads a cfg layer: a conv's (filters, size, stride,
    batch_normalize, activation), a shortcut's (from,), a route's layer numbers, an upsample's
    (stride,), a yolo layer's (mask, all anchors, classes)."""
    out: list[tuple[str, str | None, tuple]] = []

    def conv(name, filters, size, stride=1, bn=True, act="leaky"):
        out.append(("convolutional", name, (filters, size, stride, bn, act)))

    conv("backbone.stem", 32, 3)
    for i, (depth, width) in enumerate(zip(DEPTHS, WIDTHS), 1):
        conv(f"backbone.stage{i}.down", width, 3, 2)
        for j in range(1, depth + 1):
            conv(f"backbone.stage{i}.block{j}.conv1", width // 2, 1)
            conv(f"backbone.stage{i}.block{j}.conv2", width, 3)
            out.append(("shortcut", None, (-3,)))
    # the cfg lists all nine anchors, small to large; each [yolo] picks its own by mask
    all_anchors = tuple((float(w), float(h)) for level in reversed(anchors) for w, h in level)
    for level, (s, c) in enumerate(zip(STRIDES, NECK_WIDTHS)):
        if s != 32:
            out.append(("route", None, (len(out) - 4,)))  # back to the coarser level's fifth conv
            conv(f"neck.lateral{s}", c, 1)
            out.append(("upsample", None, (2,)))
            out.append(("route", None, (len(out) - 1, ROUTED[s])))
        for k in range(1, 6):
            conv(f"neck.stride{s}.conv{k}", c if k % 2 else 2 * c, 1 if k % 2 else 3)
        conv(f"head.stride{s}.conv", 2 * c, 3)
        conv(f"head.stride{s}.pred", len(anchors[level]) * (5 + num_classes), 1, bn=False, act="linear")
        first = len(all_anchors) - sum(len(a) for a in anchors[:level + 1])
        out.append(("yolo", None, (tuple(range(first, first + len(anchors[level]))), all_anchors, num_classes)))
    return out


def _found(s: Section, conv: Conv | None) -> tuple:
    """A cfg layer's detail, in darknet_layout's terms (conv: its shape from conv_layers)."""
    if conv is not None:
        return (conv.filters, conv.size, conv.stride, conv.batch_normalize, conv.activation)
    if s.kind == "shortcut":
        return (s.integer("from"),)
    if s.kind == "route":
        return tuple(i if i >= 0 else s.index + i for i in s.integers("layers"))
    if s.kind == "upsample":
        return (s.integer("stride", 2),)
    if s.kind == "yolo":
        values = [float(v) for v in s.get("anchors", "").split(",") if v]
        return (tuple(s.integers("mask")), tuple(zip(values[0::2], values[1::2])), s.integer("classes", 20))
    return ()


def _unsupported(s: Section, conv: Conv | None) -> str | None:
    """Options of a layer that would change what it computes beyond what _found compares."""
    if conv is not None and (conv.groups != 1 or conv.padding != conv.size // 2):
        return f"groups={conv.groups}, padding {conv.padding}"
    if s.kind == "shortcut" and s.get("activation", "linear") != "linear":
        return f"activation={s.get('activation')}"
    if s.kind == "route" and s.get("groups", "1") != "1":
        return f"groups={s.get('groups')}"
    if s.kind == "yolo" and (s.get("scale_x_y", "1") not in ("1", "1.0") or s.get("new_coords", "0") != "0"):
        return "scale_x_y / new_coords (another box codec)"
    return None


def match_darknet(layers: list[Section], convs: list[Conv], source: str, num_classes: int = 1,
                  anchors=ANCHORS) -> list[str]:
    """Our module name of each convolutional layer, in cfg order, once the cfg is checked to be
    exactly this network, layer by layer; the first difference is refused naming its line."""
    want = darknet_layout(num_classes, anchors)
    if len(layers) != len(want):
        raise DarknetError(f"{source}: {len(layers)} layers, the YOLOv3 face network has {len(want)}")
    shapes, names = iter(convs), []
    for s, (kind, name, detail) in zip(layers, want):
        conv = next(shapes) if s.kind in ("convolutional", "conv") else None
        same = (conv is not None) == (kind == "convolutional") and (conv is not None or s.kind == kind)
        got = _found(s, conv) if same else ()
        odd = _unsupported(s, conv) if same else None
        if not same or got != detail or odd:
            raise DarknetError(f"{source}: layer {s.index} (line {s.line}) is [{s.kind}] {odd or got}, "
                               f"expected [{kind}] {detail}: not the YOLOv3 face network's cfg")
        if name is not None:
            names.append(name)
    return names


def convert_darknet(cfg: str | Path, weights: str | Path) -> dict:
    """The darknet .cfg and .weights -> this module's state dict: the cfg is matched layer by
    layer to the network, every float of the .weights is taken by name, and the result has
    exactly the model's keys and shapes (or the files are refused, named)."""
    net, layers = parse_cfg(cfg)
    convs = conv_layers(net, layers, str(cfg))
    names = match_darknet(layers, convs, str(cfg))
    state = {}
    for name, conv, arrays in zip(names, convs, read_weights(weights, convs).layers):
        t = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if conv.batch_normalize:
            state.update({f"{name}.conv.weight": t["weights"], f"{name}.bn.weight": t["scales"],
                          f"{name}.bn.bias": t["biases"], f"{name}.bn.running_mean": t["rolling_mean"],
                          f"{name}.bn.running_var": t["rolling_variance"],
                          # darknet keeps no step counter; it is unused outside training
                          f"{name}.bn.num_batches_tracked": torch.tensor(0)})
        else:
            state.update({f"{name}.weight": t["weights"], f"{name}.bias": t["biases"]})
    return check_complete(state, YOLOv3, str(weights))


CFG_FILE, WEIGHTS_FILE = "yolov3-face.cfg", "yolov3-wider_16000.weights"
GDRIVE_ID = "1xYasjU52whXMLT5MtF7RCPQkV66993oR"  # sthanhng/yoloface README's link to the .weights


def _convert(paths: Mapping[str, Path]) -> dict:
    return convert_darknet(paths[CFG_FILE], paths[WEIGHTS_FILE])


register(
    WeightSpec(
        name="yolov3_wider",
        task="detect",
        files=(
            UpstreamFile(CFG_FILE, "f6563bd6923fd6500d2c2d6025f32ebdba916a85e5c9798351d916909f62aaf5", 8334,
                         urls=("https://raw.githubusercontent.com/sthanhng/yoloface/master/cfg/yolov3-face.cfg",)),
            # No sha256 or size is published for the .weights: the store prints and records the
            # sha256 of what it fetches; the converter checks the float count against the cfg.
            UpstreamFile(WEIGHTS_FILE, None, None, urls=(
                f"https://drive.usercontent.google.com/download?id={GDRIVE_ID}&export=download&confirm=t",
                f"https://drive.google.com/uc?export=download&confirm=t&id={GDRIVE_ID}")),
        ),
        license="MIT (sthanhng/yoloface); trained on WIDER FACE",
        origin="sthanhng/yoloface (also used by nsndp/video-to-faces, juliansprt/OpenCvSharpDNN)",
        converter=_convert,
        meta=ModelMeta(colour="RGB", std=(255.0, 255.0, 255.0), num_params=61_523_734),
        defaults=TaskDefaults(min_score=DEFAULT_MIN_SCORE, nms_iou=DEFAULT_NMS_IOU, max_size=INPUT_SIZE),
        description="YOLOv3 (Darknet-53) face detector trained on WIDER FACE, boxes only",
    ),
    YOLOv3,
)
