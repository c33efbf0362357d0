"""Print how a registered model's upstream ONNX file maps onto tidyface's parameters.

    python tools/convert_weights/onnx_map.py scrfd_500m
    python tools/convert_weights/onnx_map.py scrfd_10g --file /path/to/det_10g.onnx

For every initializer of the file: its name, shape and dtype, and what it became (a tidyface
key, or why it is not a parameter); then the graph node of every tidyface layer (op, output,
stride, padding, groups). The model's module provides `map_onnx(path, model)`, the walk its
converter runs, so what is printed is what conversion does. Needs neither onnx nor onnxruntime.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from tidyface.registry import get
from tidyface.weights import resolve_file


def print_mapping(walk) -> None:
    inits = walk.model.initializers
    print(f"# {len(inits)} initializers of {walk.model.source}")
    for name, arr in inits.items():
        uses = "; ".join(walk.tracker.uses.get(name, ["NOT CONVERTED"]))
        print(f"{name}  {tuple(arr.shape)} {arr.dtype}  ->  {uses}")
    print(f"\n# {len(walk.nodes)} tidyface layers and their graph nodes")
    for key, node in walk.nodes.items():
        a = node.attrs
        print(f"{key}  <-  {node.op_type} {node.outputs[0]} stride {a.get('strides')} pads {a.get('pads')} "
              f"group {a.get('group', 1)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a registered model converted from ONNX (scrfd_500m, yunet, centerface, ...)")
    ap.add_argument("--file", type=Path, help="the upstream .onnx (default: resolved by the weights store)")
    args = ap.parse_args(argv)

    entry = get(args.model)
    with torch.device("meta"):
        model = entry.builder()
    mapper = getattr(importlib.import_module(type(model).__module__), "map_onnx", None)
    if mapper is None:
        print(f"{args.model}: its converter does not read ONNX", file=sys.stderr)
        return 2
    path = args.file or resolve_file(entry.spec.files[0], entry.spec)
    walk = mapper(path, model)
    print_mapping(walk)
    values = sum(v.size for v in walk.state.values())
    print(f"\n# converted: {len(walk.state)} tensors, {values:,} values; every initializer accounted for")
    return 0


if __name__ == "__main__":
    sys.exit(main())
