"""A network's CPU float32 forward run as one traced graph whose convolutions, ReLUs and adds
oneDNN Graph fuses and compiles once (TorchScript's oneDNN fuser), instead of op by op.

Why: in eager PyTorch every oneDNN convolution builds its primitive descriptor anew, 40-60 us
before any arithmetic, and a detector makes 50-100 of them per forward. SCRFD-500M at 640 spends
9.4 ms in oneDNN's kernels and 16 ms in its eager forward on 2 cores; as a graph it takes 9 ms.
Same for RetinaFace mnet0.25, YuNet, CenterFace and MobileFaceNet: 20-35% less time per forward
(benchmarks/RESULTS.md). The outputs differ from eager only by float rounding (max abs 4e-5 on
the raw heads).

A graph is specialised to one input shape, and building it (trace, then a profiling and a
compiling run) costs a few forwards; so a shape is compiled the third time it is seen, which
every video and every fixed-size letterbox reaches at once and a folder of differently sized
photos never pays for, and a model keeps at most MAX_GRAPHS. Each graph is checked against the
eager output on the input that built it; a model whose forward cannot be traced, or whose graph
disagrees, runs eager from then on, with one warning.

Opt-in for now (TIDYFACE_CPU_GRAPHS=1): a graph's outputs differ from eager's in the last float
digits, and whether a call runs eager or as a graph depends on what the process ran before, so
a resumed video2faces run or a Ray run would no longer be byte for byte the local one
(tests/test_video2faces.py, tests/test_ray_engine.py). Making the choice depend on the input
alone (graphs from the first call inside a stream of same-shaped frames, fixed encoder batch
shapes) is the open step before graphs can be the default."""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

SEEN_BEFORE_COMPILE = 2  # a shape run eagerly twice is compiled at its third call
# Per model. A video or a letterbox repeats one or two shapes (full batches, the first image
# alone); an encoder's remainder batches come in many sizes, and a build costs a few forwards,
# so once a model holds this many graphs other shapes stay eager instead of evicting them.
MAX_GRAPHS = 4
MAX_TRACKED_SHAPES = 64  # shapes not compiled yet, remembered to count their calls
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-3

# The fuser switch is process-wide: every graph is built and warmed with it on, one at a time,
# and it is put back as it was (a built graph keeps its fused partitions).
_BUILD_LOCK = threading.Lock()


def graphs_enabled() -> bool:
    """Whether this process runs CPU graphs: TIDYFACE_CPU_GRAPHS=1, and oneDNN and its TorchScript
    fuser are built into torch."""
    return (os.environ.get("TIDYFACE_CPU_GRAPHS") == "1" and torch.backends.mkldnn.is_available()
            and hasattr(torch.jit, "enable_onednn_fusion") and hasattr(torch._C, "_jit_llga_enabled"))


def _eligible(x) -> bool:
    """One CPU float32 tensor in inference, outside tracing, torch.compile and autocast."""
    return (isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
            and not x.requires_grad and not torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


class GraphForward:
    """Stands in for a model's `forward`: eligible calls run the graph built for their input's
    shape and strides, once that shape has run eagerly SEEN_BEFORE_COMPILE times; everything else
    runs `forward`."""

    def __init__(self, forward: Callable, name: str):
        self.forward, self.name = forward, name
        self.graphs: dict[tuple, Callable] = {}
        self.seen: OrderedDict[tuple, int] = OrderedDict()
        self.disabled = False

    def __call__(self, *args, **kwargs):
        if self.disabled or kwargs or len(args) != 1 or not _eligible(args[0]):
            return self.forward(*args, **kwargs)
        x = args[0]
        key = (tuple(x.shape), x.stride())
        graph = self.graphs.get(key)
        if graph is not None:
            return graph(x)
        if len(self.graphs) >= MAX_GRAPHS:
            return self.forward(x)
        if self.seen.get(key, 0) < SEEN_BEFORE_COMPILE:
            self.seen[key] = self.seen.pop(key, 0) + 1
            while len(self.seen) > MAX_TRACKED_SHAPES:
                self.seen.popitem(last=False)
            return self.forward(x)
        return self._build(key, x)

    def _build(self, key: tuple, x: Tensor):
        """The eager output for x, after building (or failing to build) the graph of its shape."""
        eager = self.forward(x)
        with _BUILD_LOCK:
            if key in self.graphs or self.disabled or len(self.graphs) >= MAX_GRAPHS:
                return eager
            try:
                graph, out = _traced(self.forward, x)
            except Exception as e:  # untraceable forward, or no fuser on this build: stay eager
                return self._give_up(eager, f"it could not be traced ({e.__class__.__name__}: {str(e)[:200]})")
            worst = _mismatch(eager, out)
            if worst is not None:
                return self._give_up(eager, f"its graph differed from eager by {worst:.3g}")
            self.graphs[key] = graph
        return eager

    def _give_up(self, eager, why: str):
        self.disabled = True
        self.graphs.clear()
        warnings.warn(f"{self.name} runs op by op on the CPU: {why}", RuntimeWarning, stacklevel=4)
        return eager


def _traced(forward: Callable, x: Tensor):
    """(graph, its output for x): forward traced on x, then run twice with the fuser on (the
    profiling run, then the one that fuses and compiles). A trace that reads a tensor's value
    into Python (data-dependent control flow) is refused: its graph would only fit this input."""
    was_on = torch._C._jit_llga_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
        warnings.simplefilter("error", torch.jit.TracerWarning)
        torch.jit.enable_onednn_fusion(True)
        try:
            graph = torch.jit.trace(forward, x, check_trace=False)
            graph(x)
            return graph, graph(x)
        finally:
            torch.jit.enable_onednn_fusion(was_on)


def _mismatch(eager, out) -> float | None:
    """None if the graph's outputs match eager's (same structure, allclose); else the largest
    absolute difference (inf for a different structure)."""
    a, b = _flat(eager), _flat(out)
    if len(a) != len(b) or any(u.shape != v.shape for u, v in zip(a, b)):
        return float("inf")
    if all(torch.allclose(u, v, rtol=CHECK_RTOL, atol=CHECK_ATOL) for u, v in zip(a, b)):
        return None
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def _flat(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def run_as_graphs(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """`model` whose forward runs as CPU graphs (GraphForward) where its class says its forward
    is traceable (`traceable_forward = True`: tensor operations only, their shapes decided by
    the input's) and this process allows them. The model's parameters stop requiring gradients:
    a traced function holds them as constants."""
    if not getattr(model, "traceable_forward", False) or not graphs_enabled():
        return model
    model.requires_grad_(False)
    model.forward = GraphForward(model.forward, name)
    return model
