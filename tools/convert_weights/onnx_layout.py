"""Print the layout of any ONNX file, as a converter for it needs to know it: graph inputs and
outputs, then every node in file order (op, node name, inputs with the shape of each one that
is an initializer, outputs, the attributes that change what it computes), then op counts and
the number of parameter values. For a file whose layout no public code gives (insightface's
1k3d68.onnx: tidyface/models/landmarks.py):

    python tools/convert_weights/onnx_layout.py 1k3d68.onnx > 1k3d68_layout.txt
    python tools/convert_weights/onnx_layout.py 2d106det.onnx --nodes 12   # the first 12 nodes

Uses tidyface's own reader: needs neither onnx nor onnxruntime.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from tidyface.convert.onnx import read_onnx

# attributes worth printing (the rest are defaults or do not change the arithmetic)
ATTRS = ("kernel_shape", "strides", "pads", "dilations", "group", "epsilon", "spatial", "axis",
         "axes", "perm", "transA", "transB", "alpha", "beta", "mode", "ceil_mode", "count_include_pad")


def describe(node, inits) -> str:
    ins = [f"{x}{list(inits[x].shape)}" if x in inits else x for x in node.inputs]
    attrs = {k: node.attrs[k] for k in ATTRS if k in node.attrs}
    line = f"{node.op_type} {node.name!r}: {', '.join(ins)} -> {', '.join(node.outputs)}"
    return f"{line}  {attrs}" if attrs else line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", type=Path, help="an .onnx file")
    ap.add_argument("--nodes", type=int, default=None, help="print only the first N nodes")
    args = ap.parse_args(argv)

    g = read_onnx(args.file)
    inits = g.initializers
    print(f"# {args.file}: IR {g.ir_version}, opsets {g.opset}, producer {g.producer!r}")
    for kind, values in (("input", g.inputs), ("output", g.outputs)):
        for v in values:
            print(f"# {kind} {v.name!r} elem_type {v.elem_type} shape {v.shape}")
    for node in g.nodes[:args.nodes]:
        print(describe(node, inits))
    used = {x for n in g.nodes for x in n.inputs}
    unused = [k for k in inits if k not in used]
    print(f"\n# {len(g.nodes)} nodes: {dict(Counter(n.op_type for n in g.nodes).most_common())}")
    print(f"# {len(inits)} initializers, {sum(a.size for a in inits.values()):,} values"
          + (f"; not read by any node: {unused[:8]}" if unused else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
