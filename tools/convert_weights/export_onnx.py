"""Export a registered model's forward graph(s) to ONNX, optionally checked under onnxruntime.

    python tools/convert_weights/export_onnx.py retinaface_mnet025 --out onnx/ --check
    python tools/convert_weights/export_onnx.py mtcnn --out onnx/ --random-weights

Writes OUT/<model>.onnx, or OUT/<model>_<graph>.onnx per stage of a cascade (mtcnn: pnet, rnet,
onet), and prints each file with its input and output shapes. --check runs every file under
onnxruntime and the model under torch on the same random input and prints the largest
difference (exit status 1 if any exceeds --tolerance times the output's largest magnitude).
Needs `pip install onnx onnxruntime`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from tidyface.export import DEFAULT_OPSET, export_model, onnx_session, run_onnx
from tidyface.models.base import export_graphs
from tidyface.weights import load_model


def check(module, example, path: Path, tolerance: float) -> bool:
    """Print the onnxruntime vs torch difference of every output on `example`."""
    with torch.no_grad():
        want = module(example)
    want = want if isinstance(want, (tuple, list)) else (want,)
    session = onnx_session(path)
    ok = True
    for meta, got, ref in zip(session.get_outputs(), run_onnx(session, example), want):
        diff, scale = float(np.abs(got - ref.numpy()).max()), float(ref.abs().max())
        ok &= diff <= tolerance * max(scale, 1e-6)
        print(f"  {meta.name}: max abs diff {diff:.2e} (largest |value| {scale:.2e})")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a registered model name (tidyface.registry.list_models)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the .onnx files")
    ap.add_argument("--random-weights", action="store_true", help="export untrained weights (no download)")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ap.add_argument("--check", action="store_true", help="compare with torch under onnxruntime")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="for --check, relative to the output scale")
    args = ap.parse_args(argv)

    model = load_model(args.model, pretrained=not args.random_weights)
    paths = export_model(model, args.out, opset=args.opset)
    ok = True
    for path, (module, example) in zip(paths, export_graphs(model).values()):
        session = onnx_session(path)
        shapes = ", ".join(f"{v.name} {v.shape}" for v in (*session.get_inputs(), *session.get_outputs()))
        print(f"{path}  ({path.stat().st_size:,} bytes)  {shapes}")
        if args.check:
            ok &= check(module, example, path, args.tolerance)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
