"""Read a TensorFlow 1 frozen GraphDef (.pb) without TensorFlow (wire format: convert/protobuf.py).

Field numbers from tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape,
types}.proto; only what a frozen inference graph needs is decoded:
  GraphDef.node (1) -> NodeDef name (1), op (2), input (3), attr (5: map entry key 1, value 2)
  AttrValue list (1: s 2, i 3, f 4), s (2), i (3), f (4), b (5), type (6), tensor (8)
  TensorProto dtype (1), tensor_shape (2: dim 2 -> size 1), tensor_content (4, little-endian),
  float_val (5), double_val (6), int_val (7), int64_val (10), bool_val (11), half_val (13).
Any other field is skipped by its wire type, so newer writers do not break the reader.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .protobuf import LEN, ProtobufError, fixed, iter_fields, signed64, varints

# TensorFlow DataType enum -> numpy (bfloat16, strings and resources are not weights: refused).
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
          9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}


class GraphDefError(ProtobufError):
    """Bytes this reader cannot take as a GraphDef; the message says what was wrong."""


def parse_tensor(buf: memoryview) -> np.ndarray:
    """A TensorProto as a numpy array of its own (it does not keep the file buffer alive)."""
    dtype, shape, content, values = 0, [], None, []
    for num, wire, val in iter_fields(buf):
        if num == 1:
            dtype = val
        elif num == 2:
            for dnum, _, dim in iter_fields(val):
                if dnum == 2:
                    shape.append(next((s for snum, _, s in iter_fields(dim) if snum == 1), 0))
        elif num == 4:
            content = val
        elif num == 5:
            values += fixed(val, "f")
        elif num == 6:
            values += fixed(val, "d")
        elif num in (7, 10, 13):  # int_val, int64_val, half_val (float16 bit patterns)
            values += [signed64(v) for v in varints(wire, val)]
        elif num == 11:
            values += [bool(v) for v in varints(wire, val)]
    if dtype not in DTYPES:
        raise GraphDefError(f"tensor dtype enum {dtype} is not supported")
    np_dtype = np.dtype(DTYPES[dtype])
    count = int(np.prod(shape, dtype=np.int64))
    if content is not None:
        arr = np.frombuffer(content, dtype=np_dtype.newbyteorder("<")).astype(np_dtype)
        if arr.size != count:
            raise GraphDefError(f"tensor_content has {arr.size} values for shape {shape}")
        return arr.reshape(shape)
    if dtype == 19:
        arr = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        arr = np.asarray(values, dtype=np_dtype)
    if 0 < arr.size < count:
        # TF's compact encoding: the last value given repeats to fill the tensor.
        arr = np.concatenate([arr, np.full(count - arr.size, arr[-1], dtype=arr.dtype)])
    if arr.size != count:
        raise GraphDefError(f"tensor has {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def parse_attr(buf: memoryview) -> Any:
    """An AttrValue: str, int, float, bool, dtype enum (int), ndarray, or list of str/int/float."""
    for num, wire, val in iter_fields(buf):
        if num == 1:
            items = []
            for lnum, lwire, lval in iter_fields(val):
                if lnum == 2:
                    items.append(bytes(lval).decode(errors="replace"))
                elif lnum == 3:
                    items += [signed64(v) for v in varints(lwire, lval)]
                elif lnum == 4:
                    items += fixed(lval, "f")
            return items
        if num == 2:
            return bytes(val).decode(errors="replace")
        if num == 3:
            return signed64(val)
        if num == 4:
            return struct.unpack("<f", val)[0]
        if num == 5:
            return bool(val)
        if num == 6:
            return val
        if num == 8:
            return parse_tensor(val)
    return None  # shape, func and placeholder attrs: not needed for weights


@dataclass
class Node:
    name: str = ""
    op: str = ""
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> np.ndarray | None:
        """The tensor of a Const node."""
        v = self.attrs.get("value")
        return v if isinstance(v, np.ndarray) else None


def parse_graphdef(data: bytes) -> list[Node]:
    """All nodes of a serialised GraphDef, in file order."""
    try:
        return _parse_nodes(data)
    except GraphDefError:
        raise
    except ProtobufError as e:  # a wire-format fault: reported as this reader's error
        raise GraphDefError(str(e)) from None


def _parse_nodes(data: bytes) -> list[Node]:
    nodes = []
    for num, wire, node_buf in iter_fields(memoryview(data)):
        if num != 1 or wire != LEN:
            continue  # versions and function library: nothing a frozen graph's weights need
        node = Node()
        for nnum, nwire, val in iter_fields(node_buf):
            if nnum == 1:
                node.name = bytes(val).decode()
            elif nnum == 2:
                node.op = bytes(val).decode()
            elif nnum == 3:
                node.inputs.append(bytes(val).decode())
            elif nnum == 5 and nwire == LEN:
                key, attr = "", None
                for anum, _, aval in iter_fields(val):
                    if anum == 1:
                        key = bytes(aval).decode()
                    elif anum == 2:
                        attr = aval
                node.attrs[key] = None if attr is None else parse_attr(attr)
        nodes.append(node)
    if not nodes or not all(n.name and n.op for n in nodes):
        raise GraphDefError("no named nodes: not a GraphDef")
    return nodes


def read_graph(path: str | Path) -> dict[str, Node]:
    """{node name: Node} of a frozen GraphDef file; errors name the file."""
    try:
        return {n.name: n for n in parse_graphdef(Path(path).read_bytes())}
    except GraphDefError as e:
        raise GraphDefError(f"{path}: {e}") from None


def read_constants(path: str | Path) -> dict[str, np.ndarray]:
    """{node name: value} of every Const node of a frozen GraphDef file."""
    return {name: n.value for name, n in read_graph(path).items()
            if n.op == "Const" and n.value is not None}
