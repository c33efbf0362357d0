"""RetinaFace (Deng et al. 2019) face detector, MobileNet-0.25 and ResNet-50 variants: boxes + 5 landmarks.

Facts (layer shapes, leaky slopes, anchors, variances, BGR mean, thresholds, top-k) from
biubug6/Pytorch_Retinaface (`models/retinaface.py`, `models/net.py`, `data/config.py`,
`detect.py`), as carried by facexlib `detection/retinaface*.py`; ResNet-50 as torchvision lays it out.
"""
from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import load_torch_file, rename_keys
from ..ops.image import as_rgb_batch
from ..ops.nms import batched_nms, group_by_image
from ..ops.priors import decode_boxes, decode_landmarks, flatten_head, prior_boxes
from ..ops.resize import network_size, to_bgr
from ..registry import FIVE_POINTS, ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from ..types import Detections
from . import folded
from .base import Detector, PreparedImage

MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # anchor sides in input pixels, per level
STEPS = (8, 16, 32)  # stride of each level
VARIANCES = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)  # the nets were trained on cv2 images: BGR 0..255 minus this
NUM_ANCHORS = 2  # len(MIN_SIZES[k])
# Library choice; upstream detect.py keeps > 0.02 (for WIDER eval) and draws > 0.6; facexlib uses 0.8.
DEFAULT_MIN_SCORE = 0.5
DEFAULT_NMS_IOU = 0.4
PRE_NMS_TOP_K = 5000  # upstream detect.py --top_k
MAX_PER_IMAGE = 750  # upstream detect.py --keep_top_k
# Default cap on the longer side of the network input (None: no cap). Up to 1280 px an image runs
# at full size, as upstream evaluates it (facexlib use_origin_size=True); larger photos shrink, which
# bounds time and memory. Smaller caps trade faces for speed; measured for mnet025 on 1280x720
# frames, 2 CPU threads, batch 1: 48 ms/frame at full size, 27 at 960, 17 at 640. At 640, 93% of
# full-size detections on 39 mixed photos remain (the rest: faces under ~40 px or scored < 0.8) and
# scores can shift (dogs.jpg: 0.97 -> 0.52), so callers that want speed (video) pass max_size.
DEFAULT_MAX_SIZE = {"mobilenet0.25": 1280, "resnet50": 1280}

class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + optional (leaky) ReLU; leaky=None means no activation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 leaky: float | None = 0.0):
        super().__init__()
        self.conv = folded.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        if leaky is not None:
            self.act = nn.LeakyReLU(leaky, inplace=True) if leaky > 0 else nn.ReLU(inplace=True)


class DepthwiseSeparable(nn.Sequential):
    """MobileNetV1 block: 3x3 depthwise conv, then 1x1 pointwise conv, each BN + LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = ConvBNAct(cin, cin, 3, stride, groups=cin, leaky=0.1)
        self.pointwise = ConvBNAct(cin, cout, 1, leaky=0.1)


class MobileNetV1Body(nn.Module):
    """MobileNetV1 at width 0.25 (8..256 channels); returns the stride 8, 16, 32 feature maps."""

    channels = (64, 128, 256)

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(
            ConvBNAct(3, 8, 3, 2, leaky=0.1),
            DepthwiseSeparable(8, 16, 1), DepthwiseSeparable(16, 32, 2), DepthwiseSeparable(32, 32, 1),
            DepthwiseSeparable(32, 64, 2), DepthwiseSeparable(64, 64, 1))
        self.stage2 = nn.Sequential(
            DepthwiseSeparable(64, 128, 2), *(DepthwiseSeparable(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(DepthwiseSeparable(128, 256, 2), DepthwiseSeparable(256, 256, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return c3, c4, self.stage3(c4)


class Bottleneck(nn.Module):
    """torchvision ResNet-50 bottleneck (v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = folded.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = folded.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = folded.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        # torchvision's key names: downsample.0 (conv) / downsample.1 (bn).
        self.downsample = (nn.Sequential(folded.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet50Body(nn.Module):
    """torchvision resnet50 without avgpool/fc (same child names and order, so the upstream
    checkpoint's `body.*` keys load as they are); returns layer2, layer3, layer4 outputs."""

    channels = (512, 1024, 2048)

    def __init__(self):
        super().__init__()
        self.conv1 = folded.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layer))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


class FPN(nn.Module):
    """Top-down feature pyramid: 1x1 laterals, nearest upsampling, 3x3 merge convs."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, leaky: float):
        super().__init__()
        self.lateral1 = ConvBNAct(in_channels[0], out_channels, 1, leaky=leaky)
        self.lateral2 = ConvBNAct(in_channels[1], out_channels, 1, leaky=leaky)
        self.lateral3 = ConvBNAct(in_channels[2], out_channels, 1, leaky=leaky)
        self.merge1 = ConvBNAct(out_channels, out_channels, 3, leaky=leaky)
        self.merge2 = ConvBNAct(out_channels, out_channels, 3, leaky=leaky)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        p3, p4, p5 = self.lateral1(feats[0]), self.lateral2(feats[1]), self.lateral3(feats[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 receptive fields built from stacked
    3x3 convs (the 7x7 branch continues from the 5x5 branch's first conv), concatenated, ReLU."""

    def __init__(self, cin: int, cout: int, leaky: float):
        super().__init__()
        self.conv3x3 = ConvBNAct(cin, cout // 2, 3, leaky=None)
        self.conv5x5_a = ConvBNAct(cin, cout // 4, 3, leaky=leaky)
        self.conv5x5_b = ConvBNAct(cout // 4, cout // 4, 3, leaky=None)
        self.conv7x7_a = ConvBNAct(cout // 4, cout // 4, 3, leaky=leaky)
        self.conv7x7_b = ConvBNAct(cout // 4, cout // 4, 3, leaky=None)

    def forward(self, x: Tensor) -> Tensor:
        shared = self.conv5x5_a(x)
        out = torch.cat([self.conv3x3(x), self.conv5x5_b(shared), self.conv7x7_b(self.conv7x7_a(shared))], 1)
        return F.relu(out)


class RetinaFace(nn.Module, Detector):
    """forward: (B,3,H,W) preprocessed -> loc (B,P,4) box regressions, logits (B,P,2) raw class
    scores (background, face; softmax gives upstream's test-phase output), landmarks (B,P,10)
    regressions; P = sum over levels of ceil(H/s)*ceil(W/s)*2. `detect` runs the whole pipeline."""

    reduced_precision = True
    traceable_forward = True  # tensor ops whose shapes follow the input's: CPU graphs (ops.graphs)

    onnx_outputs = ("loc", "logits", "landmarks")

    def __init__(self, backbone: str = "mobilenet0.25"):
        super().__init__()
        if backbone == "mobilenet0.25":
            self.body, width = MobileNetV1Body(), 64
        elif backbone == "resnet50":
            self.body, width = ResNet50Body(), 256
        else:
            raise ValueError(f"backbone must be 'mobilenet0.25' or 'resnet50', not {backbone!r}")
        self.backbone = backbone
        leaky = 0.1 if width <= 64 else 0.0  # upstream: leaky slope 0.1 only in the narrow variant
        self.fpn = FPN(self.body.channels, width, leaky)
        self.ssh = nn.ModuleList(SSH(width, width, leaky) for _ in STEPS)
        self.class_head = nn.ModuleList(folded.Conv2d(width, NUM_ANCHORS * 2, 1) for _ in STEPS)
        self.box_head = nn.ModuleList(folded.Conv2d(width, NUM_ANCHORS * 4, 1) for _ in STEPS)
        self.landmark_head = nn.ModuleList(folded.Conv2d(width, NUM_ANCHORS * 10, 1) for _ in STEPS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = [ssh(f) for ssh, f in zip(self.ssh, self.fpn(self.body(x)))]
        loc = torch.cat([flatten_head(h(f), 4) for h, f in zip(self.box_head, feats)], 1)
        logits = torch.cat([flatten_head(h(f), 2) for h, f in zip(self.class_head, feats)], 1)
        landmarks = torch.cat([flatten_head(h(f), 10) for h, f in zip(self.landmark_head, feats)], 1)
        return loc, logits, landmarks

    @torch.no_grad()
    def detect(self, images: Tensor, *, min_score: float | None = None,
               max_size: int | None = None) -> Detections:
        """images (B,3,H,W) RGB 0..255 (uint8 or float) on the model's device -> Detections in
        input pixels.

        min_score: default 0.5; max_size: the longer side of the network input, default 1280
        (0: full resolution). On CPU the batch runs in forwards of at most about a megapixel:
        bigger ones are slower per frame (their activations leave the cache; 720p, 2 cores:
        61 ms/frame one at a time, 83 in a batch of 8). A (3,H,W) image is a batch of one;
        float64/float16 are cast to float32; anything else (channels last, floats in 0..1, other
        dtypes) raises InputError (ops.image.as_rgb_batch)."""
        images = as_rgb_batch(images)
        size = self._cap(max_size)
        h, w = network_size(images.shape[-2:], size)
        cpu = images.device.type == "cpu"
        per_forward = max(1, CPU_PIXELS_PER_FORWARD // (h * w)) if cpu else max(1, len(images))
        outs = []
        for i in range(0, max(1, len(images)), per_forward):
            x = preprocess(images[i:i + per_forward], size)
            if cpu:  # oneDNN runs these convs 1.2-1.8x faster on NHWC input (measured)
                x = x.contiguous(memory_format=torch.channels_last)
            outs.append(self(x))
        loc, logits, landmarks = (torch.cat(t) for t in zip(*outs))
        return postprocess(loc, logits, landmarks, (h, w), images.shape[-2:],
                           DEFAULT_MIN_SCORE if min_score is None else min_score, DEFAULT_NMS_IOU)

    def prepare(self, image: np.ndarray, max_size: int | None = None) -> PreparedImage:
        """The image shrunk to the network size with cv2's INTER_LINEAR, as upstream resizes."""
        import cv2

        h, w = image.shape[:2]
        nh, nw = network_size((h, w), self._cap(max_size))
        if (nh, nw) == (h, w):
            return PreparedImage(image)
        small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        return PreparedImage(small, (w / nw, h / nh))

    def _cap(self, max_size: int | None) -> int | None:
        if max_size is None:
            return DEFAULT_MAX_SIZE[self.backbone]
        return None if int(max_size) == 0 else int(max_size)


CPU_PIXELS_PER_FORWARD = 1_000_000


def preprocess(images: Tensor, max_size: int | None = None) -> Tensor:
    """RGB 0..255 (B,3,H,W), uint8 or float -> network input: resized so the longer side is at most
    max_size (aspect kept, bilinear as upstream's cv2.INTER_LINEAR; never upscaled), BGR minus mean."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images.shape)}")
    size = network_size(images.shape[-2:], max_size)
    if size != tuple(images.shape[-2:]):
        images = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    # Swapped before the cast: on 8-bit frames that moves a quarter of the bytes (2.4x faster).
    bgr = to_bgr(images).float()
    return bgr - torch.tensor(BGR_MEAN, dtype=bgr.dtype, device=bgr.device).view(1, 3, 1, 1)


@lru_cache(maxsize=8)
def _priors(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The priors of an input size, built once per size (a video's frames share one; read only)."""
    return prior_boxes(h, w, MIN_SIZES, STEPS, device=device, dtype=dtype)


def postprocess(loc: Tensor, logits: Tensor, landmarks: Tensor, input_hw: Sequence[int],
                image_hw: Sequence[int], min_score: float = DEFAULT_MIN_SCORE,
                nms_iou: float = DEFAULT_NMS_IOU, pre_nms_top_k: int = PRE_NMS_TOP_K,
                max_per_image: int = MAX_PER_IMAGE) -> Detections:
    """Head outputs for a network input of size input_hw -> Detections in pixels of images of size
    image_hw (the priors are fractions of the input, so scaling by the image size undoes any resize).

    Per image: faces with score > min_score, the pre_nms_top_k best, NMS at nms_iou, then at most
    max_per_image; results ordered by image, then decreasing score."""
    priors = _priors(int(input_hw[0]), int(input_hw[1]), loc.device, loc.dtype)
    if priors.shape[0] != loc.shape[1]:
        raise ValueError(f"{loc.shape[1]} head outputs but {priors.shape[0]} priors "
                         f"for an input of size {tuple(input_hw)}")
    # softmax(logits)[..., 1] as a sigmoid: equal (to 1e-7), and CPU softmax over a size-2 dim is slow.
    scores = (logits[..., 1] - logits[..., 0]).sigmoid()
    passed = scores > min_score
    if passed.any() and int(passed.sum(1).max()) > pre_nms_top_k:  # rare: keep each image's best k
        top = scores.topk(pre_nms_top_k, dim=1).indices
        passed &= torch.zeros_like(passed).scatter_(1, top, True)
    image_index, prior_index = passed.nonzero(as_tuple=True)
    scores = scores[image_index, prior_index]
    # Only the surviving candidates are decoded.
    p = priors[prior_index]
    wh = torch.tensor([image_hw[1], image_hw[0]], dtype=loc.dtype, device=loc.device)
    boxes = decode_boxes(loc[image_index, prior_index], p, VARIANCES) * wh.repeat(2)
    points = decode_landmarks(landmarks[image_index, prior_index], p, VARIANCES) * wh

    keep = group_by_image(batched_nms(boxes, scores, image_index, nms_iou), image_index, max_per_image)
    return Detections(boxes[keep], scores[keep], points[keep], image_index[keep])


# Upstream key -> tidyface key, applied in order (upstream names in models/net.py, retinaface.py).
UPSTREAM_KEY_MAP = [
    (r"^module\.", ""),  # saved from nn.DataParallel
    # MobileNet body: stage1.0 is conv+bn; every other block is dw conv(0) bn(1), pw conv(3) bn(4).
    (r"^body\.stage1\.0\.0\.", "body.stage1.0.conv."),
    (r"^body\.stage1\.0\.1\.", "body.stage1.0.bn."),
    (r"^body\.(stage\d\.\d+)\.0\.", r"body.\1.depthwise.conv."),
    (r"^body\.(stage\d\.\d+)\.1\.", r"body.\1.depthwise.bn."),
    (r"^body\.(stage\d\.\d+)\.3\.", r"body.\1.pointwise.conv."),
    (r"^body\.(stage\d\.\d+)\.4\.", r"body.\1.pointwise.bn."),
    # (ResNet body keys are torchvision's and stay as they are.)
    (r"^fpn\.output(\d)\.", r"fpn.lateral\1."),
    (r"^ssh1\.", "ssh.0."), (r"^ssh2\.", "ssh.1."), (r"^ssh3\.", "ssh.2."),
    (r"\.conv3X3\.", ".conv3x3."),
    (r"\.conv5X5_1\.", ".conv5x5_a."), (r"\.conv5X5_2\.", ".conv5x5_b."),
    (r"\.conv7X7_2\.", ".conv7x7_a."), (r"\.conv7x7_3\.", ".conv7x7_b."),
    (r"^(fpn\.\w+|ssh\.\d\.\w+)\.0\.", r"\1.conv."),
    (r"^(fpn\.\w+|ssh\.\d\.\w+)\.1\.", r"\1.bn."),
    (r"^ClassHead\.(\d)\.conv1x1\.", r"class_head.\1."),
    (r"^BboxHead\.(\d)\.conv1x1\.", r"box_head.\1."),
    (r"^LandmarkHead\.(\d)\.conv1x1\.", r"landmark_head.\1."),
]


def convert_state_dict(state: Mapping[str, Tensor]) -> dict:
    """An upstream (biubug6 / facexlib) RetinaFace state dict -> this module's keys."""
    return rename_keys(dict(state), UPSTREAM_KEY_MAP)


def _converter(filename: str):
    def convert(paths: Mapping[str, Path]) -> dict:
        return convert_state_dict(load_torch_file(paths[filename]))
    return convert


_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
_CLIBDEV = "https://github.com/clibdev/Pytorch_Retinaface/releases/latest/download/"


def _meta(num_params: int) -> ModelMeta:
    return ModelMeta(colour="BGR", mean=BGR_MEAN, num_landmarks=5, landmark_markup=FIVE_POINTS,
                     num_params=num_params)


def _defaults(backbone: str, styles: tuple[str, ...] = ()) -> TaskDefaults:
    return TaskDefaults(min_score=DEFAULT_MIN_SCORE, nms_iou=DEFAULT_NMS_IOU,
                        max_size=DEFAULT_MAX_SIZE[backbone], styles=styles)


# The facexlib and clibdev release files are byte-identical copies of biubug6's Google Drive files
# (same sha256, published in clibdev/Pytorch_Retinaface's README); the store keeps biubug6's names.
register(
    WeightSpec(
        name="retinaface_mnet025",
        task="detect",
        files=(UpstreamFile("mobilenet0.25_Final.pth",
                            "2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220", 1789735,
                            urls=(_FACEXLIB + "detection_mobilenet0.25_Final.pth",
                                  _CLIBDEV + "retinaface-mobilenet-0.25.pth")),),
        license="MIT",
        origin="biubug6/Pytorch_Retinaface",
        converter=_converter("mobilenet0.25_Final.pth"),
        meta=_meta(426_608), defaults=_defaults("mobilenet0.25", styles=("live",)),
        description="RetinaFace MobileNet-0.25 (WIDER FACE), boxes + 5 landmarks",
    ),
    partial(RetinaFace, "mobilenet0.25"),
)
register(
    WeightSpec(
        name="retinaface_r50",
        task="detect",
        files=(UpstreamFile("Resnet50_Final.pth",
                            "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d", 109497761,
                            urls=(_FACEXLIB + "detection_Resnet50_Final.pth",
                                  _CLIBDEV + "retinaface-resnet-50.pth")),),
        license="MIT",
        origin="biubug6/Pytorch_Retinaface",
        converter=_converter("Resnet50_Final.pth"),
        meta=_meta(27_293_600), defaults=_defaults("resnet50"),
        description="RetinaFace ResNet-50 (WIDER FACE), boxes + 5 landmarks",
    ),
    partial(RetinaFace, "resnet50"),
)
