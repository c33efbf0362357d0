"""A network's CPU float32 forward run as one traced graph whose convolutions, ReLUs and adds
oneDNN Graph fuses and compiles once (TorchScript's oneDNN fuser), instead of op by op.

Why: in eager PyTorch every oneDNN convolution builds its primitive descriptor anew, 40-60 us
before any arithmetic, and a detector makes 50-100 of them per forward. SCRFD-500M at 640 spends
9.4 ms in oneDNN's kernels and 16 ms in its eager forward on 2 cores; as a graph it takes 9 ms.
Same for RetinaFace mnet0.25, YuNet, CenterFace and MobileFaceNet: 20-35% less time per forward
(benchmarks/RESULTS.md). The outputs differ from eager only by float rounding (max abs 4e-5 on
the raw heads).

A graph is specialised to one input shape, and building it (trace, then a profiling and a
compiling run) costs 0.45-0.56 s on 2 cores (CenterFace 1.4 s), ten forwards or more: it pays
off only over a long stream of inputs of one shape. So graphs run only inside `stream(model,
...)`, which a task opens around such a stream (anonymize over a video's every frame,
video2faces over a long video); there a shape is compiled at its first call and every call of
that shape runs its graph, and outside a stream every call runs eager. Which one computed a
result therefore depends on the task and the input, never on what the process ran before: a
resumed or a Ray run is byte for byte the local one. A model keeps its MAX_GRAPHS most recently
used graphs (a rebuilt one computes what the dropped one did). Each graph is checked against the
eager output on the input that built it; a model whose forward cannot be traced, or whose graph
disagrees, runs eager from then on, with one warning. TIDYFACE_CPU_GRAPHS=0 turns them off."""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor

# Per model. A stream repeats a few shapes (full batches, a first image alone, a last batch);
# more than this and the least recently used is dropped.
MAX_GRAPHS = 4
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-3

# The fuser switch is process-wide: every graph is built and warmed with it on, one at a time,
# and it is put back as it was (a built graph keeps its fused partitions).
_BUILD_LOCK = threading.Lock()
_LOCK = threading.Lock()  # a model's graph table and stream count, shared by its threads


def graphs_enabled() -> bool:
    """Whether this process may run CPU graphs: not turned off (TIDYFACE_CPU_GRAPHS=0), and
    oneDNN and its TorchScript fuser are built into torch."""
    return (os.environ.get("TIDYFACE_CPU_GRAPHS", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.jit, "enable_onednn_fusion") and hasattr(torch._C, "_jit_llga_enabled"))


def _eligible(x) -> bool:
    """One CPU float32 tensor in inference, outside tracing, torch.compile and autocast."""
    return (isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
            and not x.requires_grad and not torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


class GraphForward:
    """Stands in for a model's `forward`: inside a `stream`, eligible calls run the graph built
    for their input's shape and strides (built at the first such call); everything else runs
    `forward`."""

    def __init__(self, forward: Callable, name: str):
        self.forward, self.name = forward, name
        self.graphs: OrderedDict[tuple, Callable] = OrderedDict()
        self.streams = 0  # open `stream` scopes over this model
        self.disabled = False

    def __call__(self, *args, **kwargs):
        if not self.streams or self.disabled or kwargs or len(args) != 1 or not _eligible(args[0]):
            return self.forward(*args, **kwargs)
        x = args[0]
        key = (tuple(x.shape), x.stride())
        with _LOCK:
            graph = self.graphs.get(key)
            if graph is not None:
                self.graphs.move_to_end(key)
        return graph(x) if graph is not None else self._build(key, x)

    def _build(self, key: tuple, x: Tensor):
        """The graph's output for x, after building the graph of its shape; the eager output
        if it cannot be built."""
        with _BUILD_LOCK:
            graph = self.graphs.get(key)
            if graph is not None or self.disabled:  # built by another thread meanwhile
                return graph(x) if graph is not None else self.forward(x)
            eager = self.forward(x)
            try:
                graph, out = _traced(self.forward, x)
            except Exception as e:  # untraceable forward, or no fuser on this build: stay eager
                return self._give_up(eager, f"it could not be traced ({e.__class__.__name__}: {str(e)[:200]})")
            worst = _mismatch(eager, out)
            if worst is not None:
                return self._give_up(eager, f"its graph differed from eager by {worst:.3g}")
            with _LOCK:
                self.graphs[key] = graph
                while len(self.graphs) > MAX_GRAPHS:
                    self.graphs.popitem(last=False)
        return out

    def _give_up(self, eager, why: str):
        self.disabled = True
        with _LOCK:  # __call__ reads the table under it
            self.graphs.clear()
        warnings.warn(f"{self.name} runs op by op on the CPU: {why}", RuntimeWarning, stacklevel=4)
        return eager


@contextmanager
def stream(*models, enabled: bool = True):
    """Inside, the models' CPU float32 forwards run as graphs (those `run_as_graphs` gave them),
    each input shape compiled at its first call: open it around a stream of same-shaped inputs
    long enough to repay the builds (ten forwards or more each). enabled=False: a no-op, so a task
    can decide by its input."""
    forwards = [f for m in models for f in _graph_forwards(m)] if enabled else []
    with _LOCK:
        for f in forwards:
            f.streams += 1
    try:
        yield
    finally:
        with _LOCK:
            for f in forwards:
                f.streams -= 1


def _graph_forwards(model) -> list[GraphForward]:
    modules = model.modules() if isinstance(model, torch.nn.Module) else [model]
    found = (getattr(m, "__dict__", {}).get("forward") for m in modules)  # set on the instance
    return [f for f in found if isinstance(f, GraphForward)]


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
            # A plain function, not the bound method: a module's method is traced as a module,
            # with a ScriptModule made for every submodule (4-6x the trace's time); a function
            # records the ops alone, the weights as constants, and its graph runs as fast.
            graph = torch.jit.trace(lambda t: forward(t), x, check_trace=False)
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
    """`model` whose forward runs as CPU graphs inside a `stream` (GraphForward) where its class
    says its forward is traceable (`traceable_forward = True`: tensor operations only, their
    shapes decided by the input's) and this process allows them. The model's parameters stop
    requiring gradients: a traced function holds them as constants."""
    if not getattr(model, "traceable_forward", False) or not graphs_enabled():
        return model
    model.requires_grad_(False)
    model.forward = GraphForward(model.forward, name)
    return model
