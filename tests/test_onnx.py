"""Every registered model's forward graphs export to ONNX and compute what torch computes.

Random weights (no downloads), so a newly registered model is covered as soon as it registers.
Each graph runs under onnxruntime on its example input, on another batch size, and, for graphs
exported with dynamic height and width, on another (odd) size; each output must match eager torch
to within TOLERANCE times the output's largest magnitude. With the random weights below the
measured differences stay under 2e-6 of the output scale (float32 rounding in different kernel
orders).

A graph depends only on the built module and its spec's input size (`export_graphs`), so the
export runs once per distinct (builder, input size): variants that share both differ only in
their weights (bsrgan_x4 and realesrgan_x4plus_ncnn are realesrgan_x4plus's RRDBNet; facenet's
three variants one InceptionResnetV1), and a 23-block RRDBNet costs ~25 s to trace and check.
"""
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import reference
from tidyface.export import export_model, onnx_session, run_onnx
from tidyface.models.base import export_graphs
from tidyface.registry import list_models
from tidyface.weights import load_model

reference("onnx")
reference("onnxruntime")

TOLERANCE = 1e-4  # max abs difference / max |torch output|


def randomise_norms(model: torch.nn.Module) -> None:
    """Random BatchNorm statistics and affine terms, and random PReLU slopes: their default
    initial values (the identity map; one slope of 0.25 for every channel) would hide a graph
    that drops a BatchNorm, its epsilon, or the per-channel broadcast of a slope."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.0, 0.5)


def inputs_for(example: torch.Tensor, any_size: bool) -> list[torch.Tensor]:
    """The example, another batch size and, for an any-size graph, another height and width."""
    n, c, h, w = example.shape
    xs = [example, torch.randn(n - 1 if n > 1 else 2, c, h, w)]
    if any_size:
        xs.append(torch.randn(1, c, h // 2 + 5, w // 2 + 3))
    return xs


def max_diffs(module, session, x) -> list[tuple[float, float]]:
    """(max abs difference, max |torch value|) per output."""
    with torch.no_grad():
        want = module(x)
    want = want if isinstance(want, tuple) else (want,)
    got = run_onnx(session, x)
    assert len(got) == len(want)
    out = []
    for g, t in zip(got, want):
        assert g.shape == tuple(t.shape), (g.shape, tuple(t.shape))
        out.append((float(np.abs(g - t.numpy()).max()), float(t.abs().max())))
    return out


# Models whose graph is another's at other widths and depths: ViT-L/16 is ViT-B/16's module
# (24 blocks of 1024 instead of 12 of 768) and its export writes 1.2 GB for nothing new.
SAME_GRAPH_AS = {"vit_anime_l16": "vit_anime_b16"}


def one_per_graph(entries) -> list[str]:
    """The first registered name of each distinct (builder, input size)."""
    first: dict = {}
    for e in entries:
        if e.spec.name not in SAME_GRAPH_AS:
            first.setdefault((e.builder, e.spec.meta.input_size), e.spec.name)
    return list(first.values())


@pytest.mark.parametrize("name", one_per_graph(list_models()))
def test_onnx_matches_torch(name, tmp_path):
    torch.manual_seed(0)
    model = load_model(name, pretrained=False)
    randomise_norms(model)
    with warnings.catch_warnings():
        # a TracerWarning means a Python branch on a shape or value was frozen into the graph
        warnings.simplefilter("error", torch.jit.TracerWarning)
        paths = export_model(model, tmp_path)
    graphs = export_graphs(model)
    assert len(paths) == len(graphs)
    fixed = model.spec.meta.input_size
    sizes = []
    for path, (graph, (module, example)) in zip(paths, graphs.items()):
        session = onnx_session(path)
        dims = session.get_inputs()[0].shape
        assert dims[0] == "batch", dims
        any_size = isinstance(dims[2], str)
        sizes.append(any_size)
        if fixed is not None:
            assert dims[2:] == [fixed[1], fixed[0]], dims
        for x in inputs_for(example, any_size):
            for i, (diff, scale) in enumerate(max_diffs(module, session, x)):
                print(f"{name} {graph or '-'} {tuple(x.shape)} output {i}: max abs diff {diff:.2e}, "
                      f"max |value| {scale:.2e}, ratio {diff / max(scale, 1e-12):.1e}")
                assert diff <= TOLERANCE * max(scale, 1e-6), (graph, tuple(x.shape), i, diff, scale)
    if model.spec.task == "detect":
        assert any(sizes), "a detector should have a graph that runs at any image size"


def test_cli_exports(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "tools/convert_weights/export_onnx.py"
    spec = importlib.util.spec_from_file_location("export_onnx_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["mtcnn", "--out", str(tmp_path), "--random-weights", "--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mtcnn_{g}.onnx" for g in ("onet", "pnet", "rnet")]
    assert "prob ['batch']" in capsys.readouterr().out


def test_missing_onnxruntime_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match="pip install onnx onnxruntime"):
        run_onnx("any.onnx", np.zeros((1, 3, 8, 8), np.float32))
