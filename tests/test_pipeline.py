"""The seams: result types, crop geometry, the one warp path, options and errors, the model cache."""
import numpy as np
import pytest
import torch

from tidyface.cache import ModelCache
from tidyface.cli import command
from tidyface.errors import TidyfaceError, UsageError
from tidyface.ops.align import template_for, umeyama
from tidyface.ops.markup import reduce_to_five
from tidyface.options import CropOptions, DetectOptions, Video2FacesOptions
from tidyface.tasks import pipeline as pl
from tidyface.types import Detections, Faces, FaceTable


def dets(n, landmarks=5, image=0):
    g = torch.Generator().manual_seed(n * 10 + (landmarks or 0))
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 40 + torch.rand(n, 2, generator=g) * 20], 1)
    lm = None if landmarks is None else xy[:, None] + 10 + torch.rand(n, landmarks, 2, generator=g) * 30
    return Detections(boxes, torch.rand(n, generator=g), lm, torch.full((n,), image, dtype=torch.long))


def test_cat_keeps_landmarks_of_parts_that_have_them():
    joined = Detections.cat([dets(2), dets(3, None), dets(1)])
    assert joined.landmarks.shape == (6, 5, 2)
    assert torch.isnan(joined.landmarks[2:5]).all() and not torch.isnan(joined.landmarks[:2]).any()
    assert Detections.cat([dets(2, None), dets(1, None)]).landmarks is None
    with pytest.raises(ValueError, match="landmarks per face"):
        Detections.cat([dets(2), dets(2, 68)])
    d68 = dets(3, 68)
    torch.testing.assert_close(d68.five_points(), reduce_to_five(d68.landmarks).float())


def test_alignment_fits_points_and_frames_pointless_faces_by_their_box():
    points = template_for(112)
    d = Detections.cat([dets(3), dets(2, None)])
    m = pl.Alignment((112, 112), points).matrices(d)
    torch.testing.assert_close(m[:3], umeyama(d.landmarks[:3].double(), points))
    assert torch.allclose(m[3:, 0, 1], torch.zeros(2, dtype=torch.float64))  # no rotation
    centre = torch.cat([(d.boxes[3:, :2] + d.boxes[3:, 2:]) / 2, torch.ones(2, 1)], 1).double()
    mapped = (m[3:] @ centre[..., None])[:, :2, 0]
    want = (points.amin(0) + points.amax(0)) / 2
    torch.testing.assert_close(mapped, want.expand(2, 2))


def test_one_warp_path_batched_or_per_image_gives_the_same_crops():
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 255, (3, 150, 170), dtype=np.uint8)) for _ in range(3)]
    d = Detections.cat([dets(2, image=0), dets(1, image=2), dets(3, image=1)])
    geometry = pl.Alignment((64, 64), template_for(64))
    a = pl.align(images, d, geometry)  # 8-bit frames: one call per frame (their footprints only)
    b = pl.align([im.float() for im in images], d, geometry)  # float: one batched call
    assert a.crops.shape == (6, 3, 64, 64) and torch.equal(a.image_index, d.image_index)
    # the footprint's own sampling grid rounds differently in float32: measured 0.0025 levels
    assert (a.crops - b.crops).abs().max() < 0.01
    none = pl.align(images, Detections.empty(), geometry)
    assert none.crops.shape == (0, 3, 64, 64)


def test_face_table_round_trip_and_join(tmp_path):
    faces = Faces(torch.zeros(2, 3, 8, 8), torch.eye(3, dtype=torch.float64).repeat(2, 1, 1), dets(2),
                  embeddings=torch.nn.functional.normalize(torch.randn(2, 4), dim=1), hashes=torch.tensor([1, 2]),
                  quality=torch.tensor([3.0, 4.0], dtype=torch.float64))
    t = FaceTable.from_faces(faces, name=["a.jpg", "b.jpg"], source=["x.png"] * 2)
    t.save(tmp_path / "t.npz")
    u = FaceTable.load(tmp_path / "t.npz")
    assert list(u.name) == ["a.jpg", "b.jpg"] and u.embeddings.shape == (2, 4) and list(u.hash) == [1, 2]
    none = FaceTable.from_faces(Faces(torch.zeros(1, 3, 8, 8), torch.eye(3)[None], dets(1, None)))
    assert none.landmarks.shape == (1, 0, 2)  # a detector without landmarks
    both = FaceTable.cat([u.select(np.array([0])), FaceTable.build(1, dim=4, num_landmarks=0)])
    assert both.landmarks.shape == (2, 5, 2) and np.isnan(both.landmarks[1]).all()
    with pytest.raises(ValueError, match="not a tidyface face table"):
        np.savez(tmp_path / "other.npz", x=np.zeros(2))
        FaceTable.load(tmp_path / "other.npz")


@pytest.mark.parametrize("word,value", [("true", True), ("Yes", True), ("1", True), (1, True), ("false", False),
                                        ("no", False), ("0", False), (False, False)])
def test_booleans_take_true_false_yes_no_1_0(word, value):
    assert CropOptions(out="o", overwrite=word).overwrite is value


def test_values_are_checked_and_named_before_any_work():
    with pytest.raises(UsageError, match="--overwrite takes true or false"):
        CropOptions(out="o", overwrite="maybe")
    with pytest.raises(UsageError, match="--batch-size needs a whole number"):
        DetectOptions(batch_size="8.5")
    with pytest.raises(UsageError, match="--batch-size must be >= 1"):
        DetectOptions(batch_size=0)
    with pytest.raises(UsageError, match="--det-scale needs 4 numbers"):
        Video2FacesOptions(input="v.mp4", det_scale="1,2")
    assert DetectOptions(batch_size="8").batch_size == 8
    assert CropOptions(out=2024).out == "2024"  # fire reads a folder named 2024 as a number
    assert CropOptions(out="o", output_size=(300, 200)).output_size == "300,200"
    v = Video2FacesOptions(input="v.mp4", video_area="0,140,1920,940")
    assert v.video_area == (0, 140, 1920, 940) and v.replace(det_size=0).video_area == v.video_area


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    def refuse(_, o):
        raise UsageError("--thing is wrong; do this instead")

    def bug(_, o):
        raise ValueError("an internal mistake")

    with pytest.raises(SystemExit) as e:
        command(DetectOptions, refuse, "x", "paths")("a.jpg")
    assert e.value.code == 2 and capsys.readouterr().err == "tidyface: error: --thing is wrong; do this instead\n"
    with pytest.raises(ValueError, match="internal mistake"):
        command(DetectOptions, bug, "x", "paths")("a.jpg")
    with pytest.raises(SystemExit):
        command(DetectOptions, bug, "x", "paths")("a.jpg", batch_size="many")
    assert "--batch-size needs a whole number" in capsys.readouterr().err
    assert issubclass(UsageError, TidyfaceError)


def test_model_cache_shares_models_and_holds_at_most_its_capacity(monkeypatch):
    import tidyface.cache as cache

    loads = []
    monkeypatch.setattr(cache, "_load_for_inference", lambda name, dev, wd: loads.append(name) or object())
    c = ModelCache(capacity=2)
    a = c.get("a", "cpu")
    assert c.get("a", torch.device("cpu")) is a and loads == ["a"]
    c.get("b", "cpu")
    c.get("a", "cpu")  # a is now the most recent
    c.get("c", "cpu")  # evicts b
    assert len(c) == 2 and c.get("a", "cpu") is a and loads == ["a", "b", "c"]
    c.get("b", "cpu")
    assert loads == ["a", "b", "c", "b"]
    with pytest.raises(ValueError):
        ModelCache(-1)


def test_detector_settings_are_per_call():
    from tidyface.weights import load_model

    net = load_model("retinaface_mnet025", pretrained=False)
    state = {k: v for k, v in vars(net).items() if not k.startswith("_")}
    net.detect(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), min_score=0.01, max_size=32)
    assert {k: v for k, v in vars(net).items() if not k.startswith("_")} == state
    assert not hasattr(net, "min_score") and not hasattr(net, "max_size")
