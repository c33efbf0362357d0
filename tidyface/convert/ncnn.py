"""Read an ncnn model without ncnn: the .param text graph and the .bin weights, in plain Python
and numpy, with every byte of the .bin accounted for.

Facts from Tencent/ncnn (master a4d2ea1): docs/developer-guide/param-and-model-file-structure.md;
src/net.cpp `Net::load_param` (the text graph); src/paramdict.cpp `ParamDict::load_param` (the
k=v params); src/modelbin.cpp `ModelBinFromDataReader::load` (how a weight blob is stored);
src/layer/<type>.cpp `load_param` / `load_model` (which blobs each layer type reads, in order):
- .param: the magic 7767517, the layer and blob counts, then per layer: type, name, input
  count, output count, input blob names, output blob names, then `k=v` pairs until the next
  token that is not `<int>=`. k is 0..31; k <= -23300 is an old-style array of key -k-23300,
  written `n,v1,...,vn`; `k=v1,v2,...` is the newer array form. A value holding '.' or 'e' is a
  float, one starting with a letter or '"' a string, anything else an int. A blob is named by
  the layer that produces it; `Split` hands one blob on under several names.
- .bin: each layer's blobs in layer order, nothing else (no header, no names, no sizes), so a
  reader must know every layer type's blob list (`_BLOBS`). A blob is read one of two ways,
  fixed by the layer's code: `mb.load(n, 0)` ("tagged": a 4-byte little-endian flag word, then
  the data) or `mb.load(n, 1)` (n raw float32, no flag). Flags: 0 -> n float32; 0x01306B47 ->
  n float16; 0x000D4B38 -> n int8; 0x0002C056 -> n float32; any other non-zero flag -> a
  256-entry float32 table, then n uint8 indices into it. float16, int8 and index data are
  padded to a multiple of 4 bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

MAGIC = 7767517
MAX_PARAM_ID = 32  # NCNN_MAX_PARAM_COUNT
FLAG_FP16, FLAG_INT8, FLAG_FP32_SCALED = 0x01306B47, 0x000D4B38, 0x0002C056
TAGGED, RAW = 0, 1  # the `type` argument of ncnn's ModelBin::load

# Layer types that read nothing from the .bin (their src/layer/*.cpp has no load_model).
WEIGHTLESS = frozenset((
    "Input", "Split", "Concat", "Slice", "Eltwise", "BinaryOp", "UnaryOp", "Interp", "PixelShuffle",
    "ReLU", "Sigmoid", "TanH", "Clip", "ELU", "SELU", "GELU", "Mish", "Swish", "HardSigmoid",
    "HardSwish", "AbsVal", "Pooling", "Softmax", "Dropout", "Flatten", "Reshape", "Permute", "Crop",
    "Noop"))


class NcnnError(ValueError):
    """An .param or .bin this reader cannot take; the message names the file and what was wrong."""


@dataclass(eq=False)  # compared by identity: graph walks ask "is this the same layer?"
class NcnnLayer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, Any]
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def param(self, key: int, default=None):
        return self.params.get(key, default)


def _value(text: str) -> Any:
    if text[0].isalpha() or text[0] == '"':
        return text.strip('"')
    return float(text) if any(c in text for c in ".eE") else int(text)


_KEY = re.compile(r"^(-?\d+)=(.*)$")


def _parse_params(tokens: list[str]) -> dict[int, Any]:
    """The `k=v` tokens of one layer -> {param id: int, float, str or list}."""
    params: dict[int, Any] = {}
    for tok in tokens:
        key_text, value = _KEY.match(tok).groups()
        key = int(key_text)
        if key <= -23300:  # old-style array: "n,v1,...,vn"
            key = -key - 23300
            count, *items = value.split(",")
            if int(count) != len(items):
                raise ValueError(f"{tok}: says {count} values, has {len(items)}")
            params[key] = [_value(v) for v in items]
        elif "," in value:
            params[key] = [_value(v) for v in value.split(",") if v]
        else:
            params[key] = _value(value)
        if not 0 <= key < MAX_PARAM_ID:
            raise ValueError(f"{tok}: param id {key} is outside 0..{MAX_PARAM_ID - 1}")
    return params


def read_param(path: str | Path) -> list[NcnnLayer]:
    """The layers of a text .param file, in file order; errors name the file and the layer."""
    tokens = Path(path).read_text(encoding="utf-8", errors="replace").split()
    try:
        magic, n_layers, n_blobs = (int(t) for t in tokens[:3])
    except ValueError:
        raise NcnnError(f"{path}: does not start with the magic and the layer and blob counts") from None
    if magic != MAGIC:
        raise NcnnError(f"{path}: magic {magic}, not {MAGIC}: not an ncnn .param (or a binary one)")
    layers, pos, produced = [], 3, set()
    while pos < len(tokens):
        head = tokens[pos:pos + 4]
        try:
            kind, name, n_in, n_out = head[0], head[1], int(head[2]), int(head[3])
            ins, outs = tokens[pos + 4:pos + 4 + n_in], tokens[pos + 4 + n_in:pos + 4 + n_in + n_out]
            pos += 4 + n_in + n_out
            if len(ins) != n_in or len(outs) != n_out:
                raise ValueError("the file ends inside its blob names")
            end = pos
            while end < len(tokens) and _KEY.match(tokens[end]):
                end += 1
            params, pos = _parse_params(tokens[pos:end]), end
        except (ValueError, IndexError) as e:
            raise NcnnError(f"{path}: layer {len(layers)} ({' '.join(head[:2])}): {e}") from None
        missing = [b for b in ins if b not in produced]
        if missing:
            raise NcnnError(f"{path}: layer {name} reads blobs {missing} that no earlier layer makes")
        again = [b for b in outs if b in produced]
        if again or len(set(outs)) != len(outs):
            raise NcnnError(f"{path}: layer {name} makes blobs {again or outs} that already have a maker")
        produced.update(outs)
        layers.append(NcnnLayer(kind, name, ins, outs, params))
    if len(layers) != n_layers or len(produced) != n_blobs:
        raise NcnnError(f"{path}: header says {n_layers} layers and {n_blobs} blobs; "
                        f"the file has {len(layers)} and {len(produced)}")
    return layers


def _int8_scales(p: dict, per_output: int) -> list[tuple[str, int, int]]:
    """The int8 calibration blobs of a convolution or inner product (int8_scale_term, id 8)."""
    term = p.get(8, 0)
    if not term:
        return []
    blobs = [("weight_int8_scales", per_output, RAW), ("input_int8_scale", 1, RAW)]
    return blobs + ([("output_int8_scale", 1, RAW)] if term > 100 else [])


def _conv_blobs(p: dict, dynamic_key: int) -> list[tuple[str, int, int]]:
    # Convolution / Deconvolution (+DepthWise): 0 num_output, 5 bias_term, 6 weight_data_size
    if p.get(dynamic_key, 0):  # weights arrive as an input blob at run time
        return []
    return [("weight", p.get(6, 0), TAGGED)] + ([("bias", p.get(0, 0), RAW)] if p.get(5, 0) else [])


def _depthwise_int8(p: dict) -> list[tuple[str, int, int]]:
    # ConvolutionDepthWise: per-group weight scales for terms 1/101, one shared scale for 2/102
    term = p.get(8, 0)
    if term in (1, 101):
        return _int8_scales(p, p.get(7, 1))
    if term in (2, 102):
        return _int8_scales(p, 1)
    return []


# layer type -> params -> the blobs its load_model reads, in order: (name, count, TAGGED | RAW)
_BLOBS: dict[str, Callable[[dict], list[tuple[str, int, int]]]] = {
    "Convolution": lambda p: _conv_blobs(p, 19) + (_int8_scales(p, p.get(0, 0)) if not p.get(19, 0) else []),
    "ConvolutionDepthWise": lambda p: _conv_blobs(p, 19) + (_depthwise_int8(p) if not p.get(19, 0) else []),
    "Deconvolution": lambda p: _conv_blobs(p, 28),
    "DeconvolutionDepthWise": lambda p: _conv_blobs(p, 28),
    # InnerProduct: 0 num_output, 1 bias_term, 2 weight_data_size, 8 int8_scale_term
    "InnerProduct": lambda p: ([("weight", p.get(2, 0), TAGGED)]
                               + ([("bias", p.get(0, 0), RAW)] if p.get(1, 0) else [])
                               + _int8_scales(p, p.get(0, 0))),
    "PReLU": lambda p: [("slope", p.get(0, 0), RAW)],  # 0 num_slope
    "BatchNorm": lambda p: [(n, p.get(0, 0), RAW) for n in ("slope", "mean", "var", "bias")],
}


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _read_blob(data: memoryview, pos: int, count: int, kind: int) -> tuple[np.ndarray, int]:
    """One blob at byte `pos` -> (its values, the position after it); ValueError if it runs
    past the end. float16 comes back as float32 (exact, as ncnn's Mat::from_float16 does),
    int8 as int8 (a float model needs its scales), table-quantized data as float32."""
    def take(n: int) -> memoryview:
        if pos + n > len(data):
            raise ValueError(f"needs {n} bytes at offset {pos}, the file has {len(data) - pos}")
        return data[pos:pos + n]

    if kind == RAW:
        return np.frombuffer(take(4 * count), "<f4").astype(np.float32), pos + 4 * count
    flag = int.from_bytes(take(4), "little")
    pos += 4
    # float16, int8 and indices are read with their padding (ncnn reads the padded size)
    if flag == FLAG_FP16:
        out = np.frombuffer(take(_pad4(2 * count))[:2 * count], "<f2").astype(np.float32)
        return out, pos + _pad4(2 * count)
    if flag == FLAG_INT8:
        return np.frombuffer(take(_pad4(count))[:count], np.int8).copy(), pos + _pad4(count)
    if flag in (0, FLAG_FP32_SCALED):
        return np.frombuffer(take(4 * count), "<f4").astype(np.float32), pos + 4 * count
    table = np.frombuffer(take(4 * 256), "<f4").astype(np.float32)
    pos += 4 * 256
    index = np.frombuffer(take(_pad4(count))[:count], np.uint8)
    return table[index], pos + _pad4(count)


def read_bin(layers: list[NcnnLayer], path: str | Path) -> None:
    """Fill each layer's `weights` from a .bin, in layer order. A layer type whose blob list is
    not known, a blob that runs past the end, and bytes left after the last blob are errors
    naming the file: the .bin carries no sizes, so any of them means it was misread."""
    data = memoryview(Path(path).read_bytes())
    pos = 0
    for layer in layers:
        if layer.type in WEIGHTLESS:
            continue
        if layer.type not in _BLOBS:
            raise NcnnError(f"{path}: layer {layer.name} has type {layer.type}, whose weights this "
                            "reader does not know, so the bytes after it cannot be placed")
        for name, count, kind in _BLOBS[layer.type](layer.params):
            try:
                layer.weights[name], pos = _read_blob(data, pos, count, kind)
            except ValueError as e:
                raise NcnnError(f"{path}: blob {layer.name}.{name} ({count} values): {e}") from None
    if pos != len(data):
        raise NcnnError(f"{path}: {len(data) - pos} bytes left over after the last weight blob "
                        f"(at offset {pos} of {len(data)}): the .bin does not match its .param")


class NcnnNet:
    """A read model: its layers, a way to walk the graph backwards from a blob, and the tally of
    weight blobs a converter has taken, so that none is left unmapped (`check_all_taken`)."""

    def __init__(self, param_path: str | Path, bin_path: str | Path):
        self.param_path, self.bin_path = str(param_path), str(bin_path)
        self.layers = read_param(param_path)
        read_bin(self.layers, bin_path)
        self._maker = {blob: layer for layer in self.layers for blob in layer.outputs}
        self._taken: set[tuple[str, str]] = set()

    def source(self, blob: str) -> NcnnLayer:
        """The layer that computes `blob`, looking through Split (which only copies)."""
        layer = self._maker[blob]
        while layer.type == "Split":
            layer = self._maker[layer.inputs[0]]
        return layer

    def sources(self, layer: NcnnLayer) -> list[NcnnLayer]:
        return [self.source(b) for b in layer.inputs]

    def fail(self, layer: NcnnLayer, message: str) -> NcnnError:
        return NcnnError(f"{self.param_path}: layer {layer.name} ({layer.type}): {message}")

    def expect(self, layer: NcnnLayer, kind: str, what: str, n_inputs: int = 1, **params) -> NcnnLayer:
        """`layer` if it is a `kind` layer with n_inputs inputs and these params (p<id>=value,
        compared after ncnn's defaults: give them explicitly), else an error saying what the
        architecture needs there."""
        if layer.type != kind or len(layer.inputs) != n_inputs:
            raise self.fail(layer, f"expected {what} (a {kind} with {n_inputs} input(s))")
        for key, want in params.items():
            got = layer.param(int(key[1:]), want)
            if isinstance(want, float) or (isinstance(want, list) and any(isinstance(w, float) for w in want)):
                same = np.allclose(np.asarray(got, float), np.asarray(want, float), rtol=1e-6, atol=0)
            else:
                same = got == want
            if not same:
                raise self.fail(layer, f"expected {what} with param {key[1:]}={want}, found {got}")
        return layer

    def take(self, layer: NcnnLayer, blob: str) -> np.ndarray:
        """A weight blob, counted as mapped."""
        self._taken.add((layer.name, blob))
        return layer.weights[blob]

    def check_all_taken(self) -> None:
        left = [f"{layer.name}.{b}" for layer in self.layers for b in layer.weights
                if (layer.name, b) not in self._taken]
        if left:
            raise NcnnError(f"{self.bin_path}: {len(left)} weight blobs map to no parameter of the "
                            f"model: {left[:5]}")


def conv_geometry(layer: NcnnLayer) -> dict[str, Any]:
    """A Convolution's settings with ncnn's defaults (src/layer/convolution.cpp load_param)."""
    p = layer.param
    kw = p(1, 0)
    pad_left = p(4, 0)
    pad_top = p(14, pad_left)
    return {"num_output": p(0, 0), "kernel": (p(11, kw), kw), "dilation": (p(12, p(2, 1)), p(2, 1)),
            "stride": (p(13, p(3, 1)), p(3, 1)),
            "pad": (pad_left, p(15, pad_left), pad_top, p(16, pad_top)), "pad_value": p(18, 0.0),
            "bias": bool(p(5, 0)), "activation": (p(9, 0), list(p(10, []))),
            "int8": bool(p(8, 0))}


def conv_weights(net: NcnnNet, layer: NcnnLayer) -> tuple[np.ndarray, np.ndarray | None]:
    """A float Convolution's (weight (O, I, kh, kw), bias (O,) or None), taken from the net.
    ncnn stores the weight output-major, then input, then row, then column: torch's order."""
    geo = conv_geometry(layer)
    if geo["int8"]:
        # an int8 graph also quantizes activations; a float model would not compute the same
        raise net.fail(layer, "int8-quantized convolution: convert from a float model instead")
    weight = net.take(layer, "weight")
    (kh, kw), cout = geo["kernel"], geo["num_output"]
    if weight.dtype != np.float32 or cout <= 0 or weight.size % (cout * kh * kw):
        raise net.fail(layer, f"{weight.size} {weight.dtype} weights do not fill {cout} "
                              f"outputs of {kh}x{kw} kernels")
    bias = net.take(layer, "bias") if geo["bias"] else None
    return weight.reshape(cout, -1, kh, kw), bias
