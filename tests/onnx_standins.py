"""Stand-ins for upstream ONNX files that ../shared does not carry, written with the onnx helper
package in their upstream layout (random weights).

scrfd_10g_onnx: insightface det_10g.onnx as the scrfd_10g_bnkps config and the det_2.5g.onnx
graph imply it: BatchNorm folded into renamed ("numeric") backbone and tower convs, neck and head
convs under their mmdet names (neck.lateral_convs.N.conv, bbox_head.stride_cls.(8, 8), ...),
bbox_head.scales.N.scale scalars, the exporter's Shape/Gather/Slice/Concat plumbing for the
nearest Resize, and the nine batch-folded outputs. The real file's numeric names are unknown
here (they do not matter to the converter, which follows the graph).
"""
from __future__ import annotations

import numpy as np


class _Graph:
    def __init__(self, seed: int = 0):
        self.nodes, self.inits, self.n = [], [], 1000
        self.rng = np.random.default_rng(seed)

    def name(self) -> str:
        self.n += 1
        return str(self.n)

    def init(self, arr: np.ndarray, name: str | None = None) -> str:
        from onnx import numpy_helper

        name = name or self.name()
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        out = self.name()
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1,
             relu: bool = True, name: str | None = None) -> str:
        w = self.init((self.rng.standard_normal((cout, cin // groups, k, k)) * (2 / (cin // groups * k * k)) ** 0.5)
                      .astype(np.float32), name and f"{name}.weight")
        b = self.init((self.rng.standard_normal(cout) * 0.1).astype(np.float32), name and f"{name}.bias")
        y = self.node("Conv", [x, w, b], dilations=[1, 1], group=groups, kernel_shape=[k, k],
                      pads=[k // 2] * 4, strides=[s, s])
        return self.node("Relu", [y]) if relu else y

    def upsample_to(self, x: str, like: str) -> str:
        """The exporter's nearest Resize to another map's size, with its shape plumbing."""
        i64 = np.int64
        shape_like, shape_x = self.node("Shape", [like]), self.node("Shape", [x])
        hw = [self.node("Unsqueeze", [self.node("Gather", [shape_like, self.init(np.array(d, i64))], axis=0)], axes=[0])
              for d in (2, 3)]
        nc = self.node("Slice", [shape_x, self.init(np.array([0], i64)), self.init(np.array([2], i64)),
                                 self.init(np.array([0], i64))])
        sizes = self.node("Concat", [nc, *hw], axis=0)
        empty = self.init(np.zeros(0, np.float32))
        return self.node("Resize", [x, empty, empty, sizes], coordinate_transformation_mode="asymmetric",
                         cubic_coeff_a=-0.75, mode="nearest", nearest_mode="floor")


def _resnet_body(g: _Graph, x: str, cfg: dict) -> list[str]:
    base = cfg["base"]
    x = g.conv(g.conv(g.conv(x, 3, base // 2, 3, 2), base // 2, base // 2), base // 2, base)
    x = g.node("MaxPool", [x], ceil_mode=0, kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2])
    cin, taps = base, []
    for i, (n, cout) in enumerate(zip(cfg["blocks"], cfg["planes"])):
        for b in range(n):
            s = (1 if i == 0 else 2) if b == 0 else 1
            y = g.conv(g.conv(x, cin, cout, 3, s), cout, cout, 3, relu=False)
            short = x
            if s != 1 or cin != cout:
                if s > 1:
                    short = g.node("AveragePool", [x], ceil_mode=1, kernel_shape=[2, 2], pads=[0, 0, 0, 0],
                                   strides=[2, 2])
                short = g.conv(short, cin, cout, 1, relu=False)
            x, cin = g.node("Relu", [g.node("Add", [y, short])]), cout
        taps.append(x)
    return taps[1:]


def _pafpn(g: _Graph, taps: list[str], chans, out: int) -> list[str]:
    lat = [g.conv(t, c, out, 1, relu=False, name=f"neck.lateral_convs.{i}.conv")
           for i, (t, c) in enumerate(zip(taps, chans))]
    for i in (2, 1):
        lat[i - 1] = g.node("Add", [lat[i - 1], g.upsample_to(lat[i], lat[i - 1])])
    inter = [g.conv(v, out, out, 3, relu=False, name=f"neck.fpn_convs.{i}.conv") for i, v in enumerate(lat)]
    for i in range(2):
        down = g.conv(inter[i], out, out, 3, 2, relu=False, name=f"neck.downsample_convs.{i}.conv")
        inter[i + 1] = g.node("Add", [inter[i + 1], down])
    return [inter[0]] + [g.conv(v, out, out, 3, relu=False, name=f"neck.pafpn_convs.{i}.conv")
                         for i, v in enumerate(inter[1:])]


def _heads(g: _Graph, feats: list[str], cfg: dict) -> list[list[str]]:
    outs = [[], [], []]
    for i, (f, s) in enumerate(zip(feats, (8, 16, 32))):
        t = f
        for k in range(cfg["stacked"]):
            t = g.conv(t, cfg["neck"] if k == 0 else cfg["feat"], cfg["feat"])
        for j, (kind, c) in enumerate((("cls", 1), ("reg", 4), ("kps", 10))):
            y = g.conv(t, cfg["feat"], 2 * c, relu=False, name=f"bbox_head.stride_{kind}.({s}, {s})")
            if kind == "reg":
                y = g.node("Mul", [y, g.init(np.array(1.0 + 0.1 * i, np.float32), f"bbox_head.scales.{i}.scale")])
            y = g.node("Reshape", [g.node("Transpose", [y], perm=[2, 3, 0, 1]), g.init(np.array([-1, c], np.int64))])
            outs[j].append(g.node("Sigmoid", [y]) if kind == "cls" else y)
    return outs


def scrfd_10g_onnx(path) -> None:
    """Write the det_10g.onnx stand-in (opset 11, IR 6, as the insightface files)."""
    import onnx
    from onnx import TensorProto, helper

    from tidyface.models.scrfd import VARIANTS

    cfg = VARIANTS["10g"]
    g = _Graph()
    taps = _resnet_body(g, "input.1", cfg)
    outs = _heads(g, _pafpn(g, taps, cfg["planes"][1:], cfg["neck"]), cfg)
    graph = helper.make_graph(
        g.nodes, "scrfd_10g_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["?", c])
         for kind, c in zip(outs, (1, 4, 10)) for o in kind],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
