"""Read an ONNX model (.onnx) without the onnx package: initializers, nodes, graph inputs/outputs.

Field numbers from onnx/onnx.proto3 (IR version 3..10); only what a converter needs is decoded:
  ModelProto ir_version (1), producer_name (2), graph (7), opset_import (8: domain 1, version 2)
  GraphProto node (1), initializer (5), input (11), output (12)
  NodeProto input (1), output (2), name (3), op_type (4), attribute (5), domain (7)
  AttributeProto name (1), f (2), i (3), s (4), t (5), floats (7), ints (8), strings (9),
    tensors (10), type (20)
  TensorProto dims (1), data_type (2), float_data (4), int32_data (5), int64_data (7),
    name (8), raw_data (9, little-endian), double_data (10), uint64_data (11), data_location (14)
  ValueInfoProto name (1), type (2: tensor_type 1 -> elem_type 1, shape 2 -> dim 1 ->
    dim_value 1 | dim_param 2)
Any other field (doc strings, metadata, value_info, subgraphs) is skipped by its wire type.

    model = read_onnx("det_500m.onnx")
    model.initializers["546"]            # np.ndarray (16, 3, 3, 3)
    [n.op_type for n in model.nodes]      # file order (ONNX requires topological order)
    inits = model.tracker()              # converters: take() or skip() each one, then finish()
    walk = GraphWalker(model, module)    # or follow the graph onto a torch module's layers
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .protobuf import LEN, ProtobufError, fixed, iter_fields, signed64, text, varints

# TensorProto.DataType -> numpy. STRING (8), COMPLEX (14, 15) and the float8 types are not
# weights of any model here: refused by name.
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
          7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
          16: np.float32}
BFLOAT16 = 16
# Where a tensor without raw_data keeps its values (onnx.proto's comments on each field): the
# 16- and 8-bit types and bool sit in int32_data, float16/bfloat16 as their bit patterns.
INT32_DATA_TYPES = {2, 3, 4, 5, 6, 9, 10, 16}
UINT64_DATA_TYPES = {12, 13}
# AttributeProto.AttributeType
A_FLOAT, A_INT, A_STRING, A_TENSOR, A_FLOATS, A_INTS, A_STRINGS, A_TENSORS = 1, 2, 3, 4, 6, 7, 8, 9


class OnnxError(ProtobufError):
    """Bytes this reader cannot take as an ONNX model; the message says what was wrong."""


def _bfloat16(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32: shift the bit pattern back into place.
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _typed_values(dtype: int, fields: dict[int, list]) -> np.ndarray:
    """The values of a tensor stored in its typed repeated fields (no raw_data)."""
    if dtype == 1:
        return np.asarray(fields.get(4, []), np.float32)
    if dtype == 11:
        return np.asarray(fields.get(10, []), np.float64)
    if dtype == 7:
        return np.asarray(fields.get(7, []), np.int64)
    if dtype in UINT64_DATA_TYPES:
        return np.asarray(fields.get(11, []), np.uint64).astype(DTYPES[dtype])
    ints = np.asarray(fields.get(5, []), np.int64)
    if dtype == 10:
        return ints.astype(np.uint16).view(np.float16)
    if dtype == BFLOAT16:
        return _bfloat16(ints.astype(np.uint16))
    return ints.astype(DTYPES[dtype])


def parse_tensor(buf: memoryview) -> tuple[str, np.ndarray]:
    """A TensorProto -> (name, array of its own: it does not keep the file buffer alive)."""
    name, dtype, dims, raw, external = "", 0, [], None, False
    typed: dict[int, list] = {}
    for num, wire, val in iter_fields(buf):
        if num == 1:
            dims += [signed64(v) for v in varints(wire, val)]
        elif num == 2:
            dtype = val
        elif num == 8:
            name = text(val)
        elif num == 9:
            raw = val
        elif num == 14:
            external = val == 1
        elif num == 4:
            typed.setdefault(4, []).extend(fixed(val, "f"))
        elif num == 10:
            typed.setdefault(10, []).extend(fixed(val, "d"))
        elif num in (5, 7):
            typed.setdefault(num, []).extend(signed64(v) for v in varints(wire, val))
        elif num == 11:  # uint64_data: unsigned, no two's complement
            typed.setdefault(num, []).extend(varints(wire, val))
    if external:
        raise OnnxError(f"tensor {name!r} keeps its data in an external file, which is not supported")
    if dtype not in DTYPES:
        raise OnnxError(f"tensor {name!r}: data type {dtype} is not supported")
    count = int(np.prod(dims, dtype=np.int64))
    if raw is not None:
        store = np.uint16 if dtype == BFLOAT16 else DTYPES[dtype]
        arr = np.frombuffer(raw, dtype=np.dtype(store).newbyteorder("<")).astype(store)
        if dtype == BFLOAT16:
            arr = _bfloat16(arr)
    else:
        arr = _typed_values(dtype, typed)
    if arr.size != count:
        raise OnnxError(f"tensor {name!r} has {arr.size} values for dims {dims}")
    return name, arr.reshape(dims)


def parse_attribute(buf: memoryview) -> tuple[str, Any]:
    """An AttributeProto -> (name, value): float, int, str, ndarray, or a list of one of these.
    Graph and sparse-tensor attributes (no converter needs them) give None."""
    name, kind, single = "", 0, {}
    lists: dict[int, list] = {7: [], 8: [], 9: [], 10: []}
    for num, wire, val in iter_fields(buf):
        if num == 1:
            name = text(val)
        elif num == 20:
            kind = val
        elif num == 2:
            single[2] = fixed(val, "f")[0]
        elif num == 3:
            single[3] = signed64(val)
        elif num == 4:
            single[4] = text(val)
        elif num == 5:
            single[5] = parse_tensor(val)[1]
        elif num == 7:
            lists[7] += fixed(val, "f")  # packed (LEN) or one FIXED32 entry
        elif num == 8:
            lists[8] += [signed64(v) for v in varints(wire, val)]
        elif num == 9:
            lists[9].append(text(val))
        elif num == 10:
            lists[10].append(parse_tensor(val)[1])
    by_kind = {A_FLOAT: single.get(2, 0.0), A_INT: single.get(3, 0), A_STRING: single.get(4, ""),
               A_TENSOR: single.get(5), A_FLOATS: lists[7], A_INTS: lists[8],
               A_STRINGS: lists[9], A_TENSORS: lists[10]}
    if kind in by_kind:
        return name, by_kind[kind]
    # IR < 3 writers may omit `type`: the one field that is set says it
    for num in (2, 3, 4, 5):
        if num in single:
            return name, single[num]
    return name, next((v for v in lists.values() if v), None)


@dataclass
class Node:
    op_type: str = ""
    name: str = ""
    inputs: list[str] = field(default_factory=list)  # "" marks an omitted optional input
    outputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""


@dataclass
class ValueInfo:
    """A graph input or output: name, element type (DTYPES key) and dims (int, a symbolic name,
    or None where unknown)."""

    name: str
    elem_type: int = 0
    shape: list[int | str | None] = field(default_factory=list)


@dataclass
class OnnxModel:
    ir_version: int = 0
    producer: str = ""
    opset: dict[str, int] = field(default_factory=dict)  # domain ("" is ai.onnx) -> version
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    inputs: list[ValueInfo] = field(default_factory=list)  # the real inputs: initializers excluded
    outputs: list[ValueInfo] = field(default_factory=list)
    source: str = "<bytes>"

    def consumers(self, name: str) -> list[tuple[Node, int]]:
        """(node, input position) for every use of the value `name`, in node order."""
        return [(n, i) for n in self.nodes for i, x in enumerate(n.inputs) if x == name]

    def consumer(self, name: str, op_types: tuple[str, ...], where=None) -> Node | None:
        """The one node of op_types that reads `name` (and satisfies `where`), or None; an
        OnnxError if there are several (the graph is not the chain a walker expects)."""
        found = [n for n, _ in self.consumers(name) if n.op_type in op_types and (where is None or where(n))]
        if len(found) > 1:
            raise OnnxError(f"{self.source}: {len(found)} {'/'.join(op_types)} nodes read {name!r}, expected one")
        return found[0] if found else None

    def ops(self, op_type: str) -> list[Node]:
        return [n for n in self.nodes if n.op_type == op_type]

    def tracker(self) -> "InitializerTracker":
        return InitializerTracker(self)


class InitializerTracker:
    """Hands out a model's initializers to a converter and remembers what each became, so a
    converter proves it accounted for every one: `finish()` names the file and what was left.
    One initializer may serve several nodes (exporters share equal constants, e.g. two biases)."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.uses: dict[str, list[str]] = {}  # initializer -> what it became (keys, or why unused)

    def take(self, name: str, used_as: str) -> np.ndarray:
        if name not in self.model.initializers:
            raise OnnxError(f"{self.model.source}: no initializer {name!r} (wanted for {used_as})")
        self.uses.setdefault(name, []).append(used_as)
        return self.model.initializers[name]

    def skip(self, name: str, why: str) -> None:
        """Account for an initializer that is not a parameter (a shape, an index, a counter)."""
        self.take(name, f"not a parameter: {why}")

    def finish(self) -> dict[str, list[str]]:
        """{initializer: uses} once every initializer was accounted for; otherwise an OnnxError."""
        left = [k for k in self.model.initializers if k not in self.uses]
        if left:
            raise OnnxError(f"{self.model.source}: {len(left)} initializers were not converted "
                            f"(the file's layout is not the one this converter knows): {left[:8]}")
        return dict(self.uses)


def conv_state(tracker: InitializerTracker, node: Node, key: str, layer) -> dict[str, np.ndarray]:
    """{key.weight, key.bias} of a Conv / ConvTranspose node for the torch layer at `key`, once
    the node's kernel, stride, padding, dilation and groups are the layer's (else an OnnxError:
    a weight of the right shape in the wrong place must not load silently)."""
    a = node.attrs
    pads = a.get("pads", [0, 0, 0, 0])
    got = (tuple(a.get("kernel_shape", ())), tuple(a.get("strides", (1, 1))),
           tuple(pads[:2]) if pads[:2] == pads[2:] else tuple(pads), tuple(a.get("dilations", (1, 1))),
           a.get("group", 1))
    want = (tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation),
            layer.groups)
    if got != want:
        raise OnnxError(f"{tracker.model.source}: node {node.name or node.outputs[0]} (kernel, stride, "
                        f"padding, dilation, groups) {got} does not fit {key} {want}")
    out = {f"{key}.weight": tracker.take(node.inputs[1], f"{key}.weight")}
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2])
    if has_bias != (layer.bias is not None):
        raise OnnxError(f"{tracker.model.source}: node {node.name or node.outputs[0]} "
                        f"{'has' if has_bias else 'lacks'} a bias, {key} does not match")
    if has_bias:
        out[f"{key}.bias"] = tracker.take(node.inputs[2], f"{key}.bias")
    return out


def check_resizes(model: OnnxModel) -> None:
    """Every Resize is nearest-neighbour with asymmetric coordinates and floor rounding: what
    torch's F.interpolate(mode="nearest") computes, which the modules use."""
    for n in model.ops("Resize"):
        got = (n.attrs.get("mode"), n.attrs.get("coordinate_transformation_mode"), n.attrs.get("nearest_mode"))
        if got != ("nearest", "asymmetric", "floor"):
            raise OnnxError(f"{model.source}: Resize {n.outputs[0]} is {got}, not nearest/asymmetric/floor")


def skip_shape_constants(tracker: InitializerTracker, ops=("Reshape", "Gather", "Slice", "Resize",
                                                           "Unsqueeze", "Concat")) -> None:
    """Account for the initializers that only feed shape plumbing (target shapes, indices, Resize
    scales and rois): they are what a torch forward computes from its input's size."""
    for n in tracker.model.nodes:
        if n.op_type in ops:
            for name in dict.fromkeys(n.inputs[1:]):  # once per node, however often it repeats
                if name in tracker.model.initializers:
                    tracker.skip(name, f"input of {n.op_type} {n.outputs[0]}")


def _value_info(buf: memoryview) -> ValueInfo:
    info = ValueInfo("")
    for num, _, val in iter_fields(buf):
        if num == 1:
            info.name = text(val)
        elif num == 2:
            for tnum, _, tensor_type in iter_fields(val):
                if tnum == 1:
                    info.elem_type, info.shape = _tensor_type(tensor_type)
    return info


def _tensor_type(buf: memoryview) -> tuple[int, list]:
    elem, shape = 0, []
    for num, _, val in iter_fields(buf):
        if num == 1:
            elem = val
        elif num == 2:
            for dnum, _, dim in iter_fields(val):
                if dnum == 1:
                    d = None
                    for knum, _, kval in iter_fields(dim):
                        d = signed64(kval) if knum == 1 else text(kval) if knum == 2 else d
                    shape.append(d)
    return elem, shape


def _node(buf: memoryview) -> Node:
    node = Node()
    for num, _, val in iter_fields(buf):
        if num == 1:
            node.inputs.append(text(val))
        elif num == 2:
            node.outputs.append(text(val))
        elif num == 3:
            node.name = text(val)
        elif num == 4:
            node.op_type = text(val)
        elif num == 5:
            key, value = parse_attribute(val)
            node.attrs[key] = value
        elif num == 7:
            node.domain = text(val)
    return node


def _graph(buf: memoryview, model: OnnxModel) -> None:
    inputs = []
    for num, wire, val in iter_fields(buf):
        if wire != LEN:
            continue
        if num == 1:
            model.nodes.append(_node(val))
        elif num == 5:
            name, arr = parse_tensor(val)
            if name in model.initializers:
                raise OnnxError(f"initializer {name!r} appears twice")
            model.initializers[name] = arr
        elif num == 11:
            inputs.append(_value_info(val))
        elif num == 12:
            model.outputs.append(_value_info(val))
    # IR < 4 lists every initializer among the inputs too; only the others are fed by a caller.
    model.inputs = [i for i in inputs if i.name not in model.initializers]


def parse_model(data: bytes, source: str = "<bytes>") -> OnnxModel:
    """A serialised ModelProto -> OnnxModel."""
    model, graph = OnnxModel(source=source), None
    try:
        for num, wire, val in iter_fields(memoryview(data)):
            if num == 1 and wire == 0:
                model.ir_version = val
            elif num == 2 and wire == LEN:
                model.producer = text(val)
            elif num == 7 and wire == LEN:
                graph = val
            elif num == 8 and wire == LEN:
                opset = {n: v for n, _, v in iter_fields(val)}
                model.opset[text(opset.get(1, b""))] = opset.get(2, 0)
        if graph is None or not model.ir_version:
            raise OnnxError("no graph or IR version: not an ONNX model")
        _graph(graph, model)
    except OnnxError:
        raise
    except ProtobufError as e:  # a wire-format fault: reported as this reader's error
        raise OnnxError(str(e)) from None
    if not model.nodes:
        raise OnnxError("the graph has no nodes: not an ONNX model")
    return model


def read_onnx(path: str | Path) -> OnnxModel:
    """The ONNX model in a file; errors name the file."""
    try:
        return parse_model(Path(path).read_bytes(), str(path))
    except OnnxError as e:
        raise OnnxError(f"{path}: {e}") from None


class GraphWalker:
    """Maps a graph's convolutions onto a torch module by following the data: `conv(value, key)`
    finds the one Conv reading `value` whose weight has the shape of the module's layer at `key`
    (and that `where` accepts), checks it against that layer (conv_state), takes its
    initializers and returns its output (after the ReLU that must follow it when relu=True);
    `named` maps a conv by its initializer's name. Layers are thus matched by their place in
    the graph or by name, never by the order of tensors in the file."""

    def __init__(self, model: OnnxModel, module, where=None):
        self.model, self.module, self.where = model, module, where
        self.tracker = model.tracker()
        self.state: dict[str, np.ndarray] = {}
        self.nodes: dict[str, Node] = {}  # tidyface layer key -> graph node

    def conv(self, value: str, key: str, relu: bool = False, kernel: int | None = None,
             op_type: str = "Conv") -> str:
        layer = self.module.get_submodule(key)
        shape = tuple(layer.weight.shape)

        def accept(n):  # several convs may read one value (a backbone map and its lateral)
            w = self.model.initializers.get(n.inputs[1])
            return ((self.where is None or self.where(n)) and w is not None and w.shape == shape and
                    (kernel is None or n.attrs.get("kernel_shape", [0])[0] == kernel))
        node = self.model.consumer(value, (op_type,), accept)
        if node is None:
            raise OnnxError(f"{self.model.source}: no {op_type} reads {value!r} (wanted for {key})")
        self.state.update(conv_state(self.tracker, node, key, layer))
        self.nodes[key] = node
        return self.relu(node.outputs[0], key) if relu else node.outputs[0]

    def relu(self, value: str, key: str) -> str:
        return self.op(value, "Relu", key).outputs[0]

    def op(self, value: str, op_type: str, key: str = "") -> Node:
        node = self.model.consumer(value, (op_type,))
        if node is None:
            raise OnnxError(f"{self.model.source}: expected a {op_type} after {value!r} ({key})")
        return node

    def named(self, prefix: str, key: str, node: Node | None = None) -> None:
        """The conv whose weight is the initializer `prefix.weight` -> the layer at `key`."""
        node = node or next((n for n in self.model.nodes if n.inputs[1:2] == [f"{prefix}.weight"]), None)
        if node is None:
            raise OnnxError(f"{self.model.source}: no node uses {prefix}.weight (wanted for {key})")
        self.state.update(conv_state(self.tracker, node, key, self.module.get_submodule(key)))
        self.nodes[key] = node

    def finish(self) -> "GraphWalker":
        """The walker, once every initializer is accounted for and every conv layer of the
        module has its graph node; otherwise an OnnxError naming the file and what is left."""
        from torch import nn

        self.tracker.finish()
        missing = [k for k, m in self.module.named_modules()
                   if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and k not in self.nodes]
        if missing:
            raise OnnxError(f"{self.model.source}: no graph node for {missing[:5]}")
        return self

    def state_dict(self) -> dict:
        """The mapped parameters as tensors, dtypes kept (BatchNorm step counters are int64)."""
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in self.state.items()}


def onnx_converter(filename: str, builder, map_onnx):
    """A WeightSpec converter for one ONNX file: the module built on the meta device, its
    layers matched to the graph by `map_onnx(path, module)` (a finished GraphWalker), and the
    mapped state dict checked against the builder's keys and shapes."""
    from . import check_complete

    def convert(paths) -> dict:
        import torch

        with torch.device("meta"):
            module = builder()
        path = paths[filename]
        return check_complete(map_onnx(path, module).state_dict(), builder, str(path))
    return convert
