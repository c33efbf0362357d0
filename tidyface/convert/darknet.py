"""Read darknet models without darknet: the .cfg text (sections of key=value options) and the
.weights file, with every float of the .weights accounted for.

Facts from pjreddie/darknet `src/parser.c` (read_cfg, parse_convolutional, parse_route,
parse_shortcut, parse_upsample, parse_yolo, load_weights_upto, load_convolutional_weights) and
`src/utils.c` (strip):
- .cfg: a line is stripped of every whitespace character (inside it too); empty lines and lines
  starting with '#' or ';' are skipped; '[type]' opens a section; anything else is key=value
  (split at the first '='). The first section is [net] (or [network]); the layers that follow
  are numbered from 0, which is how [route] `layers` and [shortcut] `from` name them (negative:
  relative to the layer itself).
- [convolutional] defaults: filters=1, size=1, stride=1, pad=0, padding=0, groups=1,
  batch_normalize=0, activation=logistic; pad=1 means padding = size // 2.
- .weights: int32 major, minor, revision, then `seen`, an int64 when major*10+minor >= 2 (and
  major, minor < 1000), else an int32; then, for each convolutional layer in cfg order: its n
  biases; with batch_normalize also n scales, n rolling means, n rolling variances; then the
  n * (c / groups) * size * size weights (out, in, kh, kw order, as torch's Conv2d). Little-endian
  float32 throughout (the x86 machines darknet writes on).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CONV_DEFAULTS = {"filters": "1", "size": "1", "stride": "1", "pad": "0", "padding": "0",
                 "groups": "1", "batch_normalize": "0", "activation": "logistic"}
# Layer types whose output channels this reader can follow (none of them but convolutional
# has weights in the .weights file).
KNOWN = ("convolutional", "shortcut", "route", "upsample", "maxpool", "yolo")


class DarknetError(ValueError):
    """A .cfg or .weights this reader cannot take; the message names the file and what was wrong."""


@dataclass
class Section:
    """One [section] of a .cfg: its type, options (as written, whitespace removed), the line it
    starts on, and its layer number (-1 for [net])."""

    kind: str
    line: int
    index: int = -1
    options: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.options.get(key)
        if value is None:
            if default is None:
                raise DarknetError(f"[{self.kind}] at line {self.line} has no {key}")
            return default
        try:
            return int(value)
        except ValueError:
            raise DarknetError(f"[{self.kind}] at line {self.line}: {key}={value} is not an integer") from None

    def integers(self, key: str) -> list[int]:
        try:
            return [int(v) for v in self.get(key, "").split(",") if v]
        except ValueError:
            raise DarknetError(f"[{self.kind}] at line {self.line}: {key}={self.get(key)} "
                               "is not a list of integers") from None


@dataclass
class Conv:
    """A convolutional layer's shape, as the .weights file stores it."""

    section: Section
    in_channels: int
    filters: int
    size: int
    stride: int
    padding: int
    groups: int
    batch_normalize: bool
    activation: str

    @property
    def num_floats(self) -> int:
        per_channel = 4 if self.batch_normalize else 1
        return self.filters * per_channel + self.filters * (self.in_channels // self.groups) * self.size ** 2


def parse_cfg(path: str | Path) -> tuple[Section, list[Section]]:
    """A .cfg -> ([net] section, layer sections in order), as darknet's read_cfg reads it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DarknetError(f"{path}: cannot read the darknet .cfg ({e.__class__.__name__}: {e})") from None
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = "".join(raw.split())  # darknet's strip(): every whitespace character goes
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]"):
                raise DarknetError(f"{path}: line {number}: {raw.strip()!r} is not a [section] header")
            sections.append(Section(line[1:-1], number))
        elif "=" not in line or not sections:
            raise DarknetError(f"{path}: line {number}: {raw.strip()!r} is neither a [section] "
                               "nor key=value inside one")
        else:
            key, value = line.split("=", 1)
            sections[-1].options[key] = value
    if not sections or sections[0].kind not in ("net", "network"):
        raise DarknetError(f"{path}: a darknet .cfg starts with a [net] section")
    for i, s in enumerate(sections[1:]):
        s.index = i
    return sections[0], sections[1:]


def _route_sources(s: Section, source: str) -> list[int]:
    found = [i if i >= 0 else s.index + i for i in s.integers("layers")]
    if not found or any(not 0 <= i < s.index for i in found):
        raise DarknetError(f"{source}: [route] at line {s.line} (layer {s.index}) names layers "
                           f"{s.get('layers')}, not earlier layers")
    return found


def conv_layers(net: Section, layers: list[Section], source: str) -> list[Conv]:
    """The convolutional layers in cfg order with their input channels, found by following
    every layer's output channels (route concatenates, the others keep their input's)."""
    channels: list[int] = []
    convs: list[Conv] = []
    for s in layers:
        c_in = channels[-1] if channels else net.integer("channels", 3)
        if s.kind in ("convolutional", "conv"):
            opts = {**CONV_DEFAULTS, **s.options}
            size = int(opts["size"])
            conv = Conv(s, c_in, int(opts["filters"]), size, int(opts["stride"]),
                        size // 2 if int(opts["pad"]) else int(opts["padding"]), int(opts["groups"]),
                        bool(int(opts["batch_normalize"])), opts["activation"])
            if conv.groups < 1 or c_in % conv.groups:
                raise DarknetError(f"{source}: [convolutional] at line {s.line}: groups={conv.groups} "
                                   f"does not divide its {c_in} input channels")
            convs.append(conv)
            c_out = conv.filters
        elif s.kind == "route":
            c_out = sum(channels[i] for i in _route_sources(s, source))
        elif s.kind in KNOWN:
            c_out = c_in
        else:
            raise DarknetError(f"{source}: [{s.kind}] at line {s.line} is not a layer type this reader "
                               f"follows ({', '.join(KNOWN)})")
        channels.append(c_out)
    return convs


@dataclass
class DarknetWeights:
    """A .weights file read against its cfg: the header and, per convolutional layer in cfg
    order, its arrays under darknet's names (biases, scales, rolling_mean, rolling_variance,
    weights as (out, in/groups, k, k))."""

    version: tuple[int, int, int]
    seen: int
    layers: list[dict[str, np.ndarray]]


def _header(data: np.ndarray, source: str) -> tuple[tuple[int, int, int], int, int]:
    """(version, seen, header bytes) of a .weights file's bytes."""
    if data.size < 16:
        raise DarknetError(f"{source}: {data.size} bytes, too short for a darknet .weights header")
    major, minor, revision = (int(v) for v in data[:12].view("<i4"))
    if (major * 10 + minor) >= 2 and major < 1000 and minor < 1000:
        if data.size < 20:
            raise DarknetError(f"{source}: {data.size} bytes, too short for a version "
                               f"{major}.{minor} header (20 bytes)")
        return (major, minor, revision), int(data[12:20].view("<i8")[0]), 20
    return (major, minor, revision), int(data[12:16].view("<i4")[0]), 16


def read_weights(path: str | Path, convs: list[Conv]) -> DarknetWeights:
    """Split a .weights file into the arrays of `convs`; refused, naming the file, when it holds
    fewer floats than they need or any left over."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DarknetError(f"{path}: cannot read the darknet .weights ({e.__class__.__name__}: {e})") from None
    version, seen, start = _header(data, str(path))
    body = data.size - start
    need = sum(c.num_floats for c in convs)
    if body != 4 * need:
        what = (f"{body / 4 - need:+,.2f} floats left over after the last layer" if body > 4 * need
                else f"only {body / 4:,.2f} of them: truncated")
        raise DarknetError(f"{path}: its cfg's {len(convs)} convolutional layers need {need:,} floats "
                           f"({4 * need + start:,} bytes with the {start}-byte header), the file has "
                           f"{what}; it is not the .weights of this cfg")
    floats = data[start:].view("<f4")
    layers, pos = [], 0
    for c in convs:
        names = ["biases"] + (["scales", "rolling_mean", "rolling_variance"] if c.batch_normalize else [])
        arrays = {}
        for name in names:
            arrays[name] = floats[pos:pos + c.filters]
            pos += c.filters
        count = c.filters * (c.in_channels // c.groups) * c.size ** 2
        arrays["weights"] = floats[pos:pos + count].reshape(c.filters, c.in_channels // c.groups, c.size, c.size)
        pos += count
        layers.append(arrays)
    return DarknetWeights(version, seen, layers)
