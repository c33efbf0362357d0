"""ModelCache: models ready for inference, loaded once and shared by the tasks of a process.

Sharing is safe because a task never changes a model: every setting (min_score, max_size,
thresholds) is an argument of the model's call (models/base.py).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path


def resolve_device(device=None):
    """`None`/"auto" -> CUDA when present, else CPU."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


PRECISIONS = ("float32", "bfloat16", "float16")


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere it is emulated,
    slower than float32."""
    import torch

    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


class ModelCache:
    """Up to `capacity` models, least recently used dropped first, keyed by (name, device,
    weights_dir, precision). Capacity 16 holds a whole pipeline (detector, landmarker, parser,
    enhancer, encoder) on two devices with room to spare; 0 keeps nothing (every `get` loads
    afresh)."""

    def __init__(self, capacity: int = 16):
        if int(capacity) < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str, device=None, weights_dir=None, precision: str = "float32"):
        """The model `name` on `device` (None: CUDA when present), weights loaded by name
        (strict), BatchNorm folded, in eval mode; its network computing in `precision`
        (`in_precision`); in float32 on the CPU as compiled graphs inside `ops.graphs.stream`."""
        dev = resolve_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        key = (name, str(dev), None if weights_dir is None else str(Path(weights_dir)), precision)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        from .ops.graphs import run_as_graphs

        model = _load_for_inference(name, dev, weights_dir)
        model = run_as_graphs(model, name) if precision == "float32" else in_precision(model, precision)
        with self._lock:
            self._models[key] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
        return model

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


def _load_for_inference(name: str, device, weights_dir):
    import torch

    from .models.base import model_device
    from .ops.fuse import fuse_conv_bn
    from .weights import load_model

    model = fuse_conv_bn(load_model(name, device=device, weights_dir=weights_dir))
    if model_device(model).type == "cpu":
        # oneDNN's depthwise and small convolutions are faster on channels-last weights; only
        # 4-D tensors are converted (models may hold tables of other ranks, e.g. dlib's trees)
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


_DEFAULT = ModelCache()


def in_precision(model, precision: str):
    """`model` with its network (its `forward`) computing in `precision` under autocast:
    convolutions and matrix products in bfloat16 / float16 with float32 accumulation, the
    rest as autocast decides, and every floating output back in float32, so that boxes,
    points and scores are decoded in float32 as before. The convolutions' and linear layers'
    weights are stored in `precision` (autocast would cast them at every call); the rest stay
    float32.
    Only models whose class says `reduced_precision = True` change: a forward that is the
    network alone, decoding after it, checked against float32 (tests/test_precision.py). The
    submodules it names in `float32_layers` (a ModuleList: each of them) compute in float32.
    The others stay float32: dlib's regression trees, and the detectors whose boxes moved by
    4% of a face in bfloat16 (CenterFace) or that have no real weights here to check (YOLOv3,
    Faster R-CNN, the 106-point net). On a CPU with AVX512-BF16, bfloat16 runs RetinaFace 2.2x
    and MobileFaceNet 1.8x as fast (benchmarks/RESULTS.md)."""
    if precision == "float32" or not getattr(model, "reduced_precision", False):
        return model
    import functools

    import torch

    from .models.base import model_device

    dtype, device_type = getattr(torch, precision), model_device(model).type
    network = model.forward
    kept = set()
    for name in getattr(model, "float32_layers", ()):
        layer = model.get_submodule(name)
        for part in (layer if isinstance(layer, torch.nn.ModuleList) else [layer]):
            part.forward = _in_float32(part.forward, device_type)
            kept.update(part.modules())
    # Cast once here: the values autocast would make at every call, in half the memory (SCRFD-500M
    # ran 960 fewer casts over 8 frames; its wall time stayed within the noise, 16.7 vs 16.9 ms).
    for layer in model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)) and layer not in kept:
            for p in layer.parameters(recurse=False):
                p.data = p.data.to(dtype)

    @functools.wraps(network)
    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = network(*args, **kwargs)
        return _as_float32(out)

    model.forward = forward
    return model


def _in_float32(forward, device_type: str):
    import functools

    import torch

    @functools.wraps(forward)
    def run(*args):
        with torch.autocast(device_type, enabled=False):
            return forward(*_as_float32(args))

    return run


def _as_float32(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_as_float32(o) for o in out)
    return out


def default_cache() -> ModelCache:
    """The process-wide cache that tasks use when none is passed."""
    return _DEFAULT
