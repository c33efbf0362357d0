"""Read a TensorFlow 1 frozen GraphDef (.pb) without TensorFlow: a minimal protobuf wire reader.

Only the fields a frozen inference graph needs are decoded (field numbers from tensorflow's
graph.proto, node_def.proto, attr_value.proto, tensor.proto, tensor_shape.proto, types.proto):
  GraphDef.node (1) -> NodeDef.name (1), .op (2), .input (3), .attr (5: map entries key 1, value 2)
  AttrValue.tensor (8) -> TensorProto.dtype (1), .tensor_shape (2: dim (2) -> size (1)),
  .tensor_content (4, raw little-endian), typed repeated values (float_val 5, double_val 6,
  int_val 7, int64_val 10, bool_val 11, half_val 13).
Everything else is skipped by wire type, so unknown or newer fields never break the reader.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# TensorFlow DataType enum -> numpy dtype (DT_BFLOAT16 has no numpy dtype and is refused).
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
           9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class GraphDefError(ValueError):
    """The bytes are not a GraphDef this reader understands; the message says where it failed."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise GraphDefError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GraphDefError("varint longer than 10 bytes")


def iter_fields(buf: memoryview):
    """Yield (field_number, wire_type, value) of one message; value is an int or a memoryview."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == _VARINT:
            val, pos = _varint(buf, pos)
        elif wire == _LEN:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise GraphDefError(f"field {num}: length {n} runs past the end of its message")
            val, pos = buf[pos:pos + n], pos + n
        elif wire == _FIXED32:
            val, pos = buf[pos:pos + 4], pos + 4
        elif wire == _FIXED64:
            val, pos = buf[pos:pos + 8], pos + 8
        else:  # groups (3, 4) are proto2 relics that no GraphDef writer emits
            raise GraphDefError(f"field {num}: unsupported wire type {wire}")
        yield num, wire, val


def _packed_varints(wire: int, val) -> list[int]:
    if wire == _VARINT:
        return [val]
    out, pos = [], 0
    while pos < len(val):
        v, pos = _varint(val, pos)
        out.append(v)
    return out


def _signed(values: list[int], bits: int) -> list[int]:
    # Negative int32/int64 are written as 10-byte two's-complement varints.
    return [v - (1 << 64) if v >= 1 << (bits - 1) else v for v in values]


def parse_tensor(buf: memoryview) -> np.ndarray:
    """A TensorProto as a numpy array (a copy, so it outlives the file buffer)."""
    dtype, shape, content = 0, [], None
    values: list = []
    for num, wire, val in iter_fields(buf):
        if num == 1:
            dtype = val
        elif num == 2:
            for dnum, _, dim in iter_fields(val):
                if dnum == 2:  # TensorShapeProto.dim
                    size = 0
                    for snum, _, sval in iter_fields(dim):
                        if snum == 1:
                            size = sval
                    shape.append(size)
        elif num == 4:
            content = bytes(val)
        elif num == 5:  # float_val: packed (LEN) or one fixed32 per entry
            values += list(struct.unpack(f"<{len(val) // 4}f", val)) if wire == _LEN else \
                [struct.unpack("<f", val)[0]]
        elif num == 6:
            values += list(struct.unpack(f"<{len(val) // 8}d", val)) if wire == _LEN else \
                [struct.unpack("<d", val)[0]]
        elif num in (7, 13):  # int_val (int8/16/32, uint8) and half_val (float16 bit patterns)
            values += _signed(_packed_varints(wire, val), 32)
        elif num == 10:
            values += _signed(_packed_varints(wire, val), 64)
        elif num == 11:
            values += [bool(v) for v in _packed_varints(wire, val)]
    if dtype not in _DTYPES:
        raise GraphDefError(f"tensor dtype enum {dtype} is not supported")
    np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, dtype=np_dtype)
    elif dtype == 19:  # half_val holds raw uint16 bit patterns
        arr = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        arr = np.asarray(values, dtype=np_dtype)
    if arr.size != count:
        if arr.size == 0 or content is not None:
            if count == 0 and arr.size == 0:
                return np.zeros(shape, dtype=np_dtype)
            raise GraphDefError(f"tensor has {arr.size} values for shape {shape}")
        # TF's compact form: fewer values than elements means the last one fills the rest.
        arr = np.concatenate([arr, np.full(count - arr.size, arr[-1], dtype=np_dtype)])
    return arr.reshape(shape).astype(np_dtype.newbyteorder("="), copy=True)


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    tensor: np.ndarray | None = None  # the "value" attr of a Const node


def parse_graphdef(data: bytes) -> list[Node]:
    """All nodes of a GraphDef, in file order, with Const values decoded."""
    nodes = []
    for num, wire, node_buf in iter_fields(memoryview(data)):
        if num != 1 or wire != _LEN:
            continue  # versions, library: not needed for inference weights
        node = Node("", "")
        for nnum, nwire, val in iter_fields(node_buf):
            if nnum == 1:
                node.name = bytes(val).decode()
            elif nnum == 2:
                node.op = bytes(val).decode()
            elif nnum == 3:
                node.inputs.append(bytes(val).decode())
            elif nnum == 5 and nwire == _LEN:
                key, attr = "", None
                for anum, _, aval in iter_fields(val):
                    if anum == 1:
                        key = bytes(aval).decode()
                    elif anum == 2:
                        attr = aval
                if key == "value" and attr is not None:
                    for vnum, vwire, vval in iter_fields(attr):
                        if vnum == 8 and vwire == _LEN:
                            node.tensor = parse_tensor(vval)
        nodes.append(node)
    if not nodes:
        raise GraphDefError("no nodes found: not a GraphDef")
    return nodes


def read_constants(path: str | Path) -> dict[str, np.ndarray]:
    """{node name: value} for every Const node of a frozen GraphDef file."""
    data = Path(path).read_bytes()
    try:
        nodes = parse_graphdef(data)
    except GraphDefError as e:
        raise GraphDefError(f"{path}: {e}") from None
    return {n.name: n.tensor for n in nodes if n.op == "Const" and n.tensor is not None}
