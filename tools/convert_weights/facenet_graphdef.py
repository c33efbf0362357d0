"""Convert FaceNet's TF1 frozen graph (graph_final.pb) to tidyface and prove it against OpenCV DNN.

    python tools/convert_weights/facenet_graphdef.py ../shared/weights/graph_final.pb \
        --images ../shared/media/facenet_pytorch/test_images_aligned --out facenet_casia_tf.pt

Prints every graph-constant -> tidyface-parameter pair (with the layout change applied), the
residual scales checked against the module, the constants that are not parameters and why, and a
check of every Conv2D's stride and padding against the module's layers. With --images, runs the
converted model and `cv2.dnn.readNetFromTensorflow` on the same 160x160 crops and reports the
cosine per image (exit status 1 if any is below --min-cosine). Needs no TensorFlow, but an OpenCV
before 5.1 (which removed the TensorFlow importer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from tidyface.convert.tf_graphdef import read_graph
from tidyface.models.facenet import InceptionResnetV1, convert_tf_graph, map_tf_graph, preprocess
from tidyface.ops.image import expand_paths, read_image, to_tensor_batch


def print_mapping(graph, mapping) -> None:
    print(f"# {len(mapping.mapped)} graph constants -> tidyface parameters")
    for name, key in mapping.mapped.items():
        shape = tuple(graph[name].value.shape)
        how = {4: "HWIO->OIHW", 2: "(in,out)->(out,in)"}.get(len(shape), "as is")
        if key.startswith("bottleneck."):
            how += ", BN folded into bottleneck"
        print(f"{name}  {shape}  ->  {key}  [{how}]")
    print(f"\n# {len(mapping.residual_scales)} residual scales (graph Mul constant vs module)")
    for name, (graph_value, module_value) in mapping.residual_scales.items():
        print(f"{name}  {graph_value:g}  module {module_value:g}")
    print(f"\n# {len(mapping.unused)} constants that are not parameters")
    for name, why in mapping.unused.items():
        print(f"{name}  {graph[name].value.tolist()}  ({why})")
    print(f"\n# bottleneck BatchNorm epsilon from the graph: {mapping.bn_eps:g}")


def check_conv_attributes(graph, mapping) -> int:
    """Stride and padding of every Conv2D node against the layer its weights load into."""
    with torch.device("meta"):
        model = InceptionResnetV1()
    bad = 0
    convs = [n for n in graph.values() if n.op == "Conv2D"]
    for node in convs:
        key = mapping.mapped[node.inputs[1]]
        layer = model.get_submodule(key.rsplit(".", 1)[0])
        kh, kw = layer.kernel_size
        stride = tuple(node.attrs["strides"][1:3])
        padding = (kh // 2, kw // 2) if node.attrs["padding"] == "SAME" else (0, 0)
        if stride != tuple(layer.stride) or padding != tuple(layer.padding):
            bad += 1
            print(f"MISMATCH {node.name}: graph stride {stride} padding {node.attrs['padding']} "
                  f"-> {padding}; module stride {layer.stride} padding {layer.padding}")
    print(f"# Conv2D stride/padding: {len(convs) - bad}/{len(convs)} match the module")
    return bad


def verify_with_opencv(pb: Path, state: dict, images: list[Path], min_cosine: float) -> bool:
    import cv2

    model = InceptionResnetV1()
    model.load_state_dict(state, strict=True)
    model.eval()
    rgb = [cv2.resize(im, (160, 160), interpolation=cv2.INTER_AREA) if im.shape[:2] != (160, 160)
           else im for im in map(read_image, images)]
    with torch.no_grad():
        ours = model(preprocess(to_tensor_batch(rgb))).numpy()
    net = cv2.dnn.readNetFromTensorflow(str(pb))
    ok = True
    print(f"\n# OpenCV {cv2.__version__} DNN vs tidyface, input 'input' (NCHW blob, RGB, (x-127.5)/128), "
          "output 'embeddings'")
    for path, im, emb in zip(images, rgb, ours):
        # The graph reshapes with a fixed batch of 1, so OpenCV runs one face at a time.
        net.setInput(cv2.dnn.blobFromImage(im, 1 / 128, (160, 160), (127.5,) * 3, swapRB=False), "input")
        want = net.forward("embeddings")[0]
        cosine = float(want @ emb / (np.linalg.norm(want) * np.linalg.norm(emb)))
        ok &= cosine >= min_cosine
        print(f"{path}  cosine {cosine:.7f}  max abs diff {np.abs(want - emb).max():.2e}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("graph", type=Path, help="graph_final.pb")
    ap.add_argument("--out", type=Path, help="save the converted tidyface state dict here")
    ap.add_argument("--images", nargs="*", default=[], help="face crops (files or folders) to verify on")
    ap.add_argument("--min-cosine", type=float, default=0.9999)
    args = ap.parse_args(argv)
    import cv2

    if args.images and not hasattr(cv2.dnn, "readNetFromTensorflow"):
        ap.error(f"--images needs OpenCV's TensorFlow importer, which OpenCV {cv2.__version__} no longer has "
                 "(removed in 5.1): run this tool where pip install 'opencv-python-headless<5.1' was done")

    graph = read_graph(args.graph)
    mapping = map_tf_graph(graph)
    print_mapping(graph, mapping)
    failed = check_conv_attributes(graph, mapping) > 0
    state = convert_tf_graph({args.graph.name: args.graph})
    print(f"# converted: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values")
    if args.out:
        torch.save(state, args.out)
        print(f"# saved {args.out}")
    images = list(expand_paths(args.images))
    if images:
        failed |= not verify_with_opencv(args.graph, state, images, args.min_cosine)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
