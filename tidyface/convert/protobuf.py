"""The protobuf wire format, read in plain Python: what the TF GraphDef and ONNX readers share.

A message is a run of (key varint = field number << 3 | wire type, value) pairs; wire types 0
(varint), 1 (8 bytes), 2 (length-delimited: strings, bytes, sub-messages, packed repeats) and 5
(4 bytes). Groups (3, 4) are a proto2 relic that neither writer emits, and are refused.
Reference: https://protobuf.dev/programming-guides/encoding/
"""
from __future__ import annotations

import struct
from typing import Any, Iterator

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


class ProtobufError(ValueError):
    """Bytes that are not the protobuf message a reader expects; the message says what was wrong."""


def read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtobufError("varint longer than 10 bytes")


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
            else:
                raise ProtobufError(f"field {num}: unsupported wire type {wire}")
            if pos + n > end:
                raise ProtobufError(f"field {num}: {n} bytes run past the end of the message")
            val, pos = buf[pos:pos + n], pos + n
        yield num, wire, val


def varints(wire: int, val) -> list[int]:
    """A repeated varint field, packed (one LEN blob) or not (one varint per entry)."""
    if wire == VARINT:
        return [val]
    out, pos = [], 0
    while pos < len(val):
        v, pos = read_varint(val, pos)
        out.append(v)
    return out


def fixed(val, fmt: str) -> list:
    """Little-endian fixed-width values ("f", "d", "q", ...) of a packed field or a single entry."""
    size = struct.calcsize(fmt)
    return list(struct.unpack(f"<{len(val) // size}{fmt}", val))


def signed64(v: int) -> int:
    # Negative int32 and int64 values are written as 10-byte two's-complement varints.
    return v - (1 << 64) if v >= 1 << 63 else v


def text(val) -> str:
    return bytes(val).decode(errors="replace")
