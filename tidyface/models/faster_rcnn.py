"""Faster R-CNN (Ren et al. 2015) with a ResNet-50 FPN (Lin et al. 2017): hysts/anime-face-detector's
anime face detector, trained with mmdetection 2.x.

Facts from hysts/anime-face-detector `anime_face_detector/configs/mmdet/faster-rcnn.py` (pytorch-
style ResNet-50, FPN 256 channels 5 outputs, anchors scales [8] ratios [0.5, 1, 2] strides 4..64,
RPN deltas stds 1, RoIAlign 7x7 sampling 0 on strides 4..32, Shared2FC box head 1024 wide, one
class, deltas stds 0.1/0.1/0.2/0.2, test cfg RPN nms_pre 1000 / max_per_img 1000 / NMS 0.7 /
min_bbox_size 0, RCNN score_thr 0.05 / NMS 0.5 / 100 per image; pipeline: keep-ratio resize to
(1333, 800), RGB, mean 123.675/116.28/103.53, std 58.395/57.12/57.375, pad to 32) and from
mmdet 2.x (`anchor_generator.py`: centre offset 0, ratio-major order; `delta_xywh_bbox_coder.py`:
log-size clip |log(16/1000)|, clamp to the image; `fpn.py`: nearest upsampling to the lateral's
size, P6 = max_pool2d(P5, 1, stride 2) without extra convs; `single_level_roi_extractor.py`:
level floor(log2(sqrt(area) / 56 + 1e-6)) clamped to 0..3; `rpn_head.py`: per-level top 1000,
boxes with w, h > 0, NMS within each level; `bbox_head.py`: softmax with the background last,
boxes mapped back to the image before `multiclass_nms`; mmcv `imrescale`: scale min(1333 / long,
800 / short), sides int(x * s + 0.5), bilinear).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert.mmdet import convert_mmdet
from ..ops.image import as_rgb_batch
from ..ops.nms import batched_nms, group_by_image
from ..ops.resize import resize_bilinear, round_up
from ..ops.roi_align import roi_align
from ..registry import ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Detector, PreparedImage

MEAN = (123.675, 116.28, 103.53)  # RGB (the config's to_rgb=True)
STD = (58.395, 57.12, 57.375)
SCALE = (1333, 800)  # (longer, shorter) side caps of mmcv's keep-ratio resize
PAD_TO = 32
DEPTHS = (3, 4, 6, 3)  # ResNet-50 bottlenecks per stage
FPN_CHANNELS = 256
STRIDES = (4, 8, 16, 32, 64)  # P2..P6; the RoI head reads P2..P5
ANCHOR_SCALE, ANCHOR_RATIOS = 8, (0.5, 1.0, 2.0)
RPN_STDS, RCNN_STDS = (1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)
MAX_LOG_RATIO = abs(math.log(16 / 1000))  # mmdet's wh_ratio_clip
RPN_PRE_NMS, RPN_POST_NMS, RPN_NMS_IOU = 1000, 1000, 0.7
ROI_SIZE, FINEST_SCALE = 7, 56
DEFAULT_MIN_SCORE, DEFAULT_NMS_IOU, MAX_PER_IMAGE = 0.05, 0.5, 100
BN_EPS = 1e-5


class ConvBN(nn.Module):
    """conv (no bias) + BatchNorm: a ResNet downsample shortcut (`conv`, `bn`)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 to c, 3x3 (stride here: pytorch style) to c, 1x1 to 4c, each with BN; plus the
    input (or its downsample); ReLU after each BN and after the sum."""

    def __init__(self, cin: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c, eps=BN_EPS)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c, eps=BN_EPS)
        self.conv3 = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * c, eps=BN_EPS)
        self.downsample = ConvBN(cin, 4 * c, stride) if stride != 1 or cin != 4 * c else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """conv1 (7x7/2) + bn1 + ReLU + 3x3/2 max pool, then layer1..layer4 -> C2..C5."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS)
        cin = 64
        for i, depth in enumerate(DEPTHS, 1):
            c = 64 * 2 ** (i - 1)
            blocks = [Bottleneck(cin if j == 0 else 4 * c, c, (1 if i == 1 else 2) if j == 0 else 1)
                      for j in range(depth)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = 4 * c

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


class FPN(nn.Module):
    """lateral0..3 (1x1) on C2..C5, top-down nearest upsampling, output0..3 (3x3) -> P2..P5;
    P6 is P5 subsampled (max pool 1, stride 2)."""

    def __init__(self, in_channels=(256, 512, 1024, 2048), c: int = FPN_CHANNELS):
        super().__init__()
        for i, cin in enumerate(in_channels):
            self.add_module(f"lateral{i}", nn.Conv2d(cin, c, 1))
            self.add_module(f"output{i}", nn.Conv2d(c, c, 3, 1, 1))
        self.levels = len(in_channels)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        lat = [getattr(self, f"lateral{i}")(f) for i, f in enumerate(feats)]
        for i in range(self.levels - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        out = [getattr(self, f"output{i}")(t) for i, t in enumerate(lat)]
        return out + [F.max_pool2d(out[-1], 1, 2)]


class RPNHead(nn.Module):
    """Shared over levels: a 3x3 conv + ReLU (`conv`), then per anchor an objectness logit
    (`cls`) and 4 deltas (`reg`)."""

    def __init__(self, c: int = FPN_CHANNELS, anchors: int = len(ANCHOR_RATIOS)):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.cls = nn.Conv2d(c, anchors, 1)
        self.reg = nn.Conv2d(c, 4 * anchors, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.conv(x))
        return self.cls(x), self.reg(x)


class BoxHead(nn.Module):
    """Two shared fcs + ReLU (`fc1`, `fc2`) on flattened 7x7 RoI features, then class logits
    (`cls`: the classes, background last) and per-class deltas (`reg`)."""

    def __init__(self, num_classes: int = 1, c: int = FPN_CHANNELS, width: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(c * ROI_SIZE * ROI_SIZE, width)
        self.fc2 = nn.Linear(width, width)
        self.cls = nn.Linear(width, num_classes + 1)
        self.reg = nn.Linear(width, 4 * num_classes)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.fc2(F.relu(self.fc1(roi_feats.flatten(1)))))
        return self.cls(x), self.reg(x)


class FasterRCNN(nn.Module, Detector):
    """forward: normalised, padded (B,3,H,W) -> (FPN maps P2..P6, RPN logits per level
    (B,A,h,w), RPN deltas per level (B,4A,h,w)): the dense part. `detect` adds the proposals,
    RoIAlign, the box head (`box_head`) and the post-processing, each a function below."""

    def __init__(self, num_classes: int = 1):
        super().__init__()
        self.backbone = ResNet50()
        self.neck = FPN()
        self.rpn = RPNHead()
        self.box_head = BoxHead(num_classes)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        feats = self.neck(self.backbone(x))
        heads = [self.rpn(f) for f in feats]
        return feats, [h[0] for h in heads], [h[1] for h in heads]

    @torch.no_grad()
    def detect(self, images: Tensor, *, min_score: float | None = None,
               max_size: int | None = None) -> Detections:
        """images (B,3,H,W) RGB 0..255 -> Detections in input pixels, landmarks None.

        max_size: the longer-side cap of mmdet's keep-ratio resize (default 1333, the shorter
        side capped at 800 scaled alike; images are also upscaled to it); 0: no resize.
        min_score: default 0.05 (the config's score_thr)."""
        images = as_rgb_batch(images)
        h, w = images.shape[-2:]
        nh, nw = resized_size(h, w, max_size)
        x = normalise_and_pad(resize_bilinear(images, (nh, nw)))
        factors = (w / nw, h / nh)
        feats, logits, deltas = self(x)
        proposals, image_index = rpn_proposals(logits, deltas, (nh, nw))
        rois = torch.cat([image_index[:, None].to(proposals.dtype), proposals], 1)
        cls, reg = self.box_head(extract_roi_features(feats[:len(STRIDES) - 1], rois))
        return box_detections(rois, cls, reg, (nh, nw), factors,
                              DEFAULT_MIN_SCORE if min_score is None else min_score)

    def prepare(self, image: np.ndarray, max_size: int | None = None) -> PreparedImage:
        """mmcv's keep-ratio resize in numpy (cv2 INTER_LINEAR); detect pads and normalises."""
        import cv2

        h, w = image.shape[:2]
        nh, nw = resized_size(h, w, max_size)
        out = image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        return PreparedImage(out, (w / nw, h / nh))

    def export_graphs(self) -> dict[str, tuple[nn.Module, Tensor]]:
        # the dense part only: proposals and NMS are data-dependent post-processing
        return {"": (DenseGraph(self), torch.rand(1, 3, 128, 160))}


class DenseGraph(nn.Module):
    """FasterRCNN.forward with its outputs flat and named (P2..P6 maps, RPN logits, RPN deltas),
    as an ONNX graph lists them."""

    onnx_outputs = tuple(f"{kind}_p{level}" for kind in ("fpn", "rpn_cls", "rpn_reg") for level in range(2, 7))

    def __init__(self, model: FasterRCNN):
        super().__init__()
        self.model = model
        self.train(model.training)  # a new module is in training mode: keep the model's own

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        feats, logits, deltas = self.model(x)
        return (*feats, *logits, *deltas)


def resized_size(h: int, w: int, max_size: int | None = None) -> tuple[int, int]:
    """mmcv imrescale's (h, w) for scale (1333, 800): factor min(long cap / long side, short cap /
    short side), sides int(x * s + 0.5); max_size replaces 1333 (800 scaled alike), 0: unchanged."""
    long_cap = SCALE[0] if max_size is None else int(max_size)
    if not long_cap:
        return int(h), int(w)
    short_cap = SCALE[1] * long_cap / SCALE[0]
    s = min(long_cap / max(h, w), short_cap / min(h, w))
    return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def normalise_and_pad(pixels: Tensor) -> Tensor:
    """RGB 0..255 floats (B,3,h,w) -> (x - mean) / std, zero-padded at the bottom and right to
    multiples of 32 (mmdet pads after Normalize, so the padding is 0 in normalised units)."""
    mean = torch.tensor(MEAN, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std = torch.tensor(STD, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    h, w = pixels.shape[-2:]
    return F.pad((pixels - mean) / std, (0, round_up(w, PAD_TO) - w, 0, round_up(h, PAD_TO) - h))


def level_anchors(stride: int, h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """mmdet AnchorGenerator's anchors of one level (h*w*A, 4) xyxy: base size = stride, centre
    offset 0 (centres at multiples of the stride), ratio = h/w, order y, x, ratio."""
    ratios = torch.tensor(ANCHOR_RATIOS, dtype=dtype, device=device)
    hr = ratios.sqrt()
    ws, hs = stride / hr * ANCHOR_SCALE, stride * hr * ANCHOR_SCALE
    base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], 1)
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) * stride,
                            torch.arange(w, device=device, dtype=dtype) * stride, indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def decode_deltas(boxes: Tensor, deltas: Tensor, stds: Sequence[float], image_hw: tuple[int, int]) -> Tensor:
    """mmdet delta2bbox (means 0): (dx, dy, dw, dh) * stds applied to xyxy boxes (w = x2 - x1),
    log sizes clipped to |log(16/1000)|, results clamped to [0, w] x [0, h]."""
    d = deltas * torch.tensor(stds, dtype=deltas.dtype, device=deltas.device)
    dw, dh = d[..., 2].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), d[..., 3].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx, cy = (boxes[..., 0] + boxes[..., 2]) * 0.5 + pw * d[..., 0], (boxes[..., 1] + boxes[..., 3]) * 0.5 + ph * d[..., 1]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    H, W = image_hw
    return torch.stack([(cx - gw * 0.5).clamp(0, W), (cy - gh * 0.5).clamp(0, H),
                        (cx + gw * 0.5).clamp(0, W), (cy + gh * 0.5).clamp(0, H)], -1)


def rpn_proposals(logits: Sequence[Tensor], deltas: Sequence[Tensor], image_hw: tuple[int, int],
                  pre_nms: int = RPN_PRE_NMS, post_nms: int = RPN_POST_NMS, iou: float = RPN_NMS_IOU
                  ) -> tuple[Tensor, Tensor]:
    """RPN maps -> proposals (N,4) xyxy in network pixels and their image index (N,): per image
    and level the top `pre_nms` by score, decoded, those with w, h > 0, NMS within each level,
    the best `post_nms` per image (ordered by image, then score)."""
    B = logits[0].shape[0]
    boxes, scores, groups = [], [], []
    for level, (lg, dl, stride) in enumerate(zip(logits, deltas, STRIDES)):
        a = level_anchors(stride, lg.shape[-2], lg.shape[-1], lg.device, lg.dtype)
        s = lg.permute(0, 2, 3, 1).reshape(B, -1).sigmoid()
        d = dl.permute(0, 2, 3, 1).reshape(B, -1, 4)
        s, top = s.topk(min(pre_nms, s.shape[1]), 1)
        d = d.gather(1, top[..., None].expand(-1, -1, 4))
        boxes.append(decode_deltas(a[top], d, RPN_STDS, image_hw).reshape(-1, 4))
        scores.append(s.reshape(-1))
        img = torch.arange(B, device=lg.device)[:, None].expand_as(top).reshape(-1)
        groups.append(img * len(STRIDES) + level)
    boxes, scores, groups = torch.cat(boxes), torch.cat(scores), torch.cat(groups)
    ok = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    boxes, scores, groups = boxes[ok], scores[ok], groups[ok]
    image_index = groups // len(STRIDES)
    keep = group_by_image(batched_nms(boxes, scores, groups, iou), image_index, post_nms)
    return boxes[keep], image_index[keep]


def roi_levels(rois: Tensor, levels: int) -> Tensor:
    """mmdet SingleRoIExtractor.map_roi_levels: floor(log2(sqrt(area) / 56 + 1e-6)) in 0..L-1."""
    scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
    return torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6)).clamp(0, levels - 1).long()


def extract_roi_features(feats: Sequence[Tensor], rois: Tensor) -> Tensor:
    """7x7 RoIAlign features (K, C, 7, 7) of rois (K,5), each from its level's map (P2..P5)."""
    out = feats[0].new_zeros((len(rois), feats[0].shape[1], ROI_SIZE, ROI_SIZE))
    level = roi_levels(rois, len(feats))
    for i, f in enumerate(feats):
        idx = (level == i).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = roi_align(f, rois[idx], ROI_SIZE, 1.0 / STRIDES[i], 0, aligned=True)
    return out


def box_detections(rois: Tensor, cls: Tensor, reg: Tensor, image_hw: tuple[int, int],
                   factors: tuple[float, float] = (1.0, 1.0), min_score: float = DEFAULT_MIN_SCORE,
                   nms_iou: float = DEFAULT_NMS_IOU, max_per_image: int = MAX_PER_IMAGE) -> Detections:
    """Box-head outputs of rois (K,5) -> face Detections: softmax (face score column 0), boxes
    decoded and clamped in network pixels, mapped to the image by `factors` (x, y) before NMS
    (as mmdet rescales first), score > min_score, NMS per image, at most 100 per image."""
    score = cls.softmax(-1)[:, 0]
    boxes = decode_deltas(rois[:, 1:], reg[:, :4], RCNN_STDS, image_hw)
    boxes = boxes * torch.tensor(factors, dtype=boxes.dtype, device=boxes.device).repeat(2)
    image_index = rois[:, 0].long()
    ok = score > min_score
    boxes, score, image_index = boxes[ok], score[ok], image_index[ok]
    keep = group_by_image(batched_nms(boxes, score, image_index, nms_iou), image_index, max_per_image)
    return Detections(boxes[keep], score[keep], None, image_index[keep])


# --- weights --------------------------------------------------------------------------------------

WEIGHTS_FILE = "mmdet_anime-face_faster-rcnn.pth"


def _convert(paths: Mapping[str, Path]) -> dict:
    return convert_mmdet(paths[WEIGHTS_FILE], FasterRCNN)


register(
    WeightSpec(
        name="faster_rcnn_anime",
        task="detect",
        # No sha256 or size is published: the store prints and records the sha256 of what it gets.
        files=(UpstreamFile(WEIGHTS_FILE, None, None, urls=(
            f"https://github.com/hysts/anime-face-detector/releases/download/v0.0.1/{WEIGHTS_FILE}",)),),
        license="MIT (hysts/anime-face-detector)",
        origin="hysts/anime-face-detector",
        converter=_convert,
        meta=ModelMeta(colour="RGB", mean=MEAN, std=STD, num_params=41_348_181),
        # video-to-faces' anime detector, so video2faces --style anime's
        defaults=TaskDefaults(min_score=DEFAULT_MIN_SCORE, nms_iou=DEFAULT_NMS_IOU, max_size=SCALE[0],
                              styles=("anime",)),
        description="Faster R-CNN R50-FPN (mmdet) anime face detector, boxes only",
    ),
    FasterRCNN,
)
