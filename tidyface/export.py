"""ONNX export of the models' forward graphs, and a runner to check them under onnxruntime.

    from tidyface.export import export_model, run_onnx
    paths = export_model("retinaface_mnet025", "onnx/")  # [onnx/retinaface_mnet025.onnx]
    loc, logits, landmarks = run_onnx(paths[0], x)       # x: (B,3,H,W) as the forward takes it

A graph is the network's forward only (`models.base.export_graphs`): pre- and post-processing
(resizing, normalisation, anchors, NMS, the MTCNN cascade) stay in Python. Every graph has one
input, "input", with a dynamic batch axis; a detector's graph that runs at any size also has
dynamic height and width. Outputs are named by the module's `onnx_outputs`, else "output"
(one output) or "output0", "output1", ...

The graphs are traced by torch's TorchScript-based exporter (`dynamo=False`): the torch.export
based default of torch >= 2.9 needs the `onnxscript` package, which tidyface does not depend on.
onnx and onnxruntime are optional too: `pip install onnx onnxruntime`.
"""
from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .models.base import export_graphs
from .ops.image import atomic_path

# Opset 17 (ONNX 1.12, 2022) has every op these graphs use and is read by older runtimes than
# the TorchScript exporter's newest, 20.
DEFAULT_OPSET = 17


def _require(module: str):
    """Import onnx or onnxruntime, or say how to install them."""
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the optional packages onnx and onnxruntime: "
                          f"pip install onnx onnxruntime ({e})") from e


def output_names(module: nn.Module, count: int) -> list[str]:
    """The module's `onnx_outputs`, else generic names, for `count` outputs."""
    names = getattr(module, "onnx_outputs", None)
    if names is not None:
        if len(names) != count:
            raise ValueError(f"{type(module).__name__}.onnx_outputs names {len(names)} outputs, "
                             f"its forward returns {count}")
        return list(names)
    return ["output"] if count == 1 else [f"output{i}" for i in range(count)]


def export_onnx(module: nn.Module, example: Tensor, path: str | os.PathLike, dynamic_batch: bool = True,
                dynamic_size: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Trace `module` on `example` (B,C,H,W) and write the ONNX graph to `path` (atomically:
    nobody sees a half-written file), checked by onnx.checker. dynamic_batch / dynamic_size:
    let the batch axis / height and width vary. Returns the path."""
    onnx = _require("onnx")
    names = output_names(module, _count_outputs(module, example))
    axes = {0: "batch"} if dynamic_batch else {}
    in_axes = {**axes, 2: "height", 3: "width"} if dynamic_size else axes
    dynamic_axes = {"input": in_axes, **{n: axes for n in names}} if in_axes else None
    # torch < 2.5 has no `dynamo` argument and always traces
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # torch warns that the TorchScript exporter is deprecated: chosen on purpose (module doc)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        torch.onnx.export(module, (example,), str(tmp), input_names=["input"], output_names=names,
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                          **legacy)
        onnx.checker.check_model(str(tmp))
    return path


def _count_outputs(module: nn.Module, example: Tensor) -> int:
    """How many tensors the module's forward returns, run in eval mode as the export traces it."""
    training = module.training
    try:
        with torch.no_grad():
            out = module.eval()(example)
    finally:
        module.train(training)
    return len(out) if isinstance(out, (tuple, list)) else 1


def accepts_any_size(module: nn.Module, example: Tensor) -> bool:
    """Whether the module also runs at another height and width than its example's (a fully
    convolutional detector does; a net ending in Linear layers over a fixed grid does not)."""
    h, w = example.shape[2:]
    other = torch.randn(1, example.shape[1], h * 3 // 4 + 1, w * 3 // 4 + 3, dtype=example.dtype)
    try:
        with torch.no_grad():
            module(other)
    except (RuntimeError, ValueError):
        return False
    return True


def onnx_session(path: str | os.PathLike):
    """An onnxruntime InferenceSession on the CPU."""
    ort = _require("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path_or_session, x: Tensor | np.ndarray) -> list[np.ndarray]:
    """Run an exported graph on x (a tensor or array, cast to float32) -> its outputs, in order.
    Pass a session from `onnx_session` to run one graph many times without reloading it."""
    session = path_or_session
    if isinstance(session, (str, os.PathLike)):
        session = onnx_session(session)
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})


def export_model(name_or_model: str | nn.Module, out_dir: str | os.PathLike, pretrained: bool = True,
                 opset: int = DEFAULT_OPSET) -> list[Path]:
    """Every forward graph of a model (a registered name, loaded with its weights unless
    pretrained=False, or a model from `load_model`) -> out_dir/<name>.onnx, or
    out_dir/<name>_<graph>.onnx for a cascade's graphs; the model is left in eval mode. Detector
    graphs that run at any size get dynamic height and width."""
    if isinstance(name_or_model, str):
        from .weights import load_model

        model = load_model(name_or_model, pretrained=pretrained)
    else:
        model = name_or_model
    spec = model.spec
    model.eval()
    paths = []
    for graph, (module, example) in export_graphs(model).items():
        any_size = spec.meta.input_size is None and accepts_any_size(module, example)
        path = Path(out_dir) / (f"{spec.name}_{graph}.onnx" if graph else f"{spec.name}.onnx")
        paths.append(export_onnx(module, example, path, dynamic_size=any_size, opset=opset))
    return paths
