"""MTCNN (Zhang et al. 2016) face detector: P/R/O-Net cascade, batched over same-size frames.

Facts (layer shapes, pyramid, thresholds, box arithmetic) from timesler/facenet-pytorch
`models/mtcnn.py` and `models/utils/detect_face.py`, whose weights (`pnet.pt`, `rnet.pt`,
`onet.pt`) this loads; the cascade reproduces its results while cropping every candidate of every
frame in one vectorised step instead of one Python call per box.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import load_torch_file, rename_keys
from ..ops.image import as_rgb_batch
from ..ops.nms import batched_nms, nms
from ..ops.parallel import map_frames
from ..registry import FIVE_POINTS, ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Detector


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    onnx_outputs = ("prob", "features")

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)  # then MaxPool2d(2, 2, ceil_mode)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.face_logits = nn.Conv2d(32, 2, 1)
        self.box_offsets = nn.Conv2d(32, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B,3,H,W) normalised -> face probability (B,h,w), features (B,32,h,w) for offsets_at."""
        x = max_pool_2x2(prelu_channels_last(self.conv1(x), self.prelu1.weight))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.face_logits(x).softmax(1)[:, 1], x

    def offsets_at(self, features: Tensor, image: Tensor, row: Tensor, col: Tensor) -> Tensor:
        """Box offsets (N,4) of the given cells. The offsets head runs only where the face head
        found a candidate (a few hundred of a level's ~80k cells): as a 1x1 convolution over
        every cell it cost 1.3 ms of P-Net's 21 at level 0 of a 720p frame, one thread."""
        return F.linear(features[image, :, row, col], self.box_offsets.weight.flatten(1), self.box_offsets.bias)


class PNetGraph(nn.Module):
    """P-Net as one exportable graph: face probability and box offsets (B,4,h,w) at every cell
    (the eager cascade computes offsets only at candidate cells, see PNet.offsets_at)."""

    onnx_outputs = ("prob", "offsets")

    def __init__(self, pnet: PNet):
        super().__init__()
        self.pnet = pnet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        prob, features = self.pnet(x)
        return prob, self.pnet.box_offsets(features)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    onnx_outputs = ("prob", "offsets")

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc, self.prelu_fc = nn.Linear(576, 128), nn.PReLU(128)
        self.face_logits = nn.Linear(128, 2)
        self.box_offsets = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N,3,24,24) -> face probability (N,), box offsets (N,4)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The weights come from TensorFlow: flatten in (W,H,C) order as the original graph did.
        x = self.prelu_fc(self.fc(x.permute(0, 3, 2, 1).flatten(1)))
        return self.face_logits(x).softmax(1)[:, 1], self.box_offsets(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: score, box offsets and 5 landmarks."""

    onnx_outputs = ("prob", "offsets", "landmarks")

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc, self.prelu_fc = nn.Linear(1152, 256), nn.PReLU(256)
        self.face_logits = nn.Linear(256, 2)
        self.box_offsets = nn.Linear(256, 4)
        self.landmarks = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N,3,48,48) -> face probability (N,), box offsets (N,4), landmarks (N,10): x1..x5, y1..y5
        as fractions of the crop."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu_fc(self.fc(x.permute(0, 3, 2, 1).flatten(1)))
        return self.face_logits(x).softmax(1)[:, 1], self.box_offsets(x), self.landmarks(x)


def normalize_(x: Tensor) -> Tensor:
    """RGB 0..255 -> the [-1, 1] range the nets were trained on, in place."""
    return x.sub_(127.5).mul_(0.0078125)


def _tracing() -> bool:
    """Whether torch.onnx or torch.jit is tracing: a trace would freeze the shape and layout
    branches of the fast paths below, so while tracing they give way to the plain ops."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def prelu_channels_last(x: Tensor, weight: Tensor) -> Tensor:
    """F.prelu(x, weight), exactly, for a channels-last (N,C,H,W) x, run over rows of W*C values
    with the weight tiled: on the 4-d tensor torch runs a scalar loop over an innermost C=10
    (P-Net's conv1 at level 0 of a 720p frame, one thread: 3.4 ms; over rows: 0.9-1.1 ms)."""
    if _tracing() or not x.is_contiguous(memory_format=torch.channels_last):
        return F.prelu(x, weight)
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h, w * c)
    return F.prelu(rows, weight.repeat(w)).view(n, h, w, c).permute(0, 3, 1, 2)


def max_pool_2x2(x: Tensor) -> Tensor:
    """MaxPool2d(2, 2, ceil_mode=True) as two strided maxima: exact, and 3-4x faster than the
    pooling kernel on CPU (which also writes an index per output)."""
    if _tracing():
        return F.max_pool2d(x, 2, 2, ceil_mode=True)
    h, w = x.shape[2:]
    y = torch.maximum(x[:, :, 0:h - 1:2], x[:, :, 1:h:2])
    if h % 2:
        y = torch.cat([y, x[:, :, h - 1:]], 2)
    z = torch.maximum(y[:, :, :, 0:w - 1:2], y[:, :, :, 1:w:2])
    if w % 2:
        z = torch.cat([z, y[:, :, :, w - 1:]], 3)
    return z


def pyramid_scales(h: int, w: int, min_face_size: float, factor: float) -> list[float]:
    """Scales at which a min_face_size face becomes P-Net's 12 px window, down to 12 px images."""
    scale = 12.0 / min_face_size
    side = min(h, w) * scale
    scales = []
    while side >= 12:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def square(boxes: Tensor) -> Tensor:
    """Grow each box to a square around its centre (side = the longer edge)."""
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = wh.max(1, keepdim=True).values
    x1y1 = boxes[:, 0:2] + wh * 0.5 - side * 0.5
    return torch.cat([x1y1, x1y1 + side], 1)


def apply_offsets(boxes: Tensor, offsets: Tensor, inclusive: bool = True) -> Tensor:
    """Move box edges by offsets scaled by the box size (inclusive pixel count, as upstream)."""
    wh = boxes[:, 2:4] - boxes[:, 0:2] + (1 if inclusive else 0)
    return boxes + offsets * wh.repeat(1, 2)


def _bins(start: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool bins of `size` cells over [start, start+length), per row of start:
    cell i spans [floor(i*L/size), ceil((i+1)*L/size)) (what F.interpolate(mode="area") uses)."""
    i = torch.arange(size, device=start.device)
    lo = start[..., None] + (i * length[..., None]) // size
    hi = start[..., None] - ((-(i + 1) * length[..., None]) // size)
    return lo, hi


@functools.lru_cache(maxsize=256)
def _frame_bins(length: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """_bins over a whole frame side; the same few pyramid sizes recur for every frame."""
    zero = torch.zeros((), dtype=torch.long, device=device)
    return _bins(zero, torch.tensor(length, device=device), size)


class SummedArea:
    """Area-averaged resampling of one frame, whole or in many boxes, from its summed-area table.

    Area resampling (F.interpolate(mode="area"), which facenet-pytorch uses for the pyramid and
    for every crop) averages the input pixels of each output cell. With a summed-area table each
    cell is four lookups, so the whole pyramid costs one pass over the frame instead of one per
    level, and all boxes are cropped in one gather instead of one call per box. Sums are exact
    for 8-bit images, so results equal F.interpolate's: built in float64 (torch's int32 cumsum
    is 2-3x slower), then kept as int32 for 8-bit frames (half the bytes to gather).
    """

    def __init__(self, image: Tensor):
        c, self.h, self.w = image.shape
        pixels = image.permute(1, 2, 0)
        if image.device.type == "mps":  # no float64 there: integer sums of the rounded pixels
            pixels = pixels.round() if pixels.is_floating_point() else pixels
            t = image.new_zeros((self.h + 1, self.w + 1, c), dtype=torch.int64)
        else:
            t = image.new_zeros((self.h + 1, self.w + 1, c), dtype=torch.float64)
        t[1:, 1:] = pixels
        torch.cumsum(t, 1, out=t)
        torch.cumsum(t, 0, out=t)  # table[r, k] = sum of image[:, :r, :k]
        if image.dtype == torch.uint8 and self.h * self.w * 255 < 2**31:
            t = t.to(torch.int32)
        self.table = t

    def resize(self, height: int, width: int) -> Tensor:
        """The frame resized to (1,3,height,width), channels-last float32."""
        r0, r1 = _frame_bins(self.h, height, self.table.device)
        c0, c1 = _frame_bins(self.w, width, self.table.device)
        rows = self.table.index_select(0, r1) - self.table.index_select(0, r0)
        sums = rows.index_select(1, c1) - rows.index_select(1, c0)
        return _average(sums[None], (r1 - r0)[None], (c1 - c0)[None])

    def crops(self, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Crops (M,3,size,size), channels-last, of the in-frame part of each box (upstream's
        clipping rules), and the indices of the boxes that had a non-empty part."""
        b = boxes.trunc().long()
        x0, y0 = (b[:, 0] - 1).clamp(min=0), (b[:, 1] - 1).clamp(min=0)
        x1, y1 = b[:, 2].clamp(max=self.w), b[:, 3].clamp(max=self.h)
        kept = torch.nonzero((x1 > x0) & (y1 > y0)).flatten()
        x0, y0, x1, y1 = x0[kept], y0[kept], x1[kept], y1[kept]
        r0, r1 = _bins(y0, y1 - y0, size)
        c0, c1 = _bins(x0, x1 - x0, size)
        flat, stride = self.table.view(-1, self.table.shape[2]), self.table.shape[1]

        def at(rows, cols):  # (M,size,size,C) table values at the given row/col edges
            idx = rows[:, :, None] * stride + cols[:, None, :]
            return flat.index_select(0, idx.flatten()).view(*idx.shape, flat.shape[1])

        sums = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
        return _average(sums, r1 - r0, c1 - c0), kept


def _average(sums: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(N,h,w,C) cell sums, cell heights (N,h) and widths (N,w) -> (N,C,h,w) channels-last means,
    divided as adaptive_avg_pool2d divides (by height, then width) so the results are identical."""
    out = sums.float().div_(rows[:, :, None, None].float()).div_(cols[:, None, :, None].float())
    return out.permute(0, 3, 1, 2)


class MTCNN(nn.Module, Detector):
    """The three nets; `detect` runs the cascade on a batch of same-size frames."""

    def __init__(self, min_face_size: float = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.min_face_size, self.thresholds, self.factor = min_face_size, tuple(thresholds), factor

    def forward(self, x: Tensor):  # the cascade is not one forward; see detect()
        raise NotImplementedError("MTCNN is a cascade: call detect(images)")

    def export_graphs(self) -> dict[str, tuple[nn.Module, Tensor]]:
        """The three nets, the forward graphs of the cascade, at their input sizes."""
        return {"pnet": (PNetGraph(self.pnet), torch.randn(2, 3, 64, 80)), "rnet": (self.rnet, torch.randn(4, 3, 24, 24)),
                "onet": (self.onet, torch.randn(4, 3, 48, 48))}

    @torch.inference_mode()
    def detect(self, images: Tensor, *, min_score: float | None = None,
               max_size: int | None = None) -> Detections:
        """images (B,3,H,W) RGB 0..255 (uint8, or float) on the model's device -> Detections.

        min_score: O-Net's threshold (default 0.7). max_size: run on a copy shrunk (area
        averaging) so its longer side is at most this, for speed; boxes and landmarks still come
        back in input pixels. Default (None or 0): full size, where the pyramid already sets
        the smallest face (20 px). A (3,H,W) image is a batch of one; float64/float16 are cast
        to float32; anything else (channels last, floats in 0..1, other dtypes) raises
        InputError (ops.image.as_rgb_batch).
        """
        images = as_rgb_batch(images)
        h, w = images.shape[2:]
        if max_size and max(h, w) > max_size:
            s = max_size / max(h, w)
            small = F.interpolate(images.float(), size=(round(h * s), round(w * s)), mode="area")
            d = self.detect(small, min_score=min_score)
            sx, sy = w / small.shape[3], h / small.shape[2]
            scale = torch.tensor([sx, sy, sx, sy], device=images.device)
            return Detections(d.boxes * scale, d.scores, d.landmarks * scale[:2], d.image_index)
        t1, t2, t3 = self.thresholds
        if min_score is not None:
            t3 = min_score
        # Stages 1 and 2 one frame at a time (on CPU, frames in parallel on worker threads): its
        # summed-area table is built, read while it is in cache, and freed. Stage 3 then runs on
        # the 48x48 crops of all frames at once.
        per_frame = map_frames(lambda image: self._refine(image, t1, t2), list(images), images.device)
        boxes, crops = (torch.cat(t) for t in zip(*per_frame))
        counts = torch.tensor([len(b) for b, _ in per_frame], device=images.device)
        img_idx = torch.repeat_interleave(torch.arange(len(images), device=images.device), counts)
        if len(boxes) == 0:
            return Detections.empty(images.device)

        # Stage 3: score, final box and landmarks on 48x48 crops.
        prob, offsets, marks = _chunked(self.onet, normalize_(crops))
        keep = prob > t3
        boxes, prob, offsets, marks, img_idx = boxes[keep], prob[keep], offsets[keep], marks[keep], img_idx[keep]
        wh = (boxes[:, 2:4] - boxes[:, 0:2] + 1)[:, None, :]
        points = torch.stack([marks[:, :5], marks[:, 5:]], 2) * wh + boxes[:, None, 0:2] - 1
        boxes = apply_offsets(boxes, offsets)
        pick = batched_nms(boxes, prob, img_idx, 0.7, offset=1, mode="min")
        return Detections(boxes[pick].float(), prob[pick].float(), points[pick].float(), img_idx[pick])

    @torch.inference_mode()  # also on map_frames' worker threads
    def _refine(self, image: Tensor, t1: float, t2: float) -> tuple[Tensor, Tensor]:
        """Stages 1 and 2 on one frame (3,H,W) -> squared boxes (N,4) for stage 3, their 48x48 crops."""
        areas = SummedArea(image)
        boxes = self._propose(areas, t1)
        crops, kept = areas.crops(boxes, 24)
        prob, offsets = _chunked(self.rnet, normalize_(crops))
        passed = prob > t2
        boxes, prob, offsets = boxes[kept][passed], prob[passed], offsets[passed]
        pick = nms(boxes, prob, 0.7)
        boxes = square(apply_offsets(boxes[pick], offsets[pick]))
        crops, kept = areas.crops(boxes, 48)
        return boxes[kept], crops

    def _propose(self, areas: SummedArea, threshold: float) -> Tensor:
        """Stage 1: P-Net over the image pyramid, NMS 0.5 within each scale, then 0.7 across ->
        the proposals, moved by their offsets and squared (N,4)."""
        per_scale = []
        h, w, dev = areas.h, areas.w, areas.table.device
        for scale in pyramid_scales(h, w, self.min_face_size, self.factor):
            prob, features = self.pnet(normalize_(areas.resize(int(h * scale + 1), int(w * scale + 1))))
            image, row, col = torch.nonzero(prob >= threshold, as_tuple=True)
            score = prob[image, row, col]
            cell = torch.stack([col, row], 1).float()
            boxes = torch.cat([((2 * cell + 1) / scale).floor(), ((2 * cell + 12) / scale).floor()], 1)
            offs = self.pnet.offsets_at(features, image, row, col)
            pick = nms(boxes, score, 0.5)
            per_scale.append((boxes[pick], score[pick], offs[pick]))
        if not per_scale:  # frame smaller than P-Net's window
            none = torch.zeros(0, 4, device=dev)
            per_scale.append((none, none[:, 0], none))
        boxes, scores, offsets = (torch.cat(t) for t in zip(*per_scale))
        pick = nms(boxes, scores, 0.7)
        return square(apply_offsets(boxes[pick], offsets[pick], inclusive=False))


def _chunked(net: nn.Module, x: Tensor, size: int = 64):
    """Run a per-crop net in chunks of 64 crops. Per crop, on 2 CPU cores (benchmarks/RESULTS.md):
    O-Net 190 us in chunks of 16-64 but 460 us in chunks of 256-512 (upstream's size), R-Net 29 us
    at 64 vs 42 at 512: larger chunks' activations leave the cache and are page-faulted afresh."""
    if len(x) <= size:
        return net(x)
    outs = [net(x[i:i + size]) for i in range(0, len(x), size)]
    return tuple(torch.cat(t) for t in zip(*outs))


# Upstream key -> tidyface key, per net; everything else keeps its name.
_KEY_MAP = {
    "pnet": [(r"^conv4_1\.", "face_logits."), (r"^conv4_2\.", "box_offsets.")],
    "rnet": [(r"^dense4\.", "fc."), (r"^prelu4\.", "prelu_fc."), (r"^dense5_1\.", "face_logits."),
             (r"^dense5_2\.", "box_offsets.")],
    "onet": [(r"^dense5\.", "fc."), (r"^prelu5\.", "prelu_fc."), (r"^dense6_1\.", "face_logits."),
             (r"^dense6_2\.", "box_offsets."), (r"^dense6_3\.", "landmarks.")],
}


def convert_facenet_pytorch(paths: Mapping[str, Path]) -> dict:
    state = {}
    for net, rules in _KEY_MAP.items():
        for k, v in rename_keys(load_torch_file(paths[f"{net}.pt"]), rules).items():
            state[f"{net}.{k}"] = v
    return state


_RAW = "https://github.com/timesler/facenet-pytorch/raw/v2.6.0/data/"
_FILES = (
    ("pnet.pt", "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f", 28570),
    ("rnet.pt", "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86", 403147),
    ("onet.pt", "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d", 1559269),
)

register(
    WeightSpec(
        name="mtcnn",
        task="detect",
        files=tuple(UpstreamFile(n, s, z, urls=(_RAW + n,), pypi=f"facenet-pytorch==2.6.0:facenet_pytorch/data/{n}")
                    for n, s, z in _FILES),
        license="MIT",
        origin="timesler/facenet-pytorch (weights from kpzhang93/MTCNN_face_detection_alignment)",
        converter=convert_facenet_pytorch,
        meta=ModelMeta(mean=(127.5,) * 3, std=(128.0,) * 3, num_landmarks=5, landmark_markup=FIVE_POINTS,
                       num_params=495_850),
        # min_score is O-Net's threshold (P-Net 0.6 and R-Net 0.7 stay); NMS is the cascade's own
        defaults=TaskDefaults(min_score=0.7, max_size=None),
        description="MTCNN P/R/O-Net cascade, boxes + 5 landmarks",
    ),
    MTCNN,
)
