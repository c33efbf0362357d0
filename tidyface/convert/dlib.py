"""Read dlib's `serialize` format without dlib: its integers, floats, matrices and vectors, and
the `shape_predictor` (.dat) built from them.

Facts from davisking/dlib (19.x, 20.0): `dlib/serialize.h` (pack_int / unpack_int, the
std::vector and float overloads), `dlib/float_details.h`, `dlib/matrix/matrix.h` (serialize of
matrix), `dlib/geometry/vector.h` (vector<T,2>), `dlib/image_processing/shape_predictor.h`:
- An integer is a control byte, then |value| in that many little-endian bytes. The control
  byte's low 4 bits are the byte count (1..8; 0 is refused, and so is a count wider than the C++
  type read); bit 0x80 marks a negative value (signed types only: an unsigned read refuses
  it); bits 0x70 are never written, so they are refused here too.
- A float (float or double) is float_details: the mantissa (int64) then the exponent (int16),
  each an integer as above; value = mantissa * 2**exponent, except exponent 32000 (+inf), 32001
  (-inf) and 32002..32767 (NaN). dlib's older ASCII float format, which a control byte with a
  0x70 bit would announce, is not read.
- A matrix is its rows then its columns (both negated by writers since dlib 18; positive in
  the older format, which readers still take), then the elements row by row.
- A std::vector is its size (unsigned long), then its elements; a vector<T,2> is x then y.
- shape_predictor: int version (1), matrix<float,0,1> initial_shape (x0 y0 x1 y1 ...),
  vector<vector<regression_tree>> forests (per cascade level; a tree is vector<split_feature>
  splits, each unsigned long idx1, idx2 and float thresh, then vector<matrix<float,0,1>>
  leaf_values), vector<vector<unsigned long>> anchor_idx, vector<vector<vector<float,2>>> deltas.

A shape_predictor file is nothing but integers (a float is two), so `decode_ints` splits the
whole file into its integers at once, vectorised, and `Ints` reads the structure from them;
`read_int` decodes one integer at a byte offset, for formats that mix in raw bytes (dlib's DNN
files write strings, and tensors as raw float32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SYNC_STEPS = 32  # integers walked from each candidate start while finding a segment's first integer
SEGMENT = 1 << 14  # bytes per segment of the vectorised split
CHUNK = 1 << 22  # integers (or bytes) per step where a whole-file pass would need whole-file temporaries
PAD = 16  # zero bytes after the data: room for the 8-byte reads of _values


class DlibFormatError(ValueError):
    """Bytes that are not the dlib serialisation a reader expects; the message names the source."""


def _control_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per control byte: its integer's total length in bytes (BAD_LENGTH when invalid), whether
    it is negative, and the mask keeping its value bytes of an 8-byte little-endian read."""
    codes = np.arange(256)
    size = codes & 0x0F
    valid = ((codes & 0x70) == 0) & (size >= 1) & (size <= 8)
    length = np.where(valid, 1 + size, BAD_LENGTH).astype(np.int64)
    masks = np.array([0] + [(1 << (8 * s)) - 1 for s in range(1, 9)] + [0] * 7, dtype=np.uint64)
    return length, (codes & 0x80) != 0, masks[size]


BAD_LENGTH = 1 << 40  # longer than any file: a walk that meets an invalid control byte stops
LENGTH, NEGATIVE, VALUE_MASK = _control_tables()
VALUE_MASK_32 = (VALUE_MASK & 0xFFFFFFFF).astype(np.uint32)  # sizes 1..4


def read_int(data, pos: int, source: str = "dlib data") -> tuple[int, int, int]:
    """One integer at byte offset `pos` -> (value, byte count, offset after it)."""
    if pos >= len(data):
        raise DlibFormatError(f"{source}: ends at byte {pos} where an integer was expected")
    ctrl = int(data[pos])
    size = ctrl & 0x0F
    if LENGTH[ctrl] == BAD_LENGTH:
        raise DlibFormatError(f"{source}: byte {pos} (0x{ctrl:02x}) is not a dlib integer's control byte")
    if pos + 1 + size > len(data):
        raise DlibFormatError(f"{source}: the integer at byte {pos} runs past the end ({len(data)} bytes)")
    value = int.from_bytes(bytes(data[pos + 1:pos + 1 + size]), "little")
    return (-value if ctrl & 0x80 else value), size, pos + 1 + size


def _sync_points(buf: np.ndarray, starts: np.ndarray, stop: int) -> np.ndarray:
    """The first integer's offset in each segment (a segment begins at `starts`): walked from
    each of the 9 offsets it can be at (an integer is at most 9 bytes), dropping walks that meet
    an invalid control byte or cross `stop`; where every surviving walk first meets the others,
    it is on the true chain (the true walk survives in a valid file). `stop` where no walk
    survives or they do not all meet within SYNC_STEPS."""
    dead = stop + 1
    pos = np.minimum(starts[:, None] + np.arange(9), dead)
    trail = np.empty((SYNC_STEPS, *pos.shape), np.int64)
    for k in range(SYNC_STEPS):
        trail[k] = pos
        nxt = pos + LENGTH[buf[np.minimum(pos, stop)]]
        pos = np.where(pos >= stop, pos, np.where(nxt > stop, dead, nxt))
    alive = pos <= stop
    seg = np.broadcast_to(np.arange(len(starts))[None, :, None], trail.shape)[:, alive]
    key = seg.astype(np.int64) * (1 << 40) + trail[:, alive]
    uniq, count = np.unique(key, return_counts=True)
    seg_of = uniq >> 40
    common = count == alive.sum(1)[seg_of]
    seg_of, first = np.unique(seg_of[common], return_index=True)  # keys sorted: the first is the least
    sync = np.full(len(starts), stop, np.int64)
    sync[seg_of] = uniq[common][first] & ((1 << 40) - 1)
    return sync


def _int_offsets(buf: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, int | None]:
    """Byte offsets of the consecutive integers from `start` to `stop`, and None, or the first
    offset where they stop being one run. One walk per segment from its sync point, all in step;
    a walk that passes its segment's end is on the next segment's chain (it only marks offsets
    again), and the run is whole when every walk met the next one's start exactly and the last
    met `stop` (an invalid control byte throws a walk past `stop`). A segment whose first
    integer is not known (bytes that read as integers from two offsets, such as a run of 0x01)
    gets no walk of its own: the walk before it goes on through it."""
    sync = _sync_points(buf, np.arange(start + SEGMENT, stop, SEGMENT), stop)
    sync = np.concatenate([[start], sync[sync < stop]])
    ends = np.append(sync[1:], stop)
    marks = np.zeros(stop + 2, bool)
    pos, met, hit, steps = sync.copy(), sync == ends, np.empty(len(sync), bool), 0
    while True:  # in place: the loop runs thousands of times over small arrays
        marks[pos] = True
        np.add(pos, LENGTH[buf[pos]], out=pos)
        np.minimum(pos, stop + 1, out=pos)
        met |= np.equal(pos, ends, out=hit)
        steps += 1
        if steps % 16 == 0 and (pos >= ends).all():
            break
    if not met.all():
        return np.zeros(0, np.int64), _walk_to_break(buf, int(sync[np.argmin(met)]), stop)
    return _marked(marks[:stop]), None


def _marked(marks: np.ndarray) -> np.ndarray:
    """np.flatnonzero(marks) as int32 where the offsets fit (half the memory of int64: a
    100 MB file holds 33 million integers), found chunk by chunk so that no int64 copy of them
    all is ever made."""
    out = np.empty(int(np.count_nonzero(marks)), np.int32 if len(marks) < 2 ** 31 else np.int64)
    filled = 0
    for begin in range(0, len(marks), CHUNK):
        found = np.flatnonzero(marks[begin:begin + CHUNK]) + begin
        out[filled:filled + len(found)] = found
        filled += len(found)
    return out


def _walk_to_break(buf: np.ndarray, pos: int, stop: int) -> int:
    """Walk one integer at a time from `pos` to where the run breaks (for the error message)."""
    while pos < stop and LENGTH[buf[pos]] != BAD_LENGTH and pos + LENGTH[buf[pos]] <= stop:
        pos += int(LENGTH[buf[pos]])
    return pos


def decode_ints(data, start: int = 0, stop: int | None = None, source: str = "dlib data") -> "Ints":
    """Every integer of the byte range [start, stop) (default: to the end), which they must fill
    exactly, decoded at once -> `Ints`, to be read in order."""
    raw = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    stop = len(raw) if stop is None else stop
    # bytes past `stop` are never decoded, only read over by _values' wide reads: data that has
    # PAD of them (read_padded) is used as it is, else copied with PAD zeros
    buf = raw if len(raw) >= stop + PAD else np.concatenate([raw[:stop], np.zeros(PAD, np.uint8)])
    offsets, broken = _int_offsets(buf, start, stop) if stop > start else (np.zeros(0, np.int64), None)
    if broken is not None:
        what = f"0x{buf[broken]:02x} is not a control byte" if LENGTH[buf[broken]] == BAD_LENGTH \
            else "an integer there runs past the end"
        raise DlibFormatError(f"{source}: bytes {start}..{stop} are not a run of dlib integers "
                              f"(at byte {broken}: {what})")
    ctrl = buf[offsets]
    return Ints(_values(buf, offsets, ctrl, source), ctrl, offsets, source)


def _values(buf: np.ndarray, offsets: np.ndarray, ctrl: np.ndarray, source: str) -> np.ndarray:
    """The integers at `offsets` (valid, `ctrl` their control bytes): the bytes after each
    control byte read little-endian at any offset, masked to its size, signed. int32 when none
    is wider than 3 bytes (a shape_predictor's widest), read 4 bytes at a time; else int64 from
    8-byte reads. In chunks, so the temporaries stay small."""
    widest = int((ctrl & 0x0F).max()) if len(ctrl) else 0
    wide = widest > 4
    after = np.ndarray((len(buf) - 9,), dtype="<u8" if wide else "<u4", buffer=buf, offset=1, strides=(1,))
    masks = VALUE_MASK if wide else VALUE_MASK_32
    out = np.empty(len(offsets), np.int64 if widest > 3 else np.int32)
    for begin in range(0, len(offsets), CHUNK):
        part = slice(begin, begin + CHUNK)
        value = np.bitwise_and(after[offsets[part]], masks[ctrl[part]])
        if wide and value.view(np.int64).min(initial=0) < 0:  # 2**63 or more: no C++ type dlib writes
            bad = begin + int(np.argmax(value.view(np.int64) < 0))
            raise DlibFormatError(f"{source}: the integer at byte {int(offsets[bad])} does not fit in 63 bits")
        out[part] = value.view(np.int64) if wide else value
        np.negative(out[part], out=out[part], where=NEGATIVE[ctrl[part]])
    return out


def floats_from_details(mantissa: np.ndarray, exponent: np.ndarray, dtype=np.float32) -> np.ndarray:
    """float_details (mantissa * 2**exponent, special exponents for inf and NaN) -> floats of
    `dtype`, converted as dlib's convert_to_T does: the mantissa cast first, then scaled."""
    special = exponent >= 32000
    out = np.ldexp(mantissa.astype(dtype), np.where(special, 0, exponent).astype(np.int32))
    if special.any():
        out[special] = np.where(exponent[special] == 32000, np.inf,
                                np.where(exponent[special] == 32001, -np.inf, np.nan))
    return out.astype(dtype, copy=False)


class Ints:
    """The integers of a dlib stream (`decode_ints`), read in order as the C++ types they
    encode; every read checks what dlib's deserialize checks, and errors name the source and the
    byte offset."""

    def __init__(self, values: np.ndarray, controls: np.ndarray, offsets: np.ndarray, source: str):
        self.values, self.controls, self.offsets, self.source = values, controls, offsets, source
        self.pos = 0

    def __len__(self) -> int:
        return len(self.values)

    def fail(self, what: str, at: int | None = None) -> DlibFormatError:
        at = self.pos if at is None else at
        where = f"byte {int(self.offsets[at])}" if at < len(self) else "the end"
        return DlibFormatError(f"{self.source}: {what} (at {where})")

    def _check(self, start: int, stop: int, step: int, signed: bool, bits: int) -> None:
        """Integers start, start+step, ... < stop are of a C++ type `bits` wide (signed or not)."""
        ctrl = self.controls[start:stop:step]
        bad = (ctrl & 0x0F) > bits // 8
        if not signed:
            bad |= (ctrl & 0x80) != 0
        if bad.any():
            kind = "signed" if signed else "unsigned"
            raise self.fail(f"not a {bits}-bit {kind} integer", start + step * int(np.argmax(bad)))

    def take(self, n: int, signed: bool = True, bits: int = 64) -> np.ndarray:
        """The next n integers, all of one C++ type."""
        if n < 0 or self.pos + n > len(self):
            raise self.fail(f"{n} more integers expected, {len(self) - self.pos} left")
        self._check(self.pos, self.pos + n, 1, signed, bits)
        self.pos += n
        return self.values[self.pos - n:self.pos]

    def int(self, bits: int = 64) -> int:
        return int(self.take(1, True, bits)[0])

    def uint(self, bits: int = 64) -> int:
        return int(self.take(1, False, bits)[0])

    def floats(self, n: int, dtype=np.float32) -> np.ndarray:
        """The next n floats: float_details pairs, mantissa (int64) then exponent (int16)."""
        start = self.pos
        pairs = self.take(2 * n)
        self._check(start + 1, start + 2 * n, 2, True, 16)
        return floats_from_details(pairs[0::2], pairs[1::2], dtype)

    def float(self) -> float:
        return float(self.floats(1)[0])

    def matrix_shape(self) -> tuple[int, int]:
        """A matrix's rows and columns: both negated in the newer format (either negative means
        that, as in dlib's deserialize), positive in the older."""
        rows, cols = self.int(), self.int()
        if rows < 0 or cols < 0:
            rows, cols = -rows, -cols
        if rows < 0 or cols < 0:
            raise self.fail(f"a matrix of {rows}x{cols}", self.pos - 2)
        return rows, cols

    def matrix(self, dtype=np.float32) -> np.ndarray:
        """A dlib::matrix of floats -> (rows, cols)."""
        rows, cols = self.matrix_shape()
        return self.floats(rows * cols, dtype).reshape(rows, cols)

    def vector(self, read_item) -> list:
        """A std::vector: its size, then `read_item(self)` for each element."""
        return [read_item(self) for _ in range(self.uint())]

    def block(self, count: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """The next count records of `stride` integers each (records known to share one layout)
        -> their values and control bytes, (count, stride) each, for the caller to check."""
        start = self.pos
        values = self.take(count * stride).reshape(count, stride)
        return values, self.controls[start:self.pos].reshape(count, stride)

    def expect_end(self) -> None:
        """Every integer was read: anything after the object is refused."""
        if self.pos != len(self):
            raise self.fail(f"{len(self) - self.pos} more integers after the end of the object")


SHAPE_PREDICTOR_VERSION = 1


def read_padded(path: str | Path) -> tuple[np.ndarray, int]:
    """A file's bytes followed by PAD zeros (so decode_ints need not copy them) and its size."""
    size = Path(path).stat().st_size
    padded = np.zeros(size + PAD, np.uint8)
    with open(path, "rb") as f:
        if f.readinto(memoryview(padded)[:size]) != size:
            raise DlibFormatError(f"{path}: changed size while being read")
    return padded, size


def read_shape_predictor(path: str | Path) -> dict[str, np.ndarray]:
    """A dlib shape_predictor .dat -> its arrays, every byte accounted for:
    initial_shape (K,2) float32; split_index (L,T,S,2) int64 (idx1, idx2 per split, trees
    stored breadth first: node i's children are 2i+1, 2i+2); split_threshold (L,T,S) float32;
    leaf_values (L,T,S+1,K,2) float32; anchor_index (L,F) int64; deltas (L,F,2) float32.
    L cascade levels of T trees of S splits each, F feature pixels per level. Files whose levels
    or trees differ in size are refused (dlib's own trainer never writes them)."""
    source = str(path)
    padded, size = read_padded(path)
    version, _, after = read_int(padded[:size], 0, source)
    if version != SHAPE_PREDICTOR_VERSION:
        raise DlibFormatError(f"{source}: shape_predictor version {version}, not "
                              f"{SHAPE_PREDICTOR_VERSION}: not a dlib shape_predictor file this reader knows")
    ints = decode_ints(padded, after, size, source)
    del padded  # the integers are decoded: the bytes are not needed again
    shape = ints.matrix()
    if shape.shape[1] != 1 or shape.shape[0] % 2:
        raise ints.fail(f"initial_shape is {shape.shape[0]}x{shape.shape[1]}, not a column of x, y pairs")
    points = len(shape) // 2
    forests = ints.vector(lambda r: _read_forest(r, points))
    anchors = ints.vector(lambda r: r.take(r.uint(), signed=False))
    deltas = ints.vector(lambda r: r.floats(2 * r.uint()).reshape(-1, 2))  # vector<float,2>: x, y
    ints.expect_end()
    out = {"initial_shape": shape.reshape(points, 2)}
    for key, parts in (("split_index", [f[0] for f in forests]), ("split_threshold", [f[1] for f in forests]),
                       ("leaf_values", [f[2] for f in forests]), ("anchor_index", anchors), ("deltas", deltas)):
        if len({p.shape for p in parts}) > 1:
            raise DlibFormatError(f"{source}: {key} differs in shape between cascade levels "
                                  f"({sorted({p.shape for p in parts})}); only equal levels are read")
        out[key] = np.stack(parts) if parts else np.zeros((0,))
        if out[key].dtype.kind == "i":  # decoded as int32 where they fit
            out[key] = out[key].astype(np.int64, copy=False)
    _check_shape_predictor(out, source)
    return out


def _read_forest(ints: Ints, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cascade level, a std::vector<regression_tree>, read at once on the layout of its
    first tree, which every tree must share -> split indices (T,S,2), thresholds (T,S), leaf
    values (T,S+1,points,2). A tree: splits (size, then idx1, idx2 and the threshold's two
    integers each), leaf_values (size, then per leaf its matrix's two sizes and 2 per value)."""
    trees, start = ints.uint(), ints.pos
    splits = ints.uint()
    ints.pos += 4 * splits
    leaves, rows_at = ints.uint(), ints.pos
    rows, cols = ints.matrix_shape() if leaves else (0, 0)
    if trees == 0 or leaves != splits + 1 or leaves & (leaves - 1) or (rows, cols) != (2 * points, 1):
        raise ints.fail(f"a cascade level of {trees} trees of {splits} splits and {leaves} leaves of "
                        f"{rows}x{cols} values: not complete trees over {points} points", start)
    header = ints.values[rows_at:rows_at + 2].copy()
    per_leaf = 2 + 2 * rows
    ints.pos = start
    values, ctrl = ints.block(trees, 2 + 4 * splits + leaves * per_leaf)
    split, split_ctrl = values[:, 1:1 + 4 * splits].reshape(trees, splits, 4), ctrl[:, 1:1 + 4 * splits]
    leaf = values[:, 2 + 4 * splits:].reshape(trees, leaves, per_leaf)
    leaf_ctrl = ctrl[:, 2 + 4 * splits:].reshape(trees, leaves, per_leaf)
    if (values[:, 0] != splits).any() or (values[:, 1 + 4 * splits] != leaves).any() \
            or (leaf[:, :, :2] != header).any():
        raise ints.fail(f"trees of a cascade level differ in size from its first ({splits} splits, "
                        f"{leaves} leaves of {rows} values); only equal trees are read", start)
    split_ctrl = split_ctrl.reshape(trees, splits, 4)
    if (split_ctrl[..., :2] & 0x80).any() or ((split_ctrl[..., 3] & 0x0F) > 2).any() \
            or ((leaf_ctrl[:, :, 3::2] & 0x0F) > 2).any():
        raise ints.fail("a negative split index or a float exponent wider than 16 bits in a cascade level", start)
    thresholds = floats_from_details(split[..., 2], split[..., 3])
    leaf_values = floats_from_details(leaf[:, :, 2::2], leaf[:, :, 3::2]).reshape(trees, leaves, points, 2)
    return split[..., :2].copy(), thresholds, leaf_values


def _check_shape_predictor(arrays: dict[str, np.ndarray], source: str) -> None:
    """The indices the cascade gathers with are in range (dlib's requires clauses)."""
    features = arrays["deltas"].shape[1] if arrays["deltas"].ndim == 3 else 0
    points = arrays["initial_shape"].shape[0]
    problems = []
    if arrays["split_index"].ndim != 4 or arrays["split_index"].shape[0] != arrays["deltas"].shape[0]:
        problems.append("the numbers of cascade levels of forests, anchor_idx and deltas differ")
    elif arrays["anchor_index"].shape != arrays["deltas"].shape[:2]:
        problems.append("anchor_idx and deltas differ in size")
    elif (arrays["split_index"] >= features).any():
        problems.append(f"a split reads a feature pixel >= {features}")
    elif (arrays["anchor_index"] >= points).any():
        problems.append(f"a feature pixel is anchored to a point >= {points}")
    if problems:
        raise DlibFormatError(f"{source}: {problems[0]}")
