"""Read a network saved by dlib's DNN tools (`serialize(file) << net`) without dlib, for the
layer kinds of dlib's ResNet face recogniser: every byte accounted for, the structure checked
against the network the caller expects.

Facts from davisking/dlib `dlib/dnn/core.h` (serialize of add_loss_layer, add_layer, add_tag_layer,
add_skip_layer), `dlib/dnn/layers.h` (con_, affine_, bn_, relu_, max_pool_, avg_pool_,
add_prev_, fc_), `dlib/dnn/input.h` (input_rgb_image_sized), `dlib/dnn/loss.h` (loss_metric_),
`dlib/cuda/tensor.h` (tensor, alias_tensor) and `dlib/serialize.h` (ints, floats, bool, string):
- A network is written outermost first and nested: a layer writes its version, then its whole
  subnetwork, then its own details. So the file holds every layer's header from the loss down to
  the input, then the details of each layer from the input back up to the top.
- Primitives: integers and floats as convert/dlib.py reads them (float: float_details); a bool
  is one ASCII byte '1' or '0'; a std::string its size (unsigned long) then its bytes; a tensor
  version 2, num_samples, k, nr, nc (long long) then its values as raw little-endian float32; an
  alias_tensor (a view's shape, no values) version 1 and the same four sizes.
- add_loss_layer: int 1, the loss's details, the subnetwork. add_tag_layer / add_skip_layer over
  a layer: int 1, the subnetwork. add_layer over a layer: int version (1 or 2), subnetwork,
  details, bools this_layer_setup_called, gradient_input_is_stale,
  get_output_and_gradient_input_disabled, tensors x_grad, cached_output, and (version 2)
  params_grad. add_layer over the input: int version (2 or 3), the input layer, details, the
  three bools, tensors x_grad, cached_output, grad_final, and (version 3) unsigned int
  sample_expansion_factor. The tensors after the details are training state, not weights.
- Details (version string first): con_4/5/6: tensor params (filters (O,I,kh,kw) then biases
  (O)), long num_filters, long nr, nc, int stride_y, stride_x, padding_y, padding_x, alias
  filters, alias biases, 4 doubles (learning-rate and weight-decay multipliers), con_5+: bool
  use_bias, con_6: bool use_relu. affine_/affine_2: tensor params (gamma then beta), alias gamma,
  alias beta, int mode (0 conv: per channel; 1 fc), affine_2: bool disabled; an affine_ may also
  be stored as the bn_ it was trained as (bn_con2/bn_fc2: tensor params, aliases gamma, beta,
  tensors means, invstds, running_means, running_variances, unsigned long num_updates,
  running_stats_window_size, 4 doubles, double eps), which dlib folds on loading to
  gamma / sqrt(running_variance + eps) and beta - that * running_mean. relu_ (relu_2: bool
  disabled). max_pool_2 / avg_pool_2: long nr, nc, int stride_y, stride_x, padding_y, padding_x.
  add_prev_: nothing. fc_2/fc_3: unsigned long num_outputs, num_inputs, tensor params (weights
  (num_inputs, num_outputs) row-major, then biases), alias weights, alias biases, int bias_mode
  (0 with bias, 1 without), 4 doubles, fc_3: bool use_bias. input_rgb_image_sized: 3 floats
  (mean red, green, blue), unsigned long nr, nc. loss_metric_2: float margin, float
  distance threshold (loss_metric_: none, 0.1 and 0.75).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .dlib import DlibFormatError, floats_from_details, read_int

TENSOR_VERSION, ALIAS_VERSION = 2, 1
MAX_STRING = 64  # the longest version string a reader expects; anything longer is not one


class Stream:
    """dlib's serialised primitives read in order from bytes; every error names the source and
    the byte offset."""

    def __init__(self, data: bytes, source: str):
        self.data, self.source, self.pos = data, source, 0

    def fail(self, what: str, at: int | None = None) -> DlibFormatError:
        return DlibFormatError(f"{self.source}: {what} (at byte {self.pos if at is None else at})")

    def int(self, bits: int = 32, signed: bool = True) -> int:
        """An integer of a C++ type `bits` wide."""
        start = self.pos
        value, size, self.pos = read_int(self.data, start, self.source)
        if size > bits // 8 or (not signed and self.data[start] & 0x80):
            raise self.fail(f"not a {bits}-bit {'signed' if signed else 'unsigned'} integer", start)
        return value

    def uint(self, bits: int = 64) -> int:
        return self.int(bits, signed=False)

    def float(self, dtype=np.float32) -> float:
        """A float or double: float_details, mantissa (int64) then exponent (int16)."""
        mantissa, exponent = self.int(64), self.int(16)
        return float(floats_from_details(np.array([mantissa]), np.array([exponent]), dtype)[0])

    def bool(self) -> bool:
        if self.pos >= len(self.data) or self.data[self.pos] not in b"01":
            raise self.fail("not a bool (the byte '0' or '1')")
        self.pos += 1
        return self.data[self.pos - 1] == ord("1")

    def string(self) -> str:
        start, size = self.pos, self.uint()
        if size > MAX_STRING or self.pos + size > len(self.data):
            raise self.fail(f"a string of {size} bytes is not a version string here", start)
        self.pos += size
        return bytes(self.data[self.pos - size:self.pos]).decode("latin-1")

    def version(self, what: str, known: Sequence[str]) -> str:
        start, text = self.pos, self.string()
        if text not in known:
            raise self.fail(f"{what}: version {text!r}, expected {' or '.join(map(repr, known))}", start)
        return text

    def shape(self) -> tuple[int, int, int, int]:
        start = self.pos
        dims = tuple(self.int(64) for _ in range(4))
        if min(dims) < 0:
            raise self.fail(f"a tensor of shape {dims}", start)
        return dims

    def tensor(self) -> np.ndarray:
        """A tensor -> float32 (num_samples, k, nr, nc)."""
        start = self.pos
        if self.int() != TENSOR_VERSION:
            raise self.fail(f"not a tensor (version {TENSOR_VERSION} expected)", start)
        dims = self.shape()
        count = int(np.prod(dims))
        if self.pos + 4 * count > len(self.data):
            raise self.fail(f"a tensor of {count} floats runs past the end ({len(self.data)} bytes)", start)
        values = np.frombuffer(self.data, "<f4", count, self.pos).astype(np.float32).reshape(dims)
        self.pos += 4 * count
        return values

    def alias(self) -> tuple[int, int, int, int]:
        """An alias_tensor: only the shape of a view into a layer's params."""
        start = self.pos
        if self.int() != ALIAS_VERSION:
            raise self.fail(f"not an alias_tensor (version {ALIAS_VERSION} expected)", start)
        return self.shape()

    def multipliers(self) -> None:
        """Four doubles of training settings (learning-rate and weight-decay multipliers)."""
        for _ in range(4):
            self.float(np.float64)


@dataclass(frozen=True)
class Link:
    """One element of a dlib network's type, outermost first: kind is "loss" (loss_metric),
    "tag" / "skip" (id), "input" (input_rgb_image_sized) or a layer ("con", "affine", "relu",
    "max_pool", "avg_pool", "add_prev", "fc"); `name` keys the arrays of layers that have any;
    `expect` holds the hyperparameters the file must have (con: filters, kernel, stride,
    padding; pools: kernel, stride, padding; fc: outputs, bias; input: size)."""

    kind: str
    name: str | None = None
    expect: dict[str, Any] = field(default_factory=dict)


def read_network(path: str | Path, chain: Sequence[Link]) -> dict[str, dict[str, Any]]:
    """A dlib DNN file whose type is `chain` (outermost first, the input last) -> per named
    layer its arrays and values: con {"weight" (O,I,kh,kw), "bias" (O,) or absent}, affine
    {"scale", "shift"} (per channel), fc {"weight" (in, out), "bias"?}, input {"mean" (3,) RGB},
    loss {"margin", "distance_threshold"}. Every byte is read; a file that holds more, or whose
    layers differ from `chain`, is refused with the offset."""
    source = str(path)
    stream = Stream(Path(path).read_bytes(), source)
    if not chain or chain[-1].kind != "input" or any(link.kind == "input" for link in chain[:-1]):
        raise ValueError("a network chain ends with its one input")
    out: dict[str, dict[str, Any]] = {}
    pending = []  # add_layers whose details follow their subnetwork
    for depth, link in enumerate(chain):
        if link.kind == "input":
            break
        start, version = stream.pos, stream.int()
        over_input = chain[depth + 1].kind == "input"
        if link.kind == "loss":
            _expect_version(stream, "add_loss_layer", version, (1,), start)
            _store(out, link, _read_details(stream, link))
        elif link.kind in ("tag", "skip"):
            if over_input:
                raise stream.fail(f"a {link.kind} layer over the input is not read", start)
            _expect_version(stream, f"add_{link.kind}_layer", version, (1,), start)
        else:
            _expect_version(stream, "add_layer", version, (2, 3) if over_input else (1, 2), start)
            pending.append((link, version, over_input))
    _store(out, chain[-1], _read_details(stream, chain[-1]))
    for link, version, over_input in reversed(pending):
        _store(out, link, _read_details(stream, link))
        _read_training_state(stream, version, over_input)
    if stream.pos != len(stream.data):
        raise stream.fail(f"{len(stream.data) - stream.pos} more bytes after the network")
    return out


def _expect_version(stream: Stream, what: str, version: int, known: tuple[int, ...], at: int) -> None:
    if version not in known:
        raise stream.fail(f"{what} version {version}, expected {' or '.join(map(str, known))}: "
                          "not the network this reader expects", at)


def _store(out: dict, link: Link, arrays: dict | None) -> None:
    if arrays:
        out[link.name] = arrays


def _read_training_state(stream: Stream, version: int, over_input: bool) -> None:
    """What an add_layer writes after its details: flags and the tensors of training (gradients,
    the last output), read and dropped."""
    for _ in range(3):
        stream.bool()
    stream.tensor(), stream.tensor()  # x_grad, cached_output
    if over_input:
        stream.tensor()  # grad_final
        if version == 3:
            stream.uint(32)  # sample_expansion_factor
    elif version == 2:
        stream.tensor()  # params_grad


def _read_details(stream: Stream, link: Link) -> dict | None:
    start = stream.pos
    arrays = READERS[link.kind](stream, link)
    if arrays is not None and link.name is None:
        raise stream.fail(f"a {link.kind} layer with weights needs a name in the chain", start)
    return arrays


def _check(stream: Stream, link: Link, found: dict, start: int) -> None:
    """The hyperparameters read are those the chain expects (dlib's own deserialize refuses the
    same differences)."""
    wrong = {k: (found[k], v) for k, v in link.expect.items() if k in found and found[k] != v}
    if wrong:
        detail = ", ".join(f"{k} {got} (expected {want})" for k, (got, want) in wrong.items())
        raise stream.fail(f"{link.kind} layer {link.name or ''}: {detail}", start)


def _con(stream: Stream, link: Link) -> dict:
    start = stream.pos
    version = stream.version("con_", ("con_4", "con_5", "con_6"))
    params = stream.tensor()
    filters = stream.int(64)
    kernel = (stream.int(64), stream.int(64))
    stride = (stream.int(), stream.int())
    padding = (stream.int(), stream.int())
    weight_shape, bias_shape = stream.alias(), stream.alias()
    stream.multipliers()
    use_bias = stream.bool() if version in ("con_5", "con_6") else True
    if version == "con_6" and stream.bool():
        raise stream.fail("a con_ layer with its relu fused in is not read", start)
    _check(stream, link, dict(filters=filters, kernel=kernel, stride=stride, padding=padding), start)
    n_weight = int(np.prod(weight_shape))
    n_bias = filters if use_bias else 0
    if weight_shape[0] != filters or weight_shape[2:] != kernel or params.size != n_weight + n_bias \
            or (use_bias and bias_shape[1] != filters):
        raise stream.fail(f"con_ params of {params.size} values for filters {weight_shape}", start)
    flat = params.reshape(-1)
    out = {"weight": flat[:n_weight].reshape(weight_shape)}
    if use_bias:
        out["bias"] = flat[n_weight:].copy()
    return out


def _affine(stream: Stream, link: Link) -> dict:
    start = stream.pos
    version = stream.version("affine_", ("affine_", "affine_2", "bn_con2", "bn_fc2"))
    if version.startswith("bn_"):
        return _batch_norm(stream, link, start, version)
    params = stream.tensor().reshape(-1)
    gamma, _ = stream.alias(), stream.alias()
    mode = stream.int()
    if version == "affine_2" and stream.bool():
        raise stream.fail("a disabled affine_ layer is not read", start)
    channels = int(np.prod(gamma))
    if mode != 0 or params.size != 2 * channels:
        raise stream.fail(f"affine_ of mode {mode} with {params.size} params: a per-channel (conv "
                          "mode) affine layer was expected", start)
    return {"scale": params[:channels].copy(), "shift": params[channels:].copy()}


def _batch_norm(stream: Stream, link: Link, start: int, version: str) -> dict:
    """A bn_ stored where an affine_ is expected: folded as dlib folds it, in float32."""
    if version != "bn_con2":
        raise stream.fail("a bn_fc2 layer where a per-channel affine layer was expected", start)
    params = stream.tensor().reshape(-1)
    gamma, _ = stream.alias(), stream.alias()
    for _ in range(2):
        stream.tensor()  # means, invstds of the last training batch
    running_mean, running_var = stream.tensor().reshape(-1), stream.tensor().reshape(-1)
    stream.uint(), stream.uint()  # num_updates, running_stats_window_size
    stream.multipliers()
    eps = np.float32(stream.float(np.float64))
    channels = int(np.prod(gamma))
    if params.size != 2 * channels or running_mean.size != channels or running_var.size != channels:
        raise stream.fail(f"bn_con2 of {params.size} params and {running_mean.size} running means", start)
    scale = params[:channels] / np.sqrt(running_var + eps)
    return {"scale": scale, "shift": params[channels:] - scale * running_mean}


def _relu(stream: Stream, link: Link) -> None:
    start = stream.pos
    if stream.version("relu_", ("relu_", "relu_2")) == "relu_2" and stream.bool():
        raise stream.fail("a disabled relu_ layer is not read", start)


def _pool(stream: Stream, link: Link) -> None:
    start = stream.pos
    stream.version(f"{link.kind}_", (f"{link.kind}_2",))
    kernel = (stream.int(64), stream.int(64))
    stride = (stream.int(), stream.int())
    padding = (stream.int(), stream.int())
    _check(stream, link, dict(kernel=kernel, stride=stride, padding=padding), start)


def _add_prev(stream: Stream, link: Link) -> None:
    stream.version("add_prev_", ("add_prev_",))


def _fc(stream: Stream, link: Link) -> dict:
    start = stream.pos
    version = stream.version("fc_", ("fc_2", "fc_3"))
    outputs, inputs = stream.uint(), stream.uint()
    params = stream.tensor().reshape(-1)
    stream.alias(), stream.alias()
    bias_mode = stream.int()
    stream.multipliers()
    use_bias = stream.bool() if version == "fc_3" else True
    has_bias = bias_mode == 0 and use_bias
    _check(stream, link, dict(outputs=outputs, bias=has_bias), start)
    n_weight = inputs * outputs
    if bias_mode not in (0, 1) or params.size != n_weight + (outputs if bias_mode == 0 else 0):
        raise stream.fail(f"fc_ params of {params.size} values for {inputs} inputs and {outputs} outputs", start)
    out = {"weight": params[:n_weight].reshape(inputs, outputs)}
    if has_bias:
        out["bias"] = params[n_weight:].copy()
    return out


def _input(stream: Stream, link: Link) -> dict:
    start = stream.pos
    stream.version("input layer", ("input_rgb_image_sized",))
    mean = np.array([stream.float() for _ in range(3)], np.float32)
    size = (stream.uint(), stream.uint())
    _check(stream, link, dict(size=size), start)
    return {"mean": mean}


def _loss_metric(stream: Stream, link: Link) -> dict:
    if stream.version("loss_metric_", ("loss_metric_", "loss_metric_2")) == "loss_metric_":
        return {"margin": 0.1, "distance_threshold": 0.75}  # the values of that version
    return {"margin": stream.float(), "distance_threshold": stream.float()}


READERS = {"con": _con, "affine": _affine, "relu": _relu, "max_pool": _pool, "avg_pool": _pool,
           "add_prev": _add_prev, "fc": _fc, "input": _input, "loss": _loss_metric}
