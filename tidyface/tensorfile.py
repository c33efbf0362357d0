"""The weights store's cache format: a JSON header, then the raw bytes of every tensor.

Reading a `torch.save` file safely goes through torch's weights-only unpickler, which walks every
tensor in Python: 50-80 ms for a detector of 300 tensors, paid at every start of every command.
This format is read with one file read and a view per tensor (a few ms), and holds no code.

Layout: MAGIC, the header's length (8 bytes, little-endian), the header
`{key: [dtype, shape, offset, nbytes]}` (JSON), zero padding to a multiple of ALIGN, then the
tensors, each starting at a multiple of ALIGN (offsets count from the end of the padding); the
file ends where the last tensor does, so a cut file is always seen.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

MAGIC = b"TIDYFACE-TENSORS-1\n"
ALIGN = 64
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}
_ITEMSIZE = {name: d.itemsize for name, d in _DTYPES.items()}


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def save(state: dict, path) -> None:
    """Write a flat {name: tensor} dict (any device; stored as contiguous CPU bytes)."""
    header, blobs, offset, end = {}, [], 0, 0
    for key, value in state.items():
        dtype = str(getattr(value, "dtype", "")).removeprefix("torch.")
        if not isinstance(value, torch.Tensor) or dtype not in _DTYPES:
            raise TypeError(f"{key}: only tensors of {sorted(_DTYPES)} can be stored, "
                            f"not {type(value).__name__} {dtype}")
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = [dtype, list(value.shape), offset, len(raw)]
        blobs.append(raw)
        end = offset + len(raw)
        offset = _padded(end)
    head = json.dumps(header).encode()
    start = _padded(len(MAGIC) + 8 + len(head))
    with open(path, "wb") as f:
        f.write(MAGIC + len(head).to_bytes(8, "little") + head)
        for (_, _, at, _), raw in zip(header.values(), blobs):
            f.seek(start + at)
            f.write(raw)
        f.truncate(start + end)


def load(path) -> dict:
    """The dict `save` wrote. A file that is not one, or is cut short, raises ValueError."""
    with open(path, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        got = f.readinto(buf)
    if got != len(buf) or not buf.startswith(MAGIC) or len(buf) < len(MAGIC) + 8:
        raise ValueError(f"{Path(path).name}: not a tidyface tensor file")
    size = int.from_bytes(buf[len(MAGIC):len(MAGIC) + 8], "little")
    try:
        header = json.loads(bytes(buf[len(MAGIC) + 8:len(MAGIC) + 8 + size]))
    except ValueError as e:
        raise ValueError(f"{Path(path).name}: unreadable header ({e})") from None
    start = _padded(len(MAGIC) + 8 + size)
    if not isinstance(header, dict) or len(buf) != start + max(
            (e[2] + e[3] for e in header.values() if isinstance(e, list) and len(e) == 4), default=0):
        raise ValueError(f"{Path(path).name}: cut short or malformed")
    state = {}
    for key, (dtype, shape, at, nbytes) in header.items():
        kind = _DTYPES.get(dtype)
        if kind is None or start + at + nbytes > len(buf) or math.prod(shape) * _ITEMSIZE[dtype] != nbytes:
            raise ValueError(f"{Path(path).name}: {key} is cut short or malformed")
        if nbytes == 0:
            state[key] = torch.empty(shape, dtype=kind)
            continue
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start + at)
        state[key] = flat.view(kind).reshape(shape)
    return state
