"""Attribute and mask groups (tasks/attributes.py): the flag syntax, the face-crop-plus membership
rule on synthetic class maps, `tidyface crop --attr-groups/--mask-groups` end to end, and the
glasses group's precision and recall on faces of ../shared/media labelled by eye.
"""
import json

import numpy as np
import pytest
import torch

from conftest import MEDIA, WEIGHTS, need, pypi_upstream
from tidyface import registry
from tidyface.errors import UsageError
from tidyface.models.bisenet import CLASS_NAMES
from tidyface.tasks.attributes import (ClassGroup, Routing, attribute_members, class_shares,
                                       read_groups)

CLS = {n: i for i, n in enumerate(CLASS_NAMES)}


def test_group_syntax_text_json_file_and_names(tmp_path):
    want = (ClassGroup("glasses", (6,)), ClassGroup("hat_no_glasses", (18,), (6,)))
    assert read_groups("glasses=6;hat_no_glasses=18,-6", "--attr-groups", CLASS_NAMES) == want
    assert read_groups("glasses=[6]; hat_no_glasses=[18, -6];", "--attr-groups", CLASS_NAMES) == want
    assert read_groups('{"glasses": [6], "hat_no_glasses": [18, -6]}', "--attr-groups", CLASS_NAMES) == want
    assert read_groups({"glasses": [6], "hat_no_glasses": [18, -6]}, "--attr-groups", CLASS_NAMES) == want
    assert read_groups("glasses=eye_g;hat_no_glasses=hat,-eye_g", "--attr-groups", CLASS_NAMES) == want
    f = tmp_path / "groups.json"
    f.write_text(json.dumps({"no_accessories": [-6, -9, -15, -18]}))
    assert read_groups(str(f), "--attr-groups", CLASS_NAMES) == (ClassGroup("no_accessories", (), (6, 9, 15, 18)),)
    assert read_groups(None, "--attr-groups", CLASS_NAMES) == read_groups("", "--attr-groups", CLASS_NAMES) == ()


@pytest.mark.parametrize("value, flag, words", [
    ("glasses", "--attr-groups", "not name=classes"),
    ("glasses=19", "--attr-groups", "outside 0-18"),
    ("glasses=specs", "--attr-groups", "neither a class index"),
    ("x/y=6", "--attr-groups", "must be letters"),
    ("nose_mask=10", "--mask-groups", "not end in _mask"),
    ("nose=10,-6", "--mask-groups", "no negative indices"),
    ("bad=-0", "--attr-groups", "-K with K >= 1"),
    ('{"glasses": [6]', "--attr-groups", "not valid JSON"),
    ("missing.json", "--attr-groups", "cannot read missing.json"),
])
def test_group_syntax_errors_name_the_flag(value, flag, words):
    with pytest.raises(UsageError) as e:
        read_groups(value, flag, CLASS_NAMES, negatives=flag == "--attr-groups")
    assert str(e.value).startswith(flag) and words in str(e.value)


def test_membership_rule():
    """Every positive class must cover the share, no negative one may (face-crop-plus's rule)."""
    maps = torch.zeros(4, 100, 100, dtype=torch.uint8)
    maps[0, :1, :50] = CLS["eye_g"]                       # glasses, 0.5%
    maps[1, :1, :50] = CLS["eye_g"]
    maps[1, 1:3, :] = CLS["hat"]                          # glasses and a hat
    maps[2, 1:3, :] = CLS["hat"]                          # a hat only
    maps[3, :1, :5] = CLS["eye_g"]                        # 5 stray pixels (0.05%)
    shares = class_shares(maps, 19)
    assert shares.sum(1).allclose(torch.ones(4)) and float(shares[0, CLS["eye_g"]]) == pytest.approx(0.005)
    groups = read_groups("glasses=6;hat_no_glasses=18,-6;no_accessories=-6,-9,-15,-18", "x", CLASS_NAMES)
    got = attribute_members(shares, groups, share=0.001)
    assert got.tolist() == [[True, False, False], [True, False, False], [False, True, False], [False, False, True]]


def test_routing_layout():
    """Attribute folders first, mask folders inside each; a mask below the share is not written."""
    maps = torch.zeros(2, 10, 10, dtype=torch.uint8)
    maps[0, 0, :5] = CLS["eye_g"]
    maps[0, 5:7, :] = CLS["nose"]
    maps[1, 5:7, :] = CLS["nose"]
    r = Routing(read_groups("glasses=6;plain=-6", "x", CLASS_NAMES),
                read_groups("nose=10;eyes=4,5", "x", CLASS_NAMES, negatives=False), share=0.01)
    routes = r.routes(maps)
    assert [[folder for folder, _ in face] for face in routes] == [["glasses/nose"], ["plain/nose"]]
    assert int(routes[0][0][1].sum()) == 20
    only_masks = Routing(mask=read_groups("nose=10", "x", CLASS_NAMES, negatives=False), share=0.01)
    assert [[f for f, _ in face] for face in only_masks.routes(maps)] == [["nose"], ["nose"]]


@pytest.fixture(scope="module")
def parser_weights():
    return pypi_upstream(registry.get("bisenet_celebamask").spec)


def test_crop_command_writes_groups_and_masks(tmp_path, parser_weights):
    from tidyface.cli import main
    from tidyface.ops.image import read_image

    need(WEIGHTS / "mobilenet0.25_Final.pth")
    src = tmp_path / "in"
    src.mkdir()
    for name in ("img24.jpg", "img1.jpg"):  # a face with glasses, one without
        (src / name).write_bytes(need(MEDIA / "deepface_pairs" / name).read_bytes())
    out = tmp_path / "out"
    main(["crop", str(src), "--out", str(out), "--attr-groups", "glasses=6;no_glasses=-6",
          "--mask-groups", "nose=10", "--output-size", "128"])  # exits only on failure
    records = json.loads((out / "crops.json").read_text())
    assert sorted(records) == ["glasses/nose/img24_0.jpg", "no_glasses/nose/img1_0.jpg"]
    for name, rec in records.items():
        assert rec["mask"] == name.replace("/nose/", "/nose_mask/").replace(".jpg", ".png")
        mask = read_image(out / rec["mask"])[..., 0]
        assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}
        assert 0.005 < (mask == 255).mean() < 0.2  # a nose, not the whole crop
        assert read_image(out / name).shape == (128, 128, 3)


# Labelled by eye (a contact sheet of every face at least 64 px wide): faces wearing glasses or
# sunglasses over the eyes, by their box centre (x, y). Every other face of these photos, and of
# the NEGATIVE photos, wears none (the goggles of irl_face_4 sit on the forehead: not worn).
GLASSES = {"deepface_pairs/img24.jpg": [(601, 585)], "deepface_pairs/img25.jpg": [(205, 179)],
           "deepface_pairs/selfie-many-people.jpg": [(570, 146)],
           "face_crop_plus_demo/000000.jpg": [(413, 252)], "tidy_torch_models/irl_det_1.jpg": [(116, 345)],
           "tidy_torch_models/irl_det_2.jpg": [(127, 266), (843, 254)], "tidy_torch_models/irl_face_4.jpg": []}
NEGATIVE = ("deepface_pairs/img62.jpg", "deepface_pairs/couple.jpg", "face_recognition/obama.jpg",
            "face_recognition/biden.jpg", "skimage/astronaut.png")


def test_glasses_group_precision_and_recall(parser_weights):
    """The glasses=[6] group on faces >= 64 px of labelled photos, at several shares. Measured:
    7 glasses among 24 faces; the sunglasses under a red cap (000000.jpg) are parsed as hat and skin
    at every share; irl_face_4's forehead goggles count as glasses below a share of 0.02.
    share 0.001: P 0.75 R 0.86; 0.005 (default): P 0.86 R 0.86; 0.02: P 1.00 R 0.86."""
    from tidyface.options import GROUP_SHARE
    from tidyface.tasks.crop import Cropper

    files = list(GLASSES) + list(NEGATIVE)
    routing = Routing(read_groups("glasses=6", "x", CLASS_NAMES))
    faces = Cropper(256, routing=routing).crop([str(need(MEDIA / f)) for f in files])
    boxes = faces.detections.boxes
    wide = ((boxes[:, 2] - boxes[:, 0]) >= 64) & (faces.detections.scores > 0.9)
    truth = []
    for k in range(len(faces)):
        centre = ((boxes[k, :2] + boxes[k, 2:]) / 2).tolist()
        marks = GLASSES.get(files[int(faces.image_index[k])], [])
        truth.append(any(abs(centre[0] - x) < 30 and abs(centre[1] - y) < 30 for x, y in marks))
    truth = torch.tensor(truth)[wide]
    shares = class_shares(faces.masks, 19)[wide]
    assert int(truth.sum()) == 7 and len(truth) == 24
    table = {}
    for share in (0.001, 0.002, GROUP_SHARE, 0.01, 0.02):
        pred = attribute_members(shares, routing.attr, share)[:, 0]
        tp = int((pred & truth).sum())
        table[share] = (tp / max(int(pred.sum()), 1), tp / int(truth.sum()))
    print(f"{len(truth)} faces, {int(truth.sum())} with glasses; share: (precision, recall) "
          + ", ".join(f"{s}: ({p:.2f}, {r:.2f})" for s, (p, r) in table.items()))
    precision, recall = table[GROUP_SHARE]
    assert precision >= 0.85 and recall >= 0.85


def _photo_video(path, names, size=(640, 480), seconds=2):
    """A 1 fps mp4 showing each photo (letterboxed onto one canvas) for `seconds` frames."""
    import cv2

    from tidyface.ops.image import read_image

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 1.0, size)
    for name in names:
        img = read_image(need(MEDIA / name))
        s = min(size[0] / img.shape[1], size[1] / img.shape[0])
        small = cv2.resize(img, (int(img.shape[1] * s), int(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((size[1], size[0], 3), np.uint8)
        canvas[:small.shape[0], :small.shape[1]] = small
        for _ in range(seconds):
            writer.write(np.ascontiguousarray(canvas[..., ::-1]))
    writer.release()
    return path


def test_video2faces_groups_parts_inside_each_person(tmp_path, parser_weights, monkeypatch):
    """video2faces --attr-groups/--mask-groups: each kept face goes into
    groups/<person>/<attr>/<mask>/ with its mask in <mask>_mask/, the parse is cached, and
    regrouping with other groups parses nothing again."""
    import csv

    from tidyface.ops.image import read_image
    from tidyface.tasks import pipeline
    from tidyface.tasks.video2faces import video_to_faces

    need(WEIGHTS / "mobilenet0.25_Final.pth")
    video = _photo_video(tmp_path / "v.mp4", ["deepface_pairs/img24.jpg", "deepface_pairs/img1.jpg"])
    out = tmp_path / "out"
    video_to_faces(str(video), out_dir=str(out), attr_groups="glasses=6;no_glasses=-6", mask_groups="nose=10",
                   det_min_size=30)
    rows = [r for r in csv.DictReader(open(out / "groups.csv")) if r["group"] != "duplicate"]
    by_frame = {int(r["frame"]): r["parts"] for r in rows}
    assert by_frame and {by_frame[f] for f in by_frame if f < 2} == {"glasses/nose"}
    assert {by_frame[f] for f in by_frame if f >= 2} == {"no_glasses/nose"}
    for r in rows:
        picture = read_image(out / r["file"])
        assert r["file"] == f"groups/{r['group']}/{r['parts']}/{r['file'].rsplit('/', 1)[1]}"
        mask = read_image(out / r["file"].replace("/nose/", "/nose_mask/").replace(".jpg", ".png"))[..., 0]
        assert mask.shape == picture.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert 0.002 < (mask == 255).mean() < 0.1  # a nose in a picture 1.5-2.2x the face box
    cached = sorted((out / ".tidyface/classes/bisenet_celebamask").glob("*.png"))
    assert len(cached) == len(rows)

    def no_parse(*a, **k):
        raise AssertionError("regrouping parsed again")

    monkeypatch.setattr(pipeline, "parse", no_parse)
    video_to_faces(str(video), out_dir=str(out), mode="grouping", attr_groups="hat=18")
    rows = [r for r in csv.DictReader(open(out / "groups.csv")) if r["group"] != "duplicate"]
    assert rows and all(r["parts"] == "" and r["file"].startswith("faces/") for r in rows)  # nobody wears a hat
    with pytest.raises(UsageError, match="no negative"):
        video_to_faces(str(video), out_dir=str(tmp_path / "other"), mask_groups="nose=-10")
    assert not (tmp_path / "other").exists()
