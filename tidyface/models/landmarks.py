"""insightface coordinate-regression landmarkers: 2d106det (106 2-D points from a face box).

Facts from: the network, insightface `recognition/symbol/fmobilenet.py` at net_multiplier 0.5
(conv_1 .. conv_14: each an mxnet Convolution without bias, BatchNorm with mxnet's default eps
0.001, PReLU; the `data - 127.5`, `* 0.0078125` input ops) with the head of nsndp/tidy-torch-
models `detectors/coord_reg.py` (conv_15: 3x3 stride 2 to 64 channels, BatchNorm eps 1e-3,
PReLU; flatten; fc1 576 -> 212; its initializer names `conv_N[_dw]_conv2d_weight`,
`_batchnorm_gamma/beta/moving_mean/moving_var`, `_relu_gamma`, `fc1_weight/bias`); insightface
model_zoo README (MobileNet-0.5, 1.2M parameters); a public test that reads the real file's
first two nodes as `_minusscalar0`, `_mulscalar0`, and a public log of insightface loading it
(input ['None', 3, 192, 192], mean 0.0, std 1.0). Pre- and post-processing from insightface 0.7.3
`python-package/insightface/model_zoo/landmark.py` (Landmark) and `utils/face_align.py`.
The real 2d106det.onnx is not on these machines: its converter is checked on a stand-in built
from those names and shapes (tests/landmark_standins.py), not on the file.

1k3d68 (68 3-D points) is not here: public code gives no layer list for it (the model zoo
README says only "ResNet-50, 34.2M parameters"); `decode_points` already reads its 3-D output.

Pre-processing (Landmark.get): around the box centre, scale = S / (1.5 max(w, h)), no rotation,
the centre to (S/2, S/2) (S = 192), one cv2.warpAffine (bilinear, black border) of the 8-bit
image; the blob is (crop - mean) / std where insightface reads (mean, std) from the graph
(`insightface_blob_norm`: 0 and 1 when it normalises inside, as 2d106det does, else 127.5, 128).
Post-processing: the output as (-1, 3) rows when it has >= 3000 values, else (-1, 2); its last
K rows; x, y (+1) * (S // 2) and z * (S // 2); then the inverse crop map (z times its scale).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..convert.onnx import GraphWalker, Node, OnnxError, OnnxModel, onnx_converter, read_onnx
from ..ops.align import invert, transform_points, warp
from ..ops.image import as_rgb_batch
from ..registry import ModelMeta, UpstreamFile, WeightSpec, register
from ..types import Detections
from .base import Landmarker

INPUT_SIZE = 192  # the graph's fixed input (Landmark.input_size)
BOX_SPAN = 1.5  # Landmark.get: the crop side is 1.5 times the box's longer side
BN_EPS = 1e-3  # mxnet BatchNorm's default eps (fmobilenet's Conv sets none)
# (channels in, channels out, stride of the depthwise conv) of fmobilenet's conv_2 .. conv_14
# at net_multiplier 0.5 (bf = 16)
UNITS = ((16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
         *((256, 256, 1),) * 5, (256, 512, 2), (512, 512, 1))
HEAD_CHANNELS = 64
MARKUP_106 = ("insightface 2d106det 106 points (alignment/coordinate_reg README markup; eye rings "
              "33-42 / 87-96, nose tip 86, mouth corners 52, 61: ops.markup)")
# Graph ops that compute nothing at inference (mxnet exports Dropout; exporters add Identity).
PASS_THROUGH = ("Dropout", "Identity")


class ConvBNPReLU(nn.Module):
    """fmobilenet's Conv(): convolution without bias (padding kernel // 2), BatchNorm, PReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.PReLU(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """conv_N_dw (3x3 depthwise, carrying the stride) then conv_N (1x1 pointwise)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = ConvBNPReLU(cin, cin, 3, stride, groups=cin)
        self.pointwise = ConvBNPReLU(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class CoordRegMobileNet(nn.Module, Landmarker):
    """forward: (B,3,192,192) the graph's input (insightface's blob; for 2d106det RGB 0..255) ->
    (B, num_outputs) coordinates in the crop, about -1..1 (fc1). The graph's own input ops are
    `input_shift` / `input_scale`; `blob_mean` / `blob_std` are what insightface subtracts and
    divides by before it (both set by the converter from the graph). `landmarks` runs the step."""

    def __init__(self, num_outputs: int = 212, num_points: int = 106):
        super().__init__()
        self.num_points = num_points
        self.register_buffer("input_shift", torch.zeros(()))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("blob_mean", torch.zeros(()))
        self.register_buffer("blob_std", torch.ones(()))
        self.stem = ConvBNPReLU(3, UNITS[0][0], 3, 2)  # conv_1
        self.units = nn.Sequential(*(DepthwiseSeparable(*u) for u in UNITS))  # conv_2 .. conv_14
        self.head = ConvBNPReLU(UNITS[-1][1], HEAD_CHANNELS, 3, 2)  # conv_15
        side = INPUT_SIZE // 64  # six stride-2 layers
        self.fc = nn.Linear(HEAD_CHANNELS * side * side, num_outputs)  # fc1

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.input_shift) * self.input_scale  # the graph's Sub, then Mul
        return self.fc(self.head(self.units(self.stem(x))).flatten(1))

    @torch.inference_mode()
    def landmarks(self, images: Tensor, detections: Detections) -> Detections:
        """images (B,3,H,W) RGB 0..255 on the model's device; detections: faces from any
        detector (xyxy boxes) -> the same faces with their K points in image pixels. Every face
        of the batch is cropped by one warp and goes through one forward."""
        images = as_rgb_batch(images)
        dets = detections.to(images.device)
        if len(dets) == 0:
            return Detections(dets.boxes, dets.scores, dets.boxes.new_zeros(0, self.num_points, 2),
                              dets.image_index)
        mats = crop_matrices(dets.boxes, INPUT_SIZE)
        crops = warp(images, mats, dets.image_index, (INPUT_SIZE, INPUT_SIZE))
        if images.dtype == torch.uint8:
            crops = crops.round()  # upstream warps the 8-bit image: its crop is 8-bit too
        raw = self((crops - self.blob_mean) / self.blob_std)
        points = decode_points(raw, mats, self.num_points, INPUT_SIZE)
        return Detections(dets.boxes, dets.scores, points[..., :2].to(dets.boxes.dtype), dets.image_index)


def crop_matrices(boxes: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """(N,4) xyxy boxes -> (N,3,3) float64 image -> crop maps, as Landmark.get builds them
    (face_align.transform with rotation 0): scale s = size / (1.5 max(w, h)), the box centre
    to (size / 2, size / 2)."""
    b = boxes.to(torch.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    s = size / (torch.maximum(w, h) * BOX_SPAN)
    mats = torch.zeros(len(b), 3, 3, dtype=torch.float64, device=b.device)
    mats[:, 0, 0] = mats[:, 1, 1] = s
    mats[:, 0, 2] = size / 2 - s * (b[:, 0] + b[:, 2]) / 2
    mats[:, 1, 2] = size / 2 - s * (b[:, 1] + b[:, 3]) / 2
    mats[:, 2, 2] = 1
    return mats


def decode_points(raw: Tensor, mats: Tensor, num_points: int, size: int = INPUT_SIZE) -> Tensor:
    """(N,D) network outputs and their (N,3,3) crop maps -> (N,K,2) image points, or (N,K,3)
    when D >= 3000 (upstream reads such an output as x, y, z rows): the last K rows, x and y
    (+1) * (size // 2), z * (size // 2), mapped back through the inverse crop map (z scaled by
    its scale, as face_align.trans_points3d). float32."""
    dim = 3 if raw.shape[1] >= 3000 else 2
    if raw.shape[1] % dim or raw.shape[1] // dim < num_points:
        raise ValueError(f"{raw.shape[1]} outputs are not {dim}-D rows for {num_points} points")
    pred = raw.reshape(len(raw), -1, dim)[:, -num_points:].to(torch.float64)
    half = size // 2
    inverse = invert(mats.to(pred.device, torch.float64))
    out = transform_points((pred[..., :2] + 1) * half, inverse)
    if dim == 3:
        scale = inverse[:, 0, :2].norm(dim=1)
        out = torch.cat([out, (pred[..., 2:] * half) * scale[:, None, None]], -1)
    return out.float()


# --- conversion from the insightface ONNX graph --------------------------------------------------

def insightface_blob_norm(graph: OnnxModel) -> tuple[float, float]:
    """(mean, std) that insightface's Landmark applies before the graph, read as it reads them:
    a node named Sub*/_minus* and one named Mul*/_mul* among the first 8 (or bn_data among the
    first 3) mean the graph normalises itself: (0, 1); otherwise (127.5, 128)."""
    sub = mul = False
    for i, node in enumerate(graph.nodes[:8]):
        sub |= node.name.startswith(("Sub", "_minus"))
        mul |= node.name.startswith(("Mul", "_mul"))
        if i < 3 and node.name == "bn_data":
            sub = mul = True
    return (0.0, 1.0) if sub and mul else (127.5, 128.0)


class _Walk:
    """A GraphWalker plus the set of graph nodes it has followed, so that conversion can prove
    the graph holds no operation the module does not compute."""

    def __init__(self, graph: OnnxModel, model: CoordRegMobileNet):
        self.graph, self.walker, self.seen = graph, GraphWalker(graph, model), set()

    def through(self, value: str) -> str:
        """`value` past the Dropout / Identity nodes that read it."""
        while (skip := self.graph.consumer(value, PASS_THROUGH)) is not None:
            self.seen.add(id(skip))
            value = skip.outputs[0]
        return value

    def next(self, value: str, op_type: str, key: str) -> Node:
        """The one `op_type` node reading `value` (past Dropout / Identity)."""
        node = self.walker.op(self.through(value), op_type, key)
        self.seen.add(id(node))
        return node

    def scalar(self, node: Node, key: str) -> np.ndarray | None:
        """The constant operand of a Sub / Mul node on the input (None: not a constant)."""
        name = node.inputs[1]
        if name not in self.graph.initializers or self.graph.initializers[name].size != 1:
            return None
        return self.walker.tracker.take(name, key).reshape(()).astype(np.float32)


def _input_ops(walk: _Walk, value: str) -> str:
    """The graph's input normalisation (mxnet `_minusscalar0`, `_mulscalar0`): Sub then Mul by
    scalar constants -> input_shift / input_scale; a graph without them leaves 0 and 1."""
    state = walk.walker.state
    for op_type, key, neutral in (("Sub", "input_shift", 0.0), ("Mul", "input_scale", 1.0)):
        node = walk.graph.consumer(value, (op_type,))
        const = None if node is None or node.inputs[0] != value else walk.scalar(node, key)
        if const is None:
            state[key] = np.array(neutral, np.float32)
            continue
        walk.seen.add(id(node))
        state[key], value = const, node.outputs[0]
    return value


def _conv_unit(walk: _Walk, value: str, key: str, unit: ConvBNPReLU) -> str:
    """Conv (no bias) -> BatchNormalization -> PRelu, mapped onto unit's conv / bn / act."""
    out = walk.walker.conv(walk.through(value), f"{key}.conv")
    walk.seen.add(id(walk.walker.nodes[f"{key}.conv"]))
    bn = walk.next(out, "BatchNormalization", key)
    eps = bn.attrs.get("epsilon", 1e-5)
    if not math.isclose(eps, unit.bn.eps, rel_tol=1e-6) or bn.attrs.get("spatial", 1) != 1:
        raise OnnxError(f"{walk.graph.source}: {bn.name or bn.outputs[0]} (epsilon {eps:g}, spatial "
                        f"{bn.attrs.get('spatial', 1)}) is not the per-channel BatchNorm eps {unit.bn.eps} of {key}")
    take, state = walk.walker.tracker.take, walk.walker.state
    for name, field in zip(bn.inputs[1:5], ("weight", "bias", "running_mean", "running_var")):
        state[f"{key}.bn.{field}"] = take(name, f"{key}.bn.{field}")
    state[f"{key}.bn.num_batches_tracked"] = np.array(0, np.int64)  # a training counter, not in the graph
    act = walk.next(bn.outputs[0], "PRelu", key)
    slope = take(act.inputs[1], f"{key}.act.weight")
    channels = unit.act.num_parameters
    if slope.size != channels or slope.shape[-2:] != (1, 1) or (slope.ndim == 4 and slope.shape[0] != 1):
        raise OnnxError(f"{walk.graph.source}: PRelu {act.name or act.outputs[0]} slope {slope.shape} is "
                        f"not one value per channel of {key} ({channels}, 1, 1)")
    state[f"{key}.act.weight"] = slope.reshape(channels)
    return act.outputs[0]


def _fc(walk: _Walk, value: str) -> None:
    """[Flatten ->] Gemm (alpha = beta = 1) -> fc, whose output must be the graph's only output."""
    value = walk.through(value)
    flat = walk.graph.consumer(value, ("Flatten",))
    if flat is not None:
        if flat.attrs.get("axis", 1) != 1:
            raise OnnxError(f"{walk.graph.source}: Flatten {flat.outputs[0]} has axis {flat.attrs['axis']}, not 1")
        walk.seen.add(id(flat))
        value = flat.outputs[0]
    gemm = walk.next(value, "Gemm", "fc")
    a = gemm.attrs
    if (a.get("alpha", 1.0), a.get("beta", 1.0), a.get("transA", 0)) != (1.0, 1.0, 0) or len(gemm.inputs) < 3:
        raise OnnxError(f"{walk.graph.source}: Gemm {gemm.outputs[0]} {a} is not x @ W.T + b")
    weight = walk.walker.tracker.take(gemm.inputs[1], "fc.weight")
    walk.walker.state["fc.weight"] = weight if a.get("transB", 0) else weight.T
    walk.walker.state["fc.bias"] = walk.walker.tracker.take(gemm.inputs[2], "fc.bias").reshape(-1)
    outputs = [o.name for o in walk.graph.outputs]
    if outputs != [gemm.outputs[0]]:
        raise OnnxError(f"{walk.graph.source}: the graph's outputs {outputs} are not fc's {gemm.outputs[0]!r}")


def map_onnx(path: str | Path, model: CoordRegMobileNet) -> GraphWalker:
    """Follow a 2d106det-layout graph from its input to its output onto `model`: every
    initializer taken (or the walk fails naming what is left), every node followed; the walker
    holds the state dict, each conv's node and every initializer's use."""
    graph = read_onnx(path)
    if len(graph.inputs) != 1:
        raise OnnxError(f"{path}: {len(graph.inputs)} graph inputs, expected one image batch")
    walk = _Walk(graph, model)
    value = _input_ops(walk, graph.inputs[0].name)
    value = _conv_unit(walk, value, "stem", model.stem)
    for i, unit in enumerate(model.units):
        value = _conv_unit(walk, value, f"units.{i}.depthwise", unit.depthwise)
        value = _conv_unit(walk, value, f"units.{i}.pointwise", unit.pointwise)
    value = _conv_unit(walk, value, "head", model.head)
    _fc(walk, value)
    mean, std = insightface_blob_norm(graph)
    walk.walker.state.update(blob_mean=np.array(mean, np.float32), blob_std=np.array(std, np.float32))
    left = [f"{n.op_type} {n.name or n.outputs[0]}" for n in graph.nodes if id(n) not in walk.seen]
    if left:
        raise OnnxError(f"{path}: {len(left)} graph nodes are not part of this layout: {left[:6]}")
    return walk.walker.finish()


def coordreg_2d106det() -> CoordRegMobileNet:
    return CoordRegMobileNet(212, 106)


def convert_onnx(path: str | Path, num_outputs: int = 212, num_points: int = 106) -> dict:
    """An insightface coordinate-regression .onnx of the 2d106det layout (any output size) ->
    this module's state dict (every initializer and node accounted for, keys and shapes checked)."""
    def build() -> CoordRegMobileNet:
        return CoordRegMobileNet(num_outputs, num_points)
    build.__name__ = f"CoordRegMobileNet({num_outputs}, {num_points})"
    return onnx_converter("graph", build, map_onnx)({"graph": path})


# Upstream: a member of insightface's buffalo_l.zip (github.com/deepinsight/insightface releases
# v0.7; UpstreamFile takes no archive member, so the URL is a HuggingFace copy of that member,
# used by public projects; its bytes were not fetched from this machine). sha256 and size: the
# official values, pinned by public projects as well.
register(WeightSpec(
    name="insightface_2d106det", task="landmarks",
    files=(UpstreamFile("2d106det.onnx", "f001b856447c413801ef5c42091ed0cd516fcd21f2d6b79635b1e733a7109dbf",
                        5_030_888, urls=("https://huggingface.co/public-data/insightface/resolve/main/"
                                         "models/buffalo_l/2d106det.onnx",)),),
    license="insightface pretrained models: non-commercial research use only",
    origin="deepinsight/insightface (buffalo_l.zip member 2d106det.onnx)",
    converter=onnx_converter("2d106det.onnx", coordreg_2d106det, map_onnx),
    meta=ModelMeta(input_size=(INPUT_SIZE, INPUT_SIZE), colour="RGB", mean=(0.0,) * 3, std=(1.0,) * 3,
                   num_landmarks=106, landmark_markup=MARKUP_106, num_params=1_241_492),
    description="insightface 2d106det: 106 points from a face box (MobileNet-0.5 coordinate regression, "
                "192x192 crop); converter checked on a stand-in only"),
    CoordRegMobileNet)
