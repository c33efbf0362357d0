"""A stand-in for insightface's 2d106det.onnx, which ../shared does not carry, written with the
onnx helper package in the layout public code gives it (random weights).

What is public (tidyface/models/landmarks.py names the sources): fmobilenet at multiplier 0.5
(conv_1, then conv_N_dw / conv_N for N = 2..14) and the head conv_15 + fc1 (576 -> 212); the
initializer names `<layer>_conv2d_weight`, `<layer>_batchnorm_gamma / _beta / _moving_mean /
_moving_var`, `<layer>_relu_gamma`, `fc1_weight`, `fc1_bias`; convolutions without bias,
BatchNorm eps 0.001, PReLU; the graph's first nodes `_minusscalar0`, `_mulscalar0` (x - 127.5,
times 0.0078125 in fmobilenet). Written as mxnet's ONNX exporter writes such ops: node names =
mxnet op names (`conv_1_conv2d`, `conv_1_batchnorm`, `conv_1_relu`, `fc1`), the scalars as
initializers `scalar_op1` / `scalar_op2` in float_data (as an ncnn conversion of an insightface
arcface graph shows them), input `data` (None, 3, 192, 192), output `fc1`. Not public, so chosen
here: the IR version and opset, the PRelu slopes' shape (C, 1, 1: the per-channel form
onnxruntime can run), the Flatten node before the Gemm (what mxnet's FullyConnected export adds)
and its name. A consistency check, not a proof: written so (IR 4, initializers not repeated
among the graph inputs), the stand-in is 5,030,852 bytes, 36 fewer than the real file's
5,030,888; listing them as inputs too (IR 3, as older exporters must) adds 7,561.
"""
from __future__ import annotations

import numpy as np

from tidyface.models.landmarks import HEAD_CHANNELS, UNITS

# (layer name, channels in, channels out, kernel, stride, groups), in graph order
LAYERS = [("conv_1", 3, UNITS[0][0], 3, 2, 1)]
for _n, (_cin, _cout, _s) in enumerate(UNITS, start=2):
    LAYERS += [(f"conv_{_n}_dw", _cin, _cin, 3, _s, _cin), (f"conv_{_n}", _cin, _cout, 1, 1, 1)]
LAYERS.append(("conv_15", UNITS[-1][1], HEAD_CHANNELS, 3, 2, 1))


class _Writer:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def init(self, name: str, arr: np.ndarray, raw: bool = True) -> str:
        from onnx import TensorProto, helper, numpy_helper

        arr = np.asarray(arr, np.float32)
        self.inits.append(numpy_helper.from_array(arr, name) if raw else
                          helper.make_tensor(name, TensorProto.FLOAT, arr.shape, arr.flatten().tolist()))
        return name

    def node(self, op: str, name: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_unit(self, x: str, layer: str, cin: int, cout: int, k: int, s: int, groups: int) -> str:
        r = self.rng
        fan_in = cin // groups * k * k
        w = self.init(f"{layer}_conv2d_weight", r.standard_normal((cout, cin // groups, k, k)) * (2 / fan_in) ** 0.5)
        y = self.node("Conv", f"{layer}_conv2d", [x, w], dilations=[1, 1], group=groups, kernel_shape=[k, k],
                      pads=[k // 2] * 4, strides=[s, s])
        stats = [self.init(f"{layer}_batchnorm_{p}", v) for p, v in (
            ("gamma", r.uniform(0.5, 1.5, cout)), ("beta", r.normal(0, 0.1, cout)),
            ("moving_mean", r.normal(0, 0.1, cout)), ("moving_var", r.uniform(0.5, 2.0, cout)))]
        y = self.node("BatchNormalization", f"{layer}_batchnorm", [y, *stats], epsilon=1e-3, momentum=0.9)
        slope = self.init(f"{layer}_relu_gamma", r.uniform(0.0, 0.5, (cout, 1, 1)))
        return self.node("PRelu", f"{layer}_relu", [y, slope])


def coordreg_onnx(path, num_outputs: int = 212, normalise_inside: bool = True, seed: int = 0,
                  initializers_as_inputs: bool = False) -> None:
    """Write the stand-in: 2d106det's layout with fc1 giving `num_outputs` values (212; 3309 to
    exercise the 3-D decoding), with or without the in-graph `_minusscalar0` / `_mulscalar0`;
    initializers_as_inputs: IR 3, every initializer also a graph input (else IR 4)."""
    import onnx
    from onnx import TensorProto, helper

    g = _Writer(seed)
    x = "data"
    if normalise_inside:
        x = g.node("Sub", "_minusscalar0", [x, g.init("scalar_op1", [127.5], raw=False)])
        x = g.node("Mul", "_mulscalar0", [x, g.init("scalar_op2", [0.0078125], raw=False)])
    for layer in LAYERS:
        x = g.conv_unit(x, *layer)
    flat = g.node("Flatten", "flatten0", [x], axis=1)
    features = HEAD_CHANNELS * 3 * 3
    # about -1..1 on crops, as coordinates in the crop are
    w = g.init("fc1_weight", g.rng.standard_normal((num_outputs, features)) * 0.15 / features ** 0.5)
    b = g.init("fc1_bias", g.rng.uniform(-0.5, 0.5, num_outputs))
    g.node("Gemm", "fc1", [flat, w, b], alpha=1.0, beta=1.0, transA=0, transB=1)
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, 192, 192])]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in g.inits]
    graph = helper.make_graph(g.nodes, "coordreg_standin", inputs,
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", num_outputs])],
                              initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)],
                              ir_version=3 if initializers_as_inputs else 4)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
