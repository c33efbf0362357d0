"""Synthetic masks (ops.masks), the upper-face embed geometry (--enc-region upper) and masked
references (--masked).

Units: each mask shape covers the nose tip, mouth corners and mouth of a real face (dlib's iBUG
68-point annotations of a PASCAL photo, with its 68 points and reduced to 5) and none of its eye
points; batched drawing equals one face at a time, exactly; dtype and device follow the images.
The upper-face crop keeps the aligned crop above the nose tip bit for bit and fills below it.

Real data (benchmarks/eval_masked.py, numbers in benchmarks/RESULTS.md "Masked faces"): deepface's
300 pairs (photos shrunk to 640 px) with the second photo wearing each mask (drawn on its aligned
crop), mobilefacenet, ROC AUC averaged over the shapes: plain 0.9987, masked refs 0.9991, upper
0.9996 (MEASURED_AUC; per shape surgical, cloth, n95: plain 0.9999, 0.9965, 0.9998; masked refs
0.9997, 0.9984, 0.9993; upper 0.9996, 0.9993, 0.9999); floors are those minus AUC_MARGIN 0.01.
"""
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from conftest import MEDIA, need
from tidyface.errors import UsageError
from tidyface.ops import masks as mk
from tidyface.ops.align import template_for
from tidyface.ops.markup import reduce_to_five
from tidyface.options import EmbedOptions, GroupCommandOptions, Video2FacesOptions
from tidyface.tasks import pipeline as pl
from tidyface.types import Detections, Faces

LANDMARKS = MEDIA / "dlib_faces_landmarks/testing_with_face_landmarks.xml"
KNN = MEDIA / "face_recognition/knn_examples"
PAIRS = MEDIA / "deepface_pairs"
EYES, MOUTH, NOSE_TIP = list(range(36, 48)), [48, 51, 54, 57, 62, 66], 30


def annotated_face():
    """(image size (w, h), (68,2) points) of the first annotated face of dlib's testing set."""
    root = ET.parse(need(LANDMARKS)).getroot()
    image = root.find("images/image")
    box = image.find("box")
    pts = sorted(((int(p.get("name")), float(p.get("x")), float(p.get("y"))) for p in box.findall("part")))
    return (int(image.get("width")), int(image.get("height"))), torch.tensor([[x, y] for _, x, y in pts])


@pytest.mark.parametrize("shape", mk.SHAPES)
def test_each_mask_covers_mouth_and_nose_tip_not_the_eyes(shape):
    (w, h), p68 = annotated_face()
    for points in (p68, reduce_to_five(p68)):
        inside = mk.inside_polygons(mk.mask_polygons(points[None], shape), (w, h))[0]
        at = lambda k: bool(inside[int(round(float(p68[k, 1]))), int(round(float(p68[k, 0])))])  # noqa: E731
        assert all(at(k) for k in MOUTH + [NOSE_TIP]), (shape, points.shape)
        assert not any(at(k) for k in EYES), (shape, points.shape)
        assert 0 < int(inside.sum()) < inside.numel() / 4


def test_batched_equals_one_by_one_and_dtype_follows_the_images():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 112, 112) * 255
    base = template_for(112)
    angle = torch.tensor([0.0, 0.3, -0.2])
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], 1), torch.stack([angle.sin(), angle.cos()], 1)], 1)
    points = (base - 56)[None] @ rot.transpose(1, 2).double() * torch.tensor([1.0, 0.9, 1.1])[:, None, None] + 56
    for shape in mk.SHAPES:
        batched = mk.draw_masks(images, points, shape)
        single = torch.cat([mk.draw_masks(images[i:i + 1], points[i:i + 1], shape) for i in range(3)])
        assert torch.equal(batched, single)
        assert not torch.equal(batched, images)
    for dtype in (torch.uint8, torch.float16, torch.float64):
        out = mk.draw_masks(images.to(dtype), points.float(), "cloth", colour=(10, 20, 30))
        assert out.dtype == dtype and out.device == images.device
        assert {tuple(v) for v in out[0].flatten(1).T.tolist()} >= {(10, 20, 30)}
    assert torch.equal(mk.draw_all_masks(images, points)[3:6], mk.draw_masks(images, points, "cloth"))
    with pytest.raises(ValueError, match="mask shape"):
        mk.draw_masks(images, points, "scarf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_masks_on_cuda_match_cpu():
    images = torch.rand(2, 3, 96, 80) * 255
    points = template_for((80, 96))[None].expand(2, -1, -1)
    for shape in mk.SHAPES:
        assert torch.equal(mk.draw_masks(images.cuda(), points.cuda(), shape).cpu(), mk.draw_masks(images, points, shape))


def test_upper_face_geometry_keeps_the_crop_above_the_nose_tip():
    size = (112, 112)
    tpl = template_for(size)
    image = (torch.arange(3 * 200 * 180, dtype=torch.float32).reshape(3, 200, 180) % 251)
    # a face whose points are the template's, shifted: its crop is a pure translation of the image
    dets = Detections(torch.tensor([[20.0, 30.0, 150.0, 170.0]]), torch.ones(1), (tpl + 30).float()[None],
                      torch.zeros(1, dtype=torch.long))
    full = pl.align([image], dets, pl.Alignment(size, tpl))
    upper = pl.align([image], dets, pl.UpperFace(pl.Alignment(size, tpl)))
    keep = mk.upper_face_area(tpl[None], size)[0]
    nose_row = int(tpl[2, 1])
    # the template's eye line tilts by 0.2 px: the nose tip's row is split
    assert bool(keep[:nose_row - 1].all()) and not bool(keep[nose_row + 2:].any())
    assert torch.equal(upper.crops[..., keep], full.crops[..., keep])
    below = upper.crops[0][:, ~keep]
    mean = full.crops[0][:, keep].mean(1, keepdim=True)
    assert torch.allclose(below, mean.expand_as(below), atol=1e-3)
    assert torch.equal(upper.crop_mat, full.crop_mat)
    # a face without points: the template's nose tip
    none = Detections(dets.boxes, dets.scores, torch.full((1, 5, 2), float("nan")), dets.image_index)
    blank = pl.align([image], none, pl.UpperFace(pl.Alignment(size, tpl))).crops[0]
    assert bool((blank[:, nose_row + 2:] == blank[:, -1:, -1:]).all())


def test_flags_refuse_what_cannot_work(tmp_path):
    common = dict(path=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(UsageError, match="--masked.*classify"):
        GroupCommandOptions(**common, masked=True)
    with pytest.raises(UsageError, match="--enc-region upper.*--enc-area"):
        GroupCommandOptions(**common, enc_region="upper", enc_area="0 0 1 1")
    with pytest.raises(UsageError, match="--enc-region upper.*yolov3_wider gives none"):
        GroupCommandOptions(**common, enc_region="upper", det_model="yolov3_wider")
    with pytest.raises(UsageError, match="--cropped"):
        GroupCommandOptions(**common, enc_region="upper", cropped=True)
    with pytest.raises(UsageError, match="--enc-region must be one of"):
        EmbedOptions(out=str(tmp_path / "x.npz"), enc_region="lower")
    with pytest.raises(UsageError, match="--masked.*classify"):
        Video2FacesOptions(input=str(tmp_path), masked=True)
    with pytest.raises(UsageError, match="faster_rcnn_anime gives none"):
        Video2FacesOptions(input=str(tmp_path), style="anime", enc_region="upper")
    with pytest.raises(UsageError, match="vit_anime_b16 takes box crops"):
        Video2FacesOptions(input=str(tmp_path), enc_model="vit_anime_b16", enc_region="upper")
    o = Video2FacesOptions(input=str(tmp_path), enc_region="upper", masked=True, group_mode="classify",
                           ref_dir=str(tmp_path))
    assert o.detection_signature()["enc_region"] == "upper"
    assert "enc_region" not in Video2FacesOptions(input=str(tmp_path)).detection_signature()


def tidyface(*args) -> int:
    """The command line in this process -> its exit code."""
    from tidyface.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code or 0
    return 0


SMALL = 480  # longer side of the knn photos used here (the originals are up to 2.5k px: slow to detect)


def _small(src: Path, dst: Path) -> None:
    import cv2

    im = cv2.imread(str(src))
    k = SMALL / max(im.shape[:2])
    cv2.imwrite(str(dst), cv2.resize(im, None, fx=k, fy=k, interpolation=cv2.INTER_AREA) if k < 1 else im)


@pytest.fixture(scope="module")
def knn(tmp_path_factory):
    """knn's first training photo of each person as references, and 3 test photos with every
    face wearing a surgical mask (drawn at its detected points), all at most SMALL px."""
    from tidyface.ops.image import read_image, write_image
    from tidyface.tasks.common import load_models

    tmp = tmp_path_factory.mktemp("knn_masked")
    refs, photos = tmp / "refs", tmp / "masked"
    for person in sorted(p.name for p in need(KNN / "train").iterdir()):
        (refs / person).mkdir(parents=True)
        first = sorted((KNN / "train" / person).iterdir())[0]
        _small(first, refs / person / first.name)
    (detector,) = load_models(None, "cpu", None, "retinaface_mnet025")
    photos.mkdir()
    for name in ("alex_lacamoire1", "johnsnow_test1", "obama1"):
        _small(need(KNN / "test" / f"{name}.jpg"), tmp / f"{name}.png")
        im = read_image(tmp / f"{name}.png")
        _, _, d = next(pl.detect_stream([(0, im)], detector))
        t = torch.from_numpy(im).permute(2, 0, 1)[None]
        for k in range(len(d)):
            t = mk.draw_masks(t, d.landmarks[k:k + 1], "surgical")
        write_image(photos / f"{name}.png", t[0].permute(1, 2, 0).contiguous().numpy())
    return refs, photos


def test_masked_references_and_upper_region_through_group_classify(knn, tmp_path, capsys):
    """`tidyface group --mode classify` with --masked and with --enc-region upper, on the masked
    knn test photos: each subject goes to their person."""
    import csv

    refs, photos = knn
    expect = {"alex_lacamoire1": "alex_lacamoire", "johnsnow_test1": "kit_harington", "obama1": "obama"}
    for flags in (["--masked"], ["--enc-region", "upper"]):
        out = tmp_path / f"out{len(flags)}"
        code = tidyface("group", photos, "--out", out, "--mode", "classify", "--ref-dir", refs,
                        "--enc-model", "mobilefacenet", *flags)
        assert code == 0, capsys.readouterr().err
        got = {}
        for r in csv.DictReader(open(out / "groups.csv")):
            if r["face_index"] == "0":
                got[Path(r["source"]).stem] = r["group"]
        print(f"\n{flags}: {got}")
        assert got == expect, flags
    capsys.readouterr()
    code = tidyface("group", photos, "--out", tmp_path / "bad", "--masked")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--masked" in err


def test_reference_embeddings_masked_adds_three_per_face(knn):
    from tidyface.tasks.common import load_models

    encoder, detector = load_models(None, "cpu", None, "mobilefacenet", "retinaface_mnet025")
    refs, _ = knn
    plain, labels = pl.reference_embeddings(refs, encoder, detector)
    masked, mlabels = pl.reference_embeddings(refs, encoder, detector, masked=True)
    k = 1 + len(mk.SHAPES)
    assert len(masked) == k * len(plain)
    assert mlabels == [lab for lab in labels for _ in range(k)]
    assert torch.allclose(masked[::k], plain, atol=1e-5)  # the plain face first
    same = (masked[1::k] * plain).sum(1)  # a face and its own surgical version: alike, not equal
    assert bool((same > 0.3).all() and (same < 0.999).all()), same


# deepface pairs, mobilefacenet, the second photo of each pair wearing each mask (drawn on its
# aligned crop, at its points there): ROC AUC measured per method, mean over the three shapes
MEASURED_AUC = {"plain": 0.9987, "masked refs": 0.9991, "upper": 0.9996}
AUC_MARGIN = 0.01
PAIR_SIDE = 640  # the deepface photos shrunk to this longer side


def test_masked_pairs_auc_floors():
    import csv

    import cv2

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from tidyface.ops.image import read_image
    from tidyface.tasks.common import load_models

    encoder, detector = load_models(None, "cpu", None, "mobilefacenet", "retinaface_mnet025")
    rows = list(csv.DictReader(open(need(PAIRS / "master.csv"))))
    files = sorted({r["file_x"] for r in rows} | {r["file_y"] for r in rows})
    geo, upper = pl.encoder_geometry(encoder), pl.encoder_geometry(encoder, region="upper")
    faces = []
    for f in files:
        im = read_image(PAIRS / f)
        k = PAIR_SIDE / max(im.shape[:2])  # detection at full size is most of this test's time
        im = cv2.resize(im, None, fx=k, fy=k, interpolation=cv2.INTER_AREA) if k < 1 else im
        _, _, d = next(pl.detect_stream([(f, im)], detector))
        b = d.boxes
        faces.append(pl.align([pl.as_chw(im)], d.select(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax()[None]),
                              geo))
    crops = torch.cat([f.crops for f in faces])
    points = torch.cat([pl.crop_points(f.detections.landmarks, f.crop_mat, geo.points) for f in faces])
    mats = torch.cat([f.crop_mat for f in faces])
    dets = Detections(torch.zeros(len(faces), 4), torch.ones(len(faces)), torch.cat(
        [f.detections.landmarks for f in faces]), torch.arange(len(faces)))
    plain = pl.encode(encoder, crops)
    refs = pl.encode(encoder, torch.cat([crops, pl.masked_crops(Faces(crops, mats, dets), geo)])).view(
        1 + len(mk.SHAPES), len(files), -1)
    up_ref = pl.encode(encoder, pl.finish_crops(upper, crops, mats, dets))
    index = {f: i for i, f in enumerate(files)}
    x, y = [index[r["file_x"]] for r in rows], [index[r["file_y"]] for r in rows]
    same = np.array([r["Decision"] == "Yes" for r in rows])
    auc = {m: [] for m in MEASURED_AUC}
    for s in mk.SHAPES:
        probe_crops = mk.draw_masks(crops, points, s)
        probe = pl.encode(encoder, probe_crops)
        up = pl.encode(encoder, pl.finish_crops(upper, probe_crops, mats, dets))
        auc["plain"].append(roc_auc_score(same, (plain[x] * probe[y]).sum(1)))
        auc["masked refs"].append(roc_auc_score(same, torch.einsum("knd,nd->kn", refs[:, x], probe[y]).amax(0)))
        auc["upper"].append(roc_auc_score(same, (up_ref[x] * up[y]).sum(1)))
    print("\nper shape: " + "; ".join(f"{m} " + ", ".join(f"{a:.4f}" for a in v) for m, v in auc.items()))
    got = {m: float(np.mean(v)) for m, v in auc.items()}
    print(f"\nmasked pairs AUC (mean of {', '.join(mk.SHAPES)}): " + ", ".join(f"{m} {v:.4f}" for m, v in got.items()))
    for m, v in got.items():
        assert v >= MEASURED_AUC[m] - AUC_MARGIN, m
