"""Detection on real photos (recall on dlib's annotated PASCAL faces), the API and the CLI."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from conftest import MEDIA, need
from tidyface import detect
from tidyface.ops.nms import box_iou

DLIB = MEDIA / "dlib_faces_landmarks"
FLOORS = {"mtcnn": 0.95, "retinaface_mnet025": 0.95}


def annotated():
    for xml in ("testing.xml", "training.xml"):
        for im in ET.parse(need(DLIB / xml)).getroot().iter("image"):
            boxes = [[float(b.get("left")), float(b.get("top")),
                      float(b.get("left")) + float(b.get("width")), float(b.get("top")) + float(b.get("height"))]
                     for b in im.iter("box")]
            yield DLIB / im.get("file"), torch.tensor(boxes)


def matched(truth: torch.Tensor, found: torch.Tensor, thr: float = 0.3) -> int:
    """Greedy one-to-one matching by IoU (dlib's boxes are tighter than detector boxes: IoU >= 0.3)."""
    if len(found) == 0 or len(truth) == 0:
        return 0
    iou = box_iou(truth, found)
    hits = 0
    while True:
        v, flat = iou.flatten().max(0)
        if v < thr:
            return hits
        i, j = divmod(flat.item(), iou.shape[1])
        hits += 1
        iou[i, :] = -1
        iou[:, j] = -1


@pytest.mark.parametrize("model", sorted(FLOORS))
def test_recall_on_dlib_faces(model):
    data = list(annotated())
    dets = detect([p for p, _ in data], model=model)
    total = sum(len(t) for _, t in data)
    hits = sum(matched(t, dets.for_image(i).boxes) for i, (_, t) in enumerate(data))
    extra = len(dets) - hits
    print(f"\n{model}: recall {hits}/{total} = {hits / total:.3f} at IoU>=0.3; "
          f"{extra} detections unmatched (PASCAL has unannotated faces, so not all are false)")
    assert hits / total >= FLOORS[model]


def test_dogs_photo():
    """No people in dogs.jpg: MTCNN finds nothing; RetinaFace at full resolution finds, like
    upstream, two dog faces scoring > 0.95 (at a 640 px input they score ~0.52)."""
    img = need(DLIB / "dogs.jpg")
    assert len(detect(img, model="mtcnn")) == 0
    full = detect(img, model="retinaface_mnet025", max_size=0)
    default = detect(img, model="retinaface_mnet025")
    print(f"\nretinaface_mnet025 on dogs.jpg: full size {full.scores.tolist()}, default size "
          f"{default.scores.tolist()}")
    assert int((full.scores > 0.95).sum()) == 2


def test_detect_api_accepts_arrays_and_paths():
    path = need(MEDIA / "skimage/astronaut.png")
    from tidyface.ops.image import read_image

    img = read_image(path)
    a = detect([img, path, np.zeros((100, 120, 3), np.uint8)], model="mtcnn")
    assert a.image_index.tolist() == [0, 1]
    assert torch.allclose(a.boxes[0], a.boxes[1])
    assert a.landmarks.shape == (2, 5, 2)
    left_eye, right_eye = a.landmarks[0, 0], a.landmarks[0, 1]
    assert left_eye[0] < right_eye[0], "left eye as seen in the image comes first"


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tidyface.cli", *map(str, args)],
                          capture_output=True, text=True, **kw)


def test_cli_jsonl_bad_files_and_drawings(tmp_path):
    good = need(MEDIA / "insightface_wheel/t1.jpg")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:200])  # a truncated JPEG
    lst = tmp_path / "list.txt"
    lst.write_text(f"{good}\n# a comment\n\n{need(MEDIA / 'skimage/astronaut.png')}\n")
    out = tmp_path / "drawn"
    r = _cli("detect", lst, bad, "--model", "mtcnn", "--out", out, "--batch-size", 2)
    assert r.returncode == 1, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["image"] for x in lines] == [str(good), str(MEDIA / "skimage/astronaut.png")]
    first = lines[0]
    assert (first["width"], first["height"]) == (1280, 886) and len(first["faces"]) >= 6
    face = first["faces"][0]
    assert len(face["box"]) == 4 and 0 < face["score"] <= 1 and len(face["landmarks"]) == 5
    warnings = [x for x in r.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]
    assert len(list(out.rglob("*.jpg"))) == 1 and len(list(out.rglob("*.png"))) == 1


def test_cli_models_catalogue():
    r = _cli("models")
    assert r.returncode == 0, r.stderr
    assert "mtcnn" in r.stdout and "retinaface_mnet025" in r.stdout and "MIT" in r.stdout
    assert "a2a71925e0b9996a" in r.stdout  # pnet.pt's sha256 prefix


def test_cli_offline_missing_weights_is_one_line(tmp_path):
    import os

    env = dict(os.environ, TIDYFACE_HOME=str(tmp_path), TIDYFACE_MIRROR="", TIDYFACE_OFFLINE="1")
    r = _cli("detect", need(MEDIA / "skimage/astronaut.png"), "--model", "mtcnn", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pnet.pt" in r.stderr and "Traceback" not in r.stderr


def test_cli_embed_writes_one_row_per_face(tmp_path):
    out = tmp_path / "e.npz"
    r = _cli("embed", need(MEDIA / "insightface_wheel/t1.jpg"), need(MEDIA / "skimage/astronaut.png"),
             "--out", out, "--model", "mobilefacenet")
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    assert z["embeddings"].shape == (7, 128) and z["embeddings"].dtype == np.float32
    assert np.allclose(np.linalg.norm(z["embeddings"], axis=1), 1, atol=1e-5)
    assert list(z["face_index"][:6]) == list(range(6)) and z["source"][-1].endswith("astronaut.png")
    assert z["boxes"].shape == (7, 4) and z["landmarks"].shape == (7, 5, 2)


def test_cli_crop_writes_crops_and_matrices(tmp_path):
    out = tmp_path / "crops"
    r = _cli("crop", need(MEDIA / "skimage/astronaut.png"), "--out", out, "--output-size", "128,160",
             "--strategy", "largest")
    assert r.returncode == 0, r.stderr
    import json

    meta = json.loads((out / "crops.json").read_text())
    (name, rec), = meta.items()
    assert np.array(rec["matrix"]).shape == (3, 3)
    from tidyface.ops.image import read_image

    assert read_image(out / name).shape == (160, 128, 3)


def test_cli_crop_without_weights_leaves_no_output(tmp_path):
    """A crop run that cannot get its detector's weights stops before touching --out, so the
    same command works once the weights are there (no stale crops.json blocking it)."""
    import os

    env = dict(os.environ, TIDYFACE_HOME=str(tmp_path / "store"), TIDYFACE_MIRROR="", TIDYFACE_OFFLINE="1")
    out = tmp_path / "crops"
    r = subprocess.run([sys.executable, "-m", "tidyface.cli", "crop", str(need(MEDIA / "skimage/astronaut.png")),
                        "--out", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "mobilenet0.25_Final.pth" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = _cli("crop", need(MEDIA / "skimage/astronaut.png"), "--out", out)
    assert r.returncode == 0, r.stderr
