"""Landmark files for `tidyface crop --landmarks`: read .json / .csv / .txt, match them to the
inputs, and reduce 5/68/98/106-point markups to the 5 alignment points.

Facts: iBUG 300-W 68-point markup (Sagonas et al., 300 Faces in-the-Wild, 2013); WFLW 98-point
markup (Wu et al., "Look at Boundary", CVPR 2018); insightface 2d106det markup
(deepinsight/insightface alignment/coordinate_reg README, image 2d106markup.jpg in
nttstar/insightface-resources), cross-checked with iperov/DeepFaceLive's reordering of 2d106det output.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..ops.markup import REDUCTIONS, SUPPORTED_COUNTS, reduce_to_five, reduction_matrix  # noqa: F401


class LandmarkFileError(InputError):
    """A malformed landmark file; the message starts with FILE:LINE."""


@dataclass
class LandmarkEntry:
    """One face of one image as given in the file (line: where it starts, 1-based)."""

    name: str
    points: np.ndarray  # (K, 2) float64, K in SUPPORTED_COUNTS
    line: int


@dataclass
class LandmarkTable:
    path: Path
    # image name as written in the file -> its faces, in file order
    entries: dict[str, list[LandmarkEntry]] = field(default_factory=dict)

    def add(self, entry: LandmarkEntry) -> None:
        self.entries.setdefault(entry.name, []).append(entry)

    def __len__(self) -> int:
        return len(self.entries)


def _fail(path: Path, line: int | None, msg: str):
    where = f"{path}:{line}" if line else str(path)
    raise LandmarkFileError(f"{where}: {msg}")


def _points(path: Path, line: int, values: Sequence[float]) -> np.ndarray:
    n = len(values)
    if n % 2 or n // 2 not in REDUCTIONS:
        _fail(path, line, f"expected 2*K coordinates x1 y1 x2 y2 ... with K in "
                          f"{'/'.join(map(str, SUPPORTED_COUNTS))} points, got {n} numbers")
    arr = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(arr).all():
        _fail(path, line, "coordinates must be finite numbers (found NaN or infinity)")
    return arr


def _number(path: Path, line: int, token: str, column: int) -> float:
    try:
        return float(token)
    except ValueError:
        _fail(path, line, f"field {column}: {token!r} is not a number")


def _read_txt(path: Path, text: str) -> LandmarkTable:
    """`image x1 y1 x2 y2 ...` per line, whitespace-separated; a name with spaces goes in double
    quotes; blank lines and lines starting with # are skipped."""
    table = LandmarkTable(path)
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith('"'):
            end = line.find('"', 1)
            if end < 0:
                _fail(path, no, "unterminated quoted image name")
            name, rest = line[1:end], line[end + 1:]
            if rest and not rest[0].isspace():
                _fail(path, no, "expected whitespace after the quoted image name")
        else:
            name, rest = (line.split(None, 1) + [""])[:2]
        tokens = rest.split()
        if not name:
            _fail(path, no, "empty image name")
        values = [_number(path, no, t, c) for c, t in enumerate(tokens, 2)]
        table.add(LandmarkEntry(name, _points(path, no, values), no))
    return table


def _read_csv(path: Path, text: str) -> LandmarkTable:
    """A header line, then `image,x1,y1,...` rows (standard CSV quoting; trailing empty fields
    ignored). Repeated image names are further faces of that image."""
    table = LandmarkTable(path)
    reader = csv.reader(text.splitlines())
    header_seen = False
    for row in reader:
        no = reader.line_num
        if not any(f.strip() for f in row):
            continue
        if not header_seen:
            header_seen = True
            numeric = [f for f in row[1:] if f.strip()]
            if numeric and all(re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", f)
                               for f in numeric):
                _fail(path, no, "the first line must be a header (e.g. image,x1,y1,...); "
                                "it holds coordinates, so a face would be lost")
            continue
        while row and not row[-1].strip():
            row = row[:-1]
        name = row[0].strip()
        if not name:
            _fail(path, no, "empty image name")
        values = [_number(path, no, f.strip(), c) for c, f in enumerate(row[1:], 2)]
        table.add(LandmarkEntry(name, _points(path, no, values), no))
    if not header_seen:
        _fail(path, None, "empty file (expected a header line, then image,x1,y1,... rows)")
    return table


def _key_lines(text: str) -> dict[str, int]:
    """Line of the first occurrence of each top-level-looking JSON key (for error messages)."""
    out: dict[str, int] = {}
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"\s*:', text):
        try:
            key = json.loads(f'"{m.group(1)}"')
        except json.JSONDecodeError:
            continue
        out.setdefault(key, text.count("\n", 0, m.start()) + 1)
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_face(path: Path, line: int, name: str, face) -> np.ndarray:
    if isinstance(face, list) and face and all(_is_number(v) for v in face):
        return _points(path, line, face)
    if (isinstance(face, list) and face and all(isinstance(p, list) and len(p) == 2
                                                and all(_is_number(v) for v in p) for p in face)):
        return _points(path, line, [v for p in face for v in p])
    _fail(path, line, f"{name!r}: a face must be a flat list [x1, y1, x2, y2, ...] "
                      "(or a list of [x, y] pairs)")


def _read_json(path: Path, text: str) -> LandmarkTable:
    """{"image": [x1, y1, ...]} for one face, or {"image": [[x1, y1, ...], [...]]} for several."""
    lines = _key_lines(text)

    def pairs_hook(pairs):
        seen = {}
        for k, _ in pairs:
            if k in seen:
                _fail(path, lines.get(k), f"image {k!r} is given twice (put several faces in one list)")
            seen[k] = True
        return dict(pairs)

    try:
        data = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as e:
        _fail(path, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})")
    if not isinstance(data, dict):
        _fail(path, 1, 'expected a JSON object {"image.jpg": [x1, y1, ...], ...}')
    table = LandmarkTable(path)
    for name, value in data.items():
        line = lines.get(name, 1)
        if not name:
            _fail(path, line, "empty image name")
        if not isinstance(value, list) or not value:
            _fail(path, line, f"{name!r}: expected a list of coordinates or a list of faces")
        if all(_is_number(v) for v in value):
            faces = [value]
        elif all(isinstance(p, list) and len(p) == 2 and all(_is_number(v) for v in p) for p in value) \
                and len(value) in REDUCTIONS:
            faces = [value]  # one face written as [x, y] pairs
        else:
            faces = value
        for face in faces:
            table.add(LandmarkEntry(name, _json_face(path, line, name, face), line))
    return table


def read_landmark_file(path: str | os.PathLike) -> LandmarkTable:
    """Parse a landmark file by its extension: .json, .csv, anything else as whitespace text."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except OSError as e:
        raise LandmarkFileError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise LandmarkFileError(f"{path}: not UTF-8 text ({e.reason})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path, text)
    if suffix == ".csv":
        return _read_csv(path, text)
    return _read_txt(path, text)


@dataclass
class LandmarkMatch:
    faces: dict[Path, list[LandmarkEntry]]  # input -> its faces (inputs without an entry absent)
    missing: list[Path]  # inputs the file says nothing about
    unused: list[str]  # names in the file that match no input


def match_inputs(table: LandmarkTable, inputs: Iterable[Path], root: Path) -> LandmarkMatch:
    """Pair the file's image names with input files.

    A name matches an input when it is (after turning backslashes into slashes and dropping a
    leading ./) the input's path relative to `root` (the folder the outputs mirror), a path
    relative to the landmark file's own folder, or an absolute path to it; a bare file name
    also matches an input of that name when exactly one input has it.
    """
    inputs = list(inputs)
    resolved = {p.resolve(): p for p in inputs}
    root = root.resolve()
    by_rel = {}
    by_name: dict[str, list[Path]] = {}
    for r, p in resolved.items():
        try:
            by_rel[r.relative_to(root).as_posix()] = p
        except ValueError:
            pass
        by_name.setdefault(p.name, []).append(p)
    base = table.path.resolve().parent

    faces: dict[Path, list[LandmarkEntry]] = {}
    first_line: dict[Path, tuple[str, int]] = {}
    unused: list[str] = []
    for name, entries in table.entries.items():
        key = name.replace("\\", "/")
        while key.startswith("./"):
            key = key[2:]
        hit = by_rel.get(key)
        if hit is None:
            cand = Path(key) if os.path.isabs(key) else base / key
            hit = resolved.get(cand.resolve())
        if hit is None and "/" not in key:
            same = by_name.get(key, [])
            if len(same) > 1:
                _fail(table.path, entries[0].line,
                      f"{name!r} matches {len(same)} inputs ({', '.join(map(str, same[:3]))}"
                      f"{', ...' if len(same) > 3 else ''}); write its path relative to {root}")
            hit = same[0] if same else None
        if hit is None:
            unused.append(name)
            continue
        if hit in faces:
            other, line = first_line[hit]
            _fail(table.path, entries[0].line,
                  f"{name!r} names the same image as {other!r} on line {line}")
        faces[hit] = list(entries)
        first_line[hit] = (name, entries[0].line)
    missing = [p for p in inputs if p not in faces]
    return LandmarkMatch(faces, missing, unused)


def format_points(points: np.ndarray) -> list[float]:
    """(K,2) -> the flat [x1, y1, ...] list the file formats use."""
    return [float(v) for v in np.asarray(points, dtype=np.float64).reshape(-1)]


def write_landmark_file(path: str | os.PathLike, faces: dict[str, Sequence[np.ndarray]]) -> None:
    """Write {image name: [(K,2) points per face]} in the format the extension names (the inverse
    of read_landmark_file; handy for exporting detections as a reusable landmark file)."""
    from ..ops.image import atomic_write_bytes

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = {name: ([format_points(f) for f in fs] if len(fs) != 1 else format_points(fs[0]))
                for name, fs in faces.items()}
        text = json.dumps(data, indent=1) + "\n"
    else:
        rows = [(name, format_points(f)) for name, fs in faces.items() for f in fs]
        if suffix == ".csv":
            k = max((len(v) // 2 for _, v in rows), default=5)
            header = ["image"] + [f"{a}{i}" for i in range(1, k + 1) for a in "xy"]
            import io

            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(header)
            for name, v in rows:
                w.writerow([name] + [repr(x) for x in v])
            text = buf.getvalue()
        else:
            text = "".join((f'"{name}"' if any(c.isspace() for c in name) else name)
                           + " " + " ".join(repr(x) for x in v) + "\n" for name, v in rows)
    atomic_write_bytes(path, text.encode("utf-8"))
