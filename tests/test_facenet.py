"""FaceNet InceptionResnetV1: the GraphDef reader on hand-encoded bytes, parity with
facenet-pytorch on shared random weights, and parity with OpenCV DNN on graph_final.pb."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch
from conftest import MEDIA, WEIGHTS, need, opencv_with_tf_importer

from tidyface.convert.tf_graphdef import GraphDefError, Node, parse_graphdef, read_constants, read_graph
from tidyface.models import facenet
from tidyface.ops.image import read_image, to_tensor_batch
from tidyface.registry import get
from tidyface.weights import load_model

CROPS = MEDIA / "facenet_pytorch" / "test_images_aligned"


# --- a minimal protobuf writer, independent of the reader under test --------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative ints are 10-byte two's complement on the wire
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def vfield(num: int, n: int) -> bytes:
    return varint(num << 3) + varint(n)


def lfield(num: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def tensor(dtype: int, shape: list[int], *fields: bytes) -> bytes:
    dims = b"".join(lfield(2, vfield(1, d)) for d in shape)
    return vfield(1, dtype) + lfield(2, dims) + b"".join(fields)


def node(name: str, op: str, inputs=(), attrs: dict[str, bytes] | None = None) -> bytes:
    body = lfield(1, name) + lfield(2, op) + b"".join(lfield(3, i) for i in inputs)
    for key, attr in (attrs or {}).items():
        body += lfield(5, lfield(1, key) + lfield(2, attr))
    return lfield(1, body)


def const(name: str, tensor_bytes: bytes) -> bytes:
    return node(name, "Const", attrs={"dtype": vfield(6, 1), "value": lfield(8, tensor_bytes)})


def test_graphdef_reader_on_hand_encoded_graph():
    content = np.arange(6, dtype="<f4").reshape(2, 3) - 2.5
    graph = (
        vfield(4, 27)  # a GraphDef-level varint field the reader must skip
        + const("packed", tensor(1, [2], lfield(5, struct.pack("<2f", 1.5, -2.0))))
        + const("raw", tensor(1, [2, 3], lfield(4, content.tobytes())))
        # unpacked float_val (one fixed32 per entry) and TF's fill-with-last-value compaction
        + const("filled", tensor(1, [2, 2], varint(5 << 3 | 5) + struct.pack("<f", 0.25)))
        + const("neg_int", tensor(3, [], vfield(7, -3)))
        + const("int64s", tensor(9, [3], lfield(10, varint(7) + varint(-1) + varint(1 << 40))))
        + node("y", "Add", ["packed", "raw:0"],
               {"T": vfield(6, 1), "padding": lfield(2, "SAME"), "epsilon": varint(4 << 3 | 5)
                + struct.pack("<f", 0.001), "strides": lfield(1, lfield(3, b"".join(map(varint, [1, 2, 2, 1]))))})
    )
    nodes = {n.name: n for n in parse_graphdef(graph)}
    assert list(nodes) == ["packed", "raw", "filled", "neg_int", "int64s", "y"]
    np.testing.assert_array_equal(nodes["packed"].value, np.array([1.5, -2.0], np.float32))
    np.testing.assert_array_equal(nodes["raw"].value, content)
    np.testing.assert_array_equal(nodes["filled"].value, np.full((2, 2), 0.25, np.float32))
    assert nodes["neg_int"].value.shape == () and nodes["neg_int"].value.dtype == np.int32
    assert int(nodes["neg_int"].value) == -3
    np.testing.assert_array_equal(nodes["int64s"].value, np.array([7, -1, 1 << 40], np.int64))
    y = nodes["y"]
    assert (y.op, y.inputs, y.value) == ("Add", ["packed", "raw:0"], None)
    assert y.attrs["padding"] == "SAME" and y.attrs["strides"] == [1, 2, 2, 1]
    assert y.attrs["T"] == 1 and y.attrs["epsilon"] == pytest.approx(0.001)

    with pytest.raises(GraphDefError, match="past the end"):
        parse_graphdef(graph[:-3])
    with pytest.raises(GraphDefError, match="values for shape"):
        parse_graphdef(const("bad", tensor(1, [3], lfield(4, b"\0" * 8))))


def test_read_constants_on_file(tmp_path):
    p = tmp_path / "g.pb"
    p.write_bytes(const("w", tensor(1, [1], lfield(5, struct.pack("<f", 3.0)))) + node("x", "Placeholder"))
    assert {k: v.tolist() for k, v in read_constants(p).items()} == {"w": [3.0]}
    (tmp_path / "junk.pb").write_bytes(b"\x0f\xff")
    with pytest.raises(GraphDefError, match="junk.pb"):
        read_constants(tmp_path / "junk.pb")


# --- parity --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crops():
    paths = sorted(need(CROPS).glob("*/*.png"))
    assert len(paths) >= 5
    images = [read_image(p) for p in paths]
    assert all(im.shape == (160, 160, 3) for im in images)
    return paths, facenet.preprocess(to_tensor_batch(images))


def test_preprocess_is_fixed_standardisation():
    x = torch.tensor([0, 127.5, 255], dtype=torch.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(facenet.preprocess(x).flatten().numpy(), [-127.5 / 128, 0, 127.5 / 128])
    assert facenet.preprocess(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)).dtype == torch.float32


def test_parity_with_facenet_pytorch_on_random_weights(crops, tmp_path):
    import refshim

    refshim.install()
    from facenet_pytorch import InceptionResnetV1 as Reference

    _, x = crops
    torch.manual_seed(0)
    ref = Reference(pretrained=None, classify=False)
    bns = [m for m in ref.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    with torch.no_grad():
        # Random affine BN, running stats from these crops (so a random net still tells the faces
        # apart, instead of mapping all of them to one direction), then perturbed at random.
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
            m.momentum = 1.0
        ref.train()
        ref(x)
        for m in bns:
            m.running_mean.add_(torch.randn_like(m.running_mean) * 0.1 * m.running_var.sqrt())
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
    ref.eval()
    state = dict(ref.state_dict())
    state["logits.weight"], state["logits.bias"] = torch.randn(7, 512), torch.randn(7)  # dropped
    ckpt = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(state, ckpt)

    converted = get("facenet_vggface2").spec.converter({ckpt.name: ckpt})
    ours = facenet.InceptionResnetV1()
    ours.load_state_dict(converted, strict=True)
    ours.eval()
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (len(x), 512)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(x)))
    off_diagonal = (want @ want.T)[~torch.eye(len(x), dtype=torch.bool)]
    assert off_diagonal.max() < 0.95, "random reference collapsed: the comparison would prove nothing"
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff:.2e}"


@pytest.fixture(scope="module")
def tf_embeddings(crops):
    need(WEIGHTS / "graph_final.pb")
    model = load_model("facenet_casia_tf")  # converts graph_final.pb once for this module
    with torch.no_grad():
        return model(crops[1])


def test_graph_final_mapping_uses_every_weight():
    graph = read_graph(need(WEIGHTS / "graph_final.pb"))
    mapping = facenet.map_tf_graph(graph)
    consts = [n for n, v in graph.items() if v.op == "Const"]
    assert len(mapping.mapped) == 2 * 132 + 5  # 132 Conv2D weight+bias; bottleneck weight + 4 BN
    assert len(mapping.mapped) + len(mapping.residual_scales) + len(mapping.unused) == len(consts)
    assert len(mapping.residual_scales) == 5 + 10 + 5 + 1
    assert mapping.bn_eps == pytest.approx(1e-3)

    stray = "InceptionResnetV1/Extra/weights"  # an unmapped weight must stop the conversion
    extra = {**graph, stray: Node(stray, "Const", attrs={"value": np.zeros(3, np.float32)})}
    with pytest.raises(ValueError, match="Extra/weights"):
        facenet.map_tf_graph(extra)
    missing = {k: v for k, v in graph.items() if k != "InceptionResnetV1/Block8/Conv2d_1x1/biases"}
    with pytest.raises(ValueError, match="block8_final.project.bias"):
        facenet.map_tf_graph(missing)


OPENCV_EMBEDDINGS = """
import sys
import numpy as np
import cv2
pb, out, *paths = sys.argv[1:]
net = cv2.dnn.readNetFromTensorflow(pb)
rows = []
for path in paths:
    # The graph's flatten is fixed to batch 1; OpenCV takes NCHW and feeds the NHWC graph.
    blob = cv2.dnn.blobFromImage(cv2.imread(path), 1 / 128, (160, 160), (127.5,) * 3, swapRB=True)
    net.setInput(blob, "input")
    rows.append(net.forward("embeddings")[0])
np.save(out, np.stack(rows))
print(cv2.__version__)
"""


def test_parity_with_opencv_dnn_on_graph_final(crops, tf_embeddings, tmp_path):
    import subprocess
    import sys

    site = opencv_with_tf_importer(tmp_path)
    paths, _ = crops
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "opencv.npy"
    done = subprocess.run([sys.executable, "-c", OPENCV_EMBEDDINGS, str(WEIGHTS / "graph_final.pb"), str(out),
                           *map(str, paths)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    opencv = f"OpenCV {done.stdout.strip()}"
    want, ours = np.load(out), tf_embeddings.numpy()
    assert want.shape == ours.shape, opencv
    for path, w, o in zip(paths, want, ours):
        cosine = float(w @ o / np.linalg.norm(w) / np.linalg.norm(o))
        assert cosine >= 0.9999, f"{path.parent.name}: cosine {cosine:.6f} against {opencv}"
        assert np.abs(w - o).max() < 1e-5, opencv


def test_tf_embeddings_separate_identities(tf_embeddings):
    """Real weights on five different people: all pairs well below same-person similarity."""
    e = tf_embeddings
    torch.testing.assert_close(e.norm(dim=1), torch.ones(len(e)))
    sims = e @ e.T
    assert sims[~torch.eye(len(e), dtype=torch.bool)].max() < 0.6


def test_registered_variants_describe_their_inputs():
    for name in ("facenet_vggface2", "facenet_casia", "facenet_casia_tf"):
        spec = get(name).spec
        assert spec.task == "embed"
        assert spec.meta.input_size == (160, 160) and spec.meta.embedding_dim == 512
        assert all(len(f.sha256) == 64 and f.size > 0 for f in spec.files)
