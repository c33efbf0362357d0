"""Read a TensorFlow 1 frozen GraphDef (.pb) without TensorFlow: a minimal protobuf wire reader.

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
from typing import Any, Iterator

import numpy as np

# TensorFlow DataType enum -> numpy (bfloat16, strings and resources are not weights: refused).
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
          9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


class GraphDefError(ValueError):
    """Bytes this reader cannot take as a GraphDef; the message says what was wrong."""


def read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise GraphDefError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GraphDefError("varint longer than 10 bytes")


def iter_fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: an int for varints, else a memoryview."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == VARINT:
            val, pos = read_varint(buf, pos)
        else:
            if wire == LEN:
                n, pos = read_varint(buf, pos)
            elif wire in (FIXED32, FIXED64):
                n = 4 if wire == FIXED32 else 8
            else:  # 3/4 are proto2 groups, which no GraphDef writer emits
                raise GraphDefError(f"field {num}: unsupported wire type {wire}")
            if pos + n > end:
                raise GraphDefError(f"field {num}: {n} bytes run past the end of the message")
            val, pos = buf[pos:pos + n], pos + n
        yield num, wire, val


def _varints(wire: int, val) -> list[int]:
    """A repeated varint field, packed (one LEN blob) or not (one varint per entry)."""
    if wire == VARINT:
        return [val]
    out, pos = [], 0
    while pos < len(val):
        v, pos = read_varint(val, pos)
        out.append(v)
    return out


def _fixed(val, fmt: str) -> list:
    size = struct.calcsize(fmt)
    return list(struct.unpack(f"<{len(val) // size}{fmt}", val))


def _signed64(v: int) -> int:
    # Negative int32 and int64 values are written as 10-byte two's-complement varints.
    return v - (1 << 64) if v >= 1 << 63 else v


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
            values += _fixed(val, "f")
        elif num == 6:
            values += _fixed(val, "d")
        elif num in (7, 10, 13):  # int_val, int64_val, half_val (float16 bit patterns)
            values += [_signed64(v) for v in _varints(wire, val)]
        elif num == 11:
            values += [bool(v) for v in _varints(wire, val)]
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
                    items += [_signed64(v) for v in _varints(lwire, lval)]
                elif lnum == 4:
                    items += _fixed(lval, "f")
            return items
        if num == 2:
            return bytes(val).decode(errors="replace")
        if num == 3:
            return _signed64(val)
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
