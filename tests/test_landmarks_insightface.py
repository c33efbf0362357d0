"""insightface's 2d106det landmarker (tidyface/models/landmarks.py): the ONNX conversion through
tidyface's reader, parity with onnxruntime on the raw outputs and with insightface 0.7.3's own
`Landmark.get` after decoding, on real photos and detector boxes.

What this proves, and what it does not. 2d106det.onnx is not on these machines (no package or
mirror here carries it), so every check runs on a stand-in (landmark_standins.py, random weights)
written with the layer names, shapes and ops that public code gives the file: fmobilenet-0.5 +
conv_15 + fc1, mxnet's initializer names, in-graph `_minusscalar0` / `_mulscalar0`. Proven: that
such a graph converts with every initializer and node accounted for, that tidyface then computes
what onnxruntime computes from it, and that the whole step (crop, blob, decode, map back) gives
the points insightface's Landmark gives. Not proven: that the real file has exactly this layout
(the IR version, opset, PRelu slope shape and the Flatten before fc1 are this stand-in's choices;
a real file that differs is refused with an OnnxError naming it and what did not fit), nor any
accuracy of the real weights.

Measured (one thread each for torch and onnxruntime): raw outputs vs onnxruntime, max abs diff
1.5e-6 on 10 crops (insightface's own crops of the faces below, and noise; outputs up to 1.1;
tolerance 1e-4, DESIGN.md's fp32 parity); points vs Landmark.get on t1.jpg and astronaut.png
(scrfd_500m's 7 boxes plus a box over astronaut's edge: 8 faces, one batched call) max 0.0206 px
(tolerance 0.5 px); our crops vs insightface's cv2.warpAffine crops: at most 1 grey level apart
(cv2 interpolates in fixed point), on 0.01% of the values. The 3-D decoding (x, y, z from 3309
outputs, the last 68 rows, as insightface reads 1k3d68's output) on a 3309-output stand-in
without in-graph normalisation (so insightface, and the converter, take mean 127.5, std 128):
max 0.0145 px.
"""
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from conftest import MEDIA, WEIGHTS, need, reference
from landmark_standins import LAYERS, coordreg_onnx
from tidyface.convert.onnx import OnnxError, read_onnx
from tidyface.models.landmarks import (INPUT_SIZE, CoordRegMobileNet, convert_onnx, crop_matrices,
                                       decode_points, insightface_blob_norm, map_onnx)
from tidyface.ops.align import warp
from tidyface.types import Detections
from tidyface.weights import load_model

cv2 = reference("cv2")
ort = reference("onnxruntime")
onnx = reference("onnx")

RAW_TOL = 1e-4  # max abs difference of fc1 outputs (DESIGN.md: fp32 parity)
PX_TOL = 0.5  # points, in pixels


class SimilarityTransform:
    """scikit-image's transform.SimilarityTransform as far as insightface's face_align.transform
    uses it, written from its definition: from a scale, a rotation (radians) and a translation,
    params = [[s cos r, -s sin r, tx], [s sin r, s cos r, ty], [0, 0, 1]]; `a + b` applies a, then
    b. CI installs insightface with --no-deps, so without scikit-image: this stands in there."""

    def __init__(self, matrix=None, scale=None, rotation=None, translation=None):
        if matrix is None:
            s, r = 1.0 if scale is None else float(scale), 0.0 if rotation is None else float(rotation)
            tx, ty = (0.0, 0.0) if translation is None else translation
            matrix = [[s * np.cos(r), -s * np.sin(r), tx], [s * np.sin(r), s * np.cos(r), ty], [0, 0, 1]]
        self.params = np.asarray(matrix, np.float64)

    def __add__(self, other):
        return SimilarityTransform(other.params @ self.params)


def _stand_ins(root: str) -> dict:
    """Modules for the import of insightface's landmark.py alone: its parent packages as bare
    packages (their __init__ imports albumentations and more), scikit-image where absent."""
    out = {}
    for name, sub in (("insightface", ""), ("insightface.model_zoo", "/model_zoo")):
        out[name] = types.ModuleType(name)
        out[name].__path__ = [root + sub]
    if importlib.util.find_spec("skimage") is None:
        out["skimage"], out["skimage.transform"] = types.ModuleType("skimage"), types.ModuleType("skimage.transform")
        out["skimage.transform"].SimilarityTransform = SimilarityTransform
        out["skimage"].transform = out["skimage.transform"]
    return out


def insightface_landmark():
    """insightface 0.7.3's Landmark class, loaded from the installed package with the stand-ins
    above for the import only, removed again so that no other test sees them."""
    if "insightface.model_zoo.landmark" in sys.modules:
        return sys.modules["insightface.model_zoo.landmark"].Landmark
    found = importlib.util.find_spec("insightface")
    if found is None:  # reference() skips, or fails under CI, naming the package
        reference("insightface")
    stand_ins = _stand_ins(found.submodule_search_locations[0])
    saved = {k: sys.modules.get(k) for k in stand_ins}
    before = set(sys.modules)
    try:
        sys.modules.update(stand_ins)
        return importlib.import_module("insightface.model_zoo.landmark").Landmark
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("insightface"):
                del sys.modules[name]
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module


class Face(dict):
    """What Landmark.get takes: a dict (it stores its result under the task name) with a box."""

    def __init__(self, bbox):
        super().__init__()
        self.bbox = np.asarray(bbox, np.float32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread each for torch and onnxruntime: on 2 shared cores, two threads' convolutions
    wait on each other (the photos' detection took 11 s, not 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def reference_landmark(path):
    return insightface_landmark()(model_file=str(path), session=session(path))


def tidy_model(path, num_outputs=212, num_points=106) -> CoordRegMobileNet:
    model = CoordRegMobileNet(num_outputs, num_points)
    model.load_state_dict(convert_onnx(path, num_outputs, num_points), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm106") / "2d106det.onnx"
    coordreg_onnx(path)
    return path


@pytest.fixture(scope="module")
def photos():
    """t1.jpg (6 faces) and astronaut.png as BGR (as upstream reads them) and as one RGB batch
    (zero-padded to one size: a crop that reaches past an image reads black either way, as
    cv2.warpAffine's border), with scrfd_500m's boxes and one more box over astronaut's edge."""
    bgr = [cv2.imread(str(need(MEDIA / p))) for p in ("insightface_wheel/t1.jpg", "skimage/astronaut.png")]
    need(WEIGHTS / "det_500m.onnx")
    detector = load_model("scrfd_500m")
    h, w = max(b.shape[0] for b in bgr), max(b.shape[1] for b in bgr)
    batch = torch.zeros(len(bgr), 3, h, w, dtype=torch.uint8)
    for frame, b in zip(batch, bgr):
        frame[:, :b.shape[0], :b.shape[1]] = torch.from_numpy(cv2.cvtColor(b, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
    parts = [detector.detect(frame[None, :, :b.shape[0], :b.shape[1]]).shift_images(i)
             for i, (frame, b) in enumerate(zip(batch, bgr))]
    edge = Detections(torch.tensor([[400.0, 300.0, 530.0, 470.0]]), torch.ones(1), None, torch.tensor([1]))
    dets = Detections.cat(parts + [edge])
    dets = Detections(dets.boxes, dets.scores, None, dets.image_index)
    assert torch.bincount(dets.image_index).tolist() == [6, 2]
    return bgr, batch, dets


def test_converter_accounts_for_every_initializer_and_node(standin):
    with torch.device("meta"):
        walk = map_onnx(standin, CoordRegMobileNet())
    uses = walk.tracker.uses
    assert len(uses) == len(read_onnx(standin).initializers) == 6 * len(LAYERS) + 4
    assert uses["scalar_op1"] == ["input_shift"] and uses["scalar_op2"] == ["input_scale"]
    assert uses["conv_1_conv2d_weight"] == ["stem.conv.weight"]
    assert uses["conv_2_dw_batchnorm_moving_var"] == ["units.0.depthwise.bn.running_var"]
    assert uses["conv_14_relu_gamma"] == ["units.12.pointwise.act.weight"]
    assert uses["conv_15_batchnorm_gamma"] == ["head.bn.weight"]
    assert uses["fc1_weight"] == ["fc.weight"] and uses["fc1_bias"] == ["fc.bias"]
    state = walk.state_dict()
    assert float(state["input_shift"]) == 127.5 and float(state["input_scale"]) == 0.0078125
    # what insightface reads from this graph: it normalises itself, so the blob is the pixels
    assert (float(state["blob_mean"]), float(state["blob_std"])) == (0.0, 1.0)
    assert reference_landmark(standin).input_mean == 0.0


def _edited(standin, tmp_path, edit) -> str:
    model = onnx.load(str(standin))
    edit(model.graph)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_other_layouts_are_refused_naming_the_file(standin, tmp_path):
    def extra_initializer(g):
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "conv_16_conv2d_weight"))

    def other_epsilon(g):
        next(n for n in g.node if n.name == "conv_3_batchnorm").attribute[0].f = 2e-5

    def extra_op(g):  # a ReLU between conv_15 and fc1: a graph that computes something else
        relu = onnx.helper.make_node("Relu", ["conv_15_relu"], ["relu_x"], name="relu_x")
        next(n for n in g.node if n.op_type == "Flatten").input[0] = "relu_x"
        g.node.append(relu)

    cases = [(extra_initializer, "1 initializers were not converted.*conv_16_conv2d_weight"),
             (other_epsilon, "conv_3_batchnorm .*epsilon 2e-05.*units.1.pointwise"),
             (extra_op, "expected a Flatten|expected a Gemm|not part of this layout")]
    for edit, message in cases:
        path = _edited(standin, tmp_path, edit)
        with pytest.raises(OnnxError, match=f"{path}.*({message})"):
            convert_onnx(path)
    det = need(WEIGHTS / "det_500m.onnx")  # a real insightface graph of another layout
    with pytest.raises(OnnxError, match=str(det)):
        convert_onnx(det)


def _cv2_crops(bgr, dets):
    """insightface's crops (Landmark.get's face_align.transform), as RGB float (N,3,S,S)."""
    mats = crop_matrices(dets.boxes, INPUT_SIZE).numpy()
    crops = [cv2.warpAffine(bgr[i], m[:2], (INPUT_SIZE, INPUT_SIZE), borderValue=0.0)
             for i, m in zip(dets.image_index.tolist(), mats)]
    return np.stack([cv2.cvtColor(c, cv2.COLOR_BGR2RGB) for c in crops]).transpose(0, 3, 1, 2).astype(np.float32)


def test_raw_outputs_match_onnxruntime(standin, photos):
    bgr, _, dets = photos
    model = tidy_model(standin)
    crops = _cv2_crops(bgr, dets)
    noise = np.random.default_rng(3).uniform(0, 255, (2, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    blob = np.concatenate([crops, noise])
    want = session(standin).run(None, {"data": blob})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(blob)).numpy()
    diff = float(np.abs(got - want).max())
    print(f"\n2d106det stand-in: raw max abs diff vs onnxruntime {diff:.1e} over {blob.shape[0]} crops "
          f"(|output| up to {np.abs(want).max():.2f})")
    assert got.shape == (len(blob), 212) and diff <= RAW_TOL


def test_points_match_insightface_landmark(standin, photos):
    """One batched call over both photos' faces against Landmark.get face by face; the crops
    (one batched warp) against insightface's cv2.warpAffine crops."""
    bgr, batch, dets = photos
    model = tidy_model(standin)
    ref = reference_landmark(standin)
    ours = model.landmarks(batch, dets)
    theirs = np.stack([ref.get(bgr[i], Face(box)) for i, box in zip(dets.image_index.tolist(), dets.boxes.numpy())])
    diff = float(np.abs(ours.landmarks.numpy() - theirs).max())
    crops = warp(batch, crop_matrices(dets.boxes), dets.image_index, (INPUT_SIZE, INPUT_SIZE)).round().numpy()
    crop_diff = np.abs(crops - _cv2_crops(bgr, dets))
    print(f"\n2d106det stand-in: {len(dets)} faces, points max |ours - insightface| {diff:.4f} px; crops "
          f"max {crop_diff.max():.0f} grey levels apart on {100 * (crop_diff > 0).mean():.2f}% of the values")
    assert ours.landmarks.shape == (len(dets), 106, 2) and diff <= PX_TOL
    assert crop_diff.max() <= 1 and (crop_diff > 0).mean() < 0.01
    assert torch.equal(ours.boxes, dets.boxes) and torch.equal(ours.image_index, dets.image_index)
    # one image alone: its warp reads only the faces' region (ops.align), whose float
    # coordinates differ in the last bits, so a few 8-bit crop values round the other way
    alone = model.landmarks(batch[1:], dets.for_image(1).shift_images(-1)).landmarks
    torch.testing.assert_close(alone, ours.landmarks[dets.image_index == 1], rtol=0, atol=0.1)
    empty = model.landmarks(batch, Detections.empty(num_landmarks=None))
    assert empty.landmarks.shape == (0, 106, 2)


def test_3d_decoding_matches_insightface(photos, tmp_path):
    """insightface's 3-D path (an output of >= 3000 values: 1k3d68's 3309) on a stand-in with
    3309 outputs and no in-graph normalisation: the converter then takes insightface's 127.5 / 128
    blob, and decode_points gives Landmark.get's (68,3) points, z scaled as upstream scales it."""
    path = tmp_path / "coordreg3309.onnx"
    coordreg_onnx(path, num_outputs=3309, normalise_inside=False, seed=1, initializers_as_inputs=True)
    assert insightface_blob_norm(read_onnx(path)) == (127.5, 128.0)
    bgr, batch, dets = photos
    model = tidy_model(path, 3309, 68)
    ref = reference_landmark(path)
    assert (ref.input_mean, ref.input_std, ref.lmk_dim, ref.lmk_num) == (127.5, 128.0, 3, 68)
    mats = crop_matrices(dets.boxes)
    crops = warp(batch, mats, dets.image_index, (INPUT_SIZE, INPUT_SIZE)).round()
    with torch.no_grad():
        raw = model((crops - model.blob_mean) / model.blob_std)
    ours = decode_points(raw, mats, 68).numpy()
    theirs = np.stack([ref.get(bgr[i], Face(box)) for i, box in zip(dets.image_index.tolist(), dets.boxes.numpy())])
    diff = float(np.abs(ours - theirs).max())
    print(f"\n3-D decoding: {len(dets)} faces, (x, y, z) max |ours - insightface| {diff:.4f} px")
    assert ours.shape == (len(dets), 68, 3) and diff <= PX_TOL
    torch.testing.assert_close(model.landmarks(batch, dets).landmarks, torch.from_numpy(ours[..., :2]))


def test_similarity_stand_in_composes_as_face_align_needs():
    """The scikit-image stand-in: scale, then translate, then rotate, then translate, as
    face_align.transform chains them, against the closed form; and against scikit-image itself
    where it is installed (locally; CI does not install it)."""
    s, (cx, cy), r = 0.7, (40.0, -12.5), 0.3
    chain = lambda cls: (cls(scale=s) + cls(translation=(-cx * s, -cy * s)) + cls(rotation=r)  # noqa: E731
                         + cls(translation=(96.0, 96.0))).params
    rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    want = np.eye(3)
    want[:2, :2], want[:2, 2] = rot * s, rot @ [-cx * s, -cy * s] + 96.0
    np.testing.assert_allclose(chain(SimilarityTransform), want, atol=1e-12)
    if importlib.util.find_spec("skimage") is not None:
        from skimage import transform

        np.testing.assert_allclose(chain(SimilarityTransform), chain(transform.SimilarityTransform), atol=1e-12)
