"""Auto grouping without a threshold (grouping.auto: the average-linkage tree cut where the
silhouette of its groups x the square root of their share is best): synthetic checks, and ARI
floors on every identity-labelled set of ../shared. The sets are defined here; the evaluation
of every candidate on both encoders (benchmarks/eval_auto_grouping.py) imports them.

Real data, measured by this file on 2026-12-01 (each command's default encoder: the photo sets
with facenet_casia_tf, photos shrunk to MAX_SIDE px; Video_2 with mobilefacenet through
video2faces' detection stage and its dedup, as video2faces groups it). ARI counts unassigned
faces as singletons; each floor is 0.02 below (Video_2: 0.03, a whole detection run):

| set: labelled faces / people / strangers | ARI | cut chosen |
|---|---|---|
| knn: 17 / 5 / 1 | 1.000 | 0.45 |
| bigbang: 10 / 5 / 0 | 1.000 | 0.35 |
| deepface: 69 / 13 / 8 | 0.963 | 0.475 |
| photos (the three together): 96 / 23 / 9 | 0.969 | 0.45 |
| crowd (photos + scene photos' strangers): 173 / 23 / 86 | 0.934 | 0.4 |
| deepface 5 people: 34 / 5 / 0 | 1.000 | 0.475 |
| one person (8 photos): groups per person 2.00, 1 face of 8 unassigned | - | 0.225 |
| Video_2 (mobilefacenet; 50 labelled of 80 kept faces) | 0.879 | 0.775 |

Unit: the fast silhouette equals sklearn's silhouette_score (1e-5); one call recovers
identities at two scales where a fixed cut fits only one; strangers stay unassigned; 1-3 faces;
deterministic; 20k random vectors take the memory-bounded path (numpy peak 7 MiB measured
with max_exact 1000, bound 64 MiB; the exact path would hold 1.6 GB of distances).
"""
from __future__ import annotations

import csv
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, silhouette_score

from conftest import MEDIA, need
from tidyface.tasks import grouping as gp
from tidyface.tasks.pipeline import GroupOptions, group

ROOT = Path(__file__).resolve().parents[1]
KNN = MEDIA / "face_recognition/knn_examples"
BIGBANG = MEDIA / "bigbang_mobilefacenet_tutorial"
DEEPFACE = MEDIA / "deepface_pairs"
VIDEO2 = MEDIA / "simplefr_video_with_identity_db/Video_2.mp4"
# strangers: scene and crowd photos whose people appear nowhere else here (left out: photos of
# people the labelled sets hold: insightface t1.jpg, multiface.jpg, couple.jpg, the selfie; and
# bald_guys.jpg, a collage of a few actors many times)
CROWD = ["dlib_faces_landmarks/" + n for n in (
    "2007_007763.jpg", "2008_001009.jpg", "2008_001322.jpg", "2008_002079.jpg", "2008_002470.jpg",
    "2008_002506.jpg", "2008_004176.jpg", "2008_007676.jpg", "2009_004587.jpg")] + [
    f"face_crop_plus_demo/00000{i}.jpg" for i in range(8)]
# knn test photos with two people: a pixel (x, y) inside each person's face, by eye
KNN_TWO = {"obama_and_biden": {"biden": (845, 513), "obama": (1232, 482)},
           "kit_with_rose": {"rose_leslie": (117, 162), "kit_harington": (304, 138)}}
KNN_TEST = {"alex_lacamoire1": "alex_lacamoire", "johnsnow_test1": "kit_harington", "obama1": "obama"}
MAX_SIDE = 640  # photos shrunk to this longer side here: 9 s for all of them, 119 s at 1024
FLOORS = {"knn": 0.98, "bigbang": 0.98, "deepface": 0.94, "photos": 0.95, "crowd": 0.91, "deepface 5 people": 0.98}
VIDEO2_FLOOR = 0.85


# ----------------------------------------------------------------------------- the labelled sets

def photo_files() -> dict[str, list[Path]]:
    return {"knn": sorted(p for p in KNN.rglob("*") if p.is_file()),
            "bigbang": sorted((BIGBANG / "facebank").iterdir()) + sorted((BIGBANG / "images").iterdir()),
            "deepface": [DEEPFACE / f for f in sorted(deepface_people())],
            "crowd": [MEDIA / c for c in CROWD]}


def deepface_people() -> dict[str, str]:
    """file -> person: the connected sets of "Yes" pairs of both deepface csv files."""
    parent: dict[str, str] = {}

    def root(a):
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for name in ("master.csv", "face-recognition-pivot.csv"):
        with open(DEEPFACE / name, newline="") as fh:
            for r in csv.DictReader(fh):
                a, b = (root(Path(r[k]).name) for k in ("file_x", "file_y"))
                if (r.get("Decision") or r.get("decision")).strip() == "Yes":
                    parent[a] = b
    return {f: "p" + root(f).split(".")[0] for f in parent}


def photo_table(files: list[Path], encoder, detector, max_side: int | None = None) -> dict:
    """Every face of the photos by the group command's steps (detect -> align -> embed), photos
    larger than max_side shrunk first; boxes in the original photo's pixels."""
    import cv2

    from tidyface.ops.image import read_image
    from tidyface.tasks.embed import embed_images

    scale = {}

    def images():
        for p in files:
            im = read_image(p)
            s = 1.0 if max_side is None else min(1.0, max_side / max(im.shape[:2]))
            scale[p] = s
            yield p, im if s == 1 else cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)),
                                                  interpolation=cv2.INTER_AREA)

    cols = {"source": [], "boxes": [], "scores": [], "embeddings": []}
    for p, _, faces in embed_images(images(), encoder, detector):
        cols["source"] += [str(p)] * len(faces)
        cols["boxes"].append(faces.detections.boxes.cpu().numpy() / scale[p])
        cols["scores"].append(faces.detections.scores.cpu().numpy())
        cols["embeddings"].append(faces.embeddings.cpu().numpy())
    return {"source": np.array(cols["source"], dtype=str), **{k: np.concatenate(cols[k]) for k in
                                                              ("boxes", "scores", "embeddings")}}


def _subjects(faces: dict) -> dict[str, int]:
    """The face of each photo the detector is surest of: its subject (not the largest box:
    false detections on a jacket or a wall are larger in some of these photos)."""
    best: dict[str, int] = {}
    for i, s in enumerate(faces["source"]):
        if s not in best or faces["scores"][i] > faces["scores"][best[s]]:
            best[s] = i
    return best


def _holding(faces: dict, s: str, point) -> int:
    """The surest face of photo s whose box holds the point (-1: none)."""
    x, y = point
    b = faces["boxes"]
    rows = [j for j in np.flatnonzero(faces["source"] == s) if b[j, 0] <= x <= b[j, 2] and b[j, 1] <= y <= b[j, 3]]
    return max(rows, key=lambda j: faces["scores"][j]) if rows else -1


def _overlaps(faces: dict, i: int, j: int) -> bool:
    """Boxes i and j share over 30% of the smaller one (a second detection of one face)."""
    a, b = faces["boxes"][i], faces["boxes"][j]
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return i != j and w * h > 0.3 * small


def _person(path: Path, i: int, faces: dict, best: dict, people: dict) -> str | None:
    """The person of face i of photo `path`: "stranger:..." for bystanders, None for a second,
    shifted detection of the subject's own face (left out)."""
    s, stranger = str(path), f"stranger:{path.name}:{i}"
    if _overlaps(faces, i, best[s]):
        return None
    if path.parent == KNN / "test" and path.stem in KNN_TWO:
        who = [p for p, pt in KNN_TWO[path.stem].items() if _holding(faces, s, pt) == i]
        return who[0] if who else stranger
    if best[s] != i:
        return stranger
    if path.parent.parent == KNN / "train":
        return path.parent.name
    if path.parent == KNN / "test":
        return KNN_TEST[path.stem]
    if path.parent.parent == BIGBANG:
        return path.stem
    return people.get(path.name, stranger) if path.parent == DEEPFACE else stranger


def photo_sets(faces: dict) -> dict[str, tuple[np.ndarray, list[str]]]:
    """set name -> (rows of `faces`, person per row): knn, bigbang, deepface; photos (the three
    together, people kept apart by set); crowd (photos + every face of CROWD, all strangers);
    deepface 5 people (its five with the most photos, alone); one person (its first, alone)."""
    people, best = deepface_people(), _subjects(faces)
    kind = {str(p): k for k, files in photo_files().items() for p in files}
    rows: dict[str, list[tuple[int, str]]] = {k: [] for k in ("knn", "bigbang", "deepface", "crowd")}
    for i, s in enumerate(faces["source"]):
        if s in kind and (who := _person(Path(s), i, faces, best, people)) is not None:
            rows[kind[s]].append((i, f"{kind[s]}:{who}"))
    sets = {k: rows[k] for k in ("knn", "bigbang", "deepface")}
    sets["photos"] = rows["knn"] + rows["bigbang"] + rows["deepface"]
    sets["crowd"] = sets["photos"] + rows["crowd"]
    big = [t for t, _ in Counter(t for _, t in rows["deepface"] if "stranger" not in t).most_common(5)]
    sets["deepface 5 people"] = [(i, t) for i, t in rows["deepface"] if t in big]
    sets["one person"] = [(i, t) for i, t in rows["deepface"] if t == big[0]]
    return {k: (np.array([i for i, _ in v]), [t for _, t in v]) for k, v in sets.items()}


def video2_faces(encoder, models, out: Path) -> dict:
    """video2faces' detection stage on Video_2 (its defaults), every face embedded; keep: the
    faces its dedup step keeps (its default thresholds), which it groups."""
    from tidyface.options import Video2FacesOptions
    from tidyface.tasks import dedup as dd
    from tidyface.tasks import pipeline as pl
    from tidyface.tasks.video2faces import Workspace, embed_missing, video_to_faces
    from tidyface.types import FaceTable

    video_to_faces(str(VIDEO2), models, out_dir=str(out), mode="detection", enc_model=encoder.spec.name)
    ws = Workspace(out)
    t = FaceTable.load(ws.table_path("01"))
    n = len(t)  # detection defers the embeddings of faces it may drop as duplicates: fill them all
    embed_missing(t, np.ones(n, bool), np.zeros(n, np.int64), [ws.crops_path("01")], encoder, 16)
    o = Video2FacesOptions
    keep = pl.dedup(t, o.hash_thr, o.enc_dup_thr, confirm_thr=dd.hash_confirm_threshold(encoder.spec)).keep
    return {"frame": t.frame, "boxes": t.boxes, "embeddings": t.embeddings, "keep": keep}


def video2_labels(faces: dict) -> list[str | None]:
    """The person of each face by tests/data/video2_faces_truth.csv (box IoU >= 0.5); None: not
    labelled (rows 'none', not a face, are left out too)."""
    from tidyface.ops.nms import box_iou

    label: list[str | None] = [None] * len(faces["frame"])
    with open(ROOT / "tests/data/video2_faces_truth.csv") as fh:
        truth = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    for t in truth:
        sel = np.flatnonzero(faces["frame"] == int(t["frame"]))
        if len(sel) and t["person"] != "none":
            iou = box_iou(torch.tensor([[float(t[k]) for k in ("x1", "y1", "x2", "y2")]]),
                          torch.from_numpy(faces["boxes"][sel]))[0]
            if iou.max() >= 0.5:
                label[int(sel[int(iou.argmax())])] = t["person"]
    return label


def score(truth: list[str], pred: np.ndarray) -> dict:
    """truth per labelled face ('stranger' in it: nobody else); pred: integer groups, -1 unassigned.
    ARI (unassigned as singletons); groups per person (people with >= 2 faces: distinct groups
    their faces land in, an unassigned face counting as one); purity (assigned faces whose
    group's majority person is theirs); unassigned (share of those people's faces); strangers
    left unassigned (share)."""
    pred = np.asarray(pred)
    single = [f"u{i}" if p < 0 else str(p) for i, p in enumerate(pred)]
    stranger = np.array(["stranger" in t for t in truth])
    count = Counter(truth)
    people = sorted(t for t in count if count[t] >= 2 and "stranger" not in t)
    per_person = [len({single[i] for i, t in enumerate(truth) if t == p}) for p in people]
    assigned = pred >= 0
    major = {g: Counter(t for t, p in zip(truth, pred) if p == g).most_common(1)[0][0]
             for g in set(pred[assigned])}
    known = ~stranger & np.array([count[t] >= 2 for t in truth])
    return {"ari": adjusted_rand_score(truth, single), "groups_per_person": float(np.mean(per_person)),
            "purity": sum(major[p] == t for t, p in zip(truth, pred) if p >= 0) / max(int(assigned.sum()), 1),
            "unassigned": float((~assigned[known]).mean()),
            "strangers_unassigned": float((~assigned[stranger]).mean()) if stranger.any() else float("nan"),
            "faces": len(truth), "people": len(people), "strangers": int(stranger.sum())}


def as_ints(g: gp.Grouping) -> np.ndarray:
    return np.array([-1 if v == gp.UNASSIGNED else int(v) for v in g.labels], dtype=np.int64)


# ----------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def models():
    from tidyface.cache import ModelCache

    return ModelCache()


def test_photo_sets_ari(models, encoder="facenet_casia_tf"):  # the group command's default encoder
    for folder in (KNN, BIGBANG, DEEPFACE, MEDIA / "dlib_faces_landmarks", MEDIA / "face_crop_plus_demo"):
        need(folder)
    enc, det = models.get(encoder, "cpu"), models.get("retinaface_mnet025", "cpu")
    faces = photo_table([p for files in photo_files().values() for p in files], enc, det, MAX_SIDE)
    print()
    for name, (rows, truth) in photo_sets(faces).items():
        g = group(torch.from_numpy(faces["embeddings"][rows]), GroupOptions("auto"), enc.spec)
        r = score(truth, as_ints(g))
        print(f"{encoder} {name}: ARI {r['ari']:.3f}, groups per person {r['groups_per_person']:.2f}, "
              f"purity {r['purity']:.3f}, unassigned {r['unassigned']:.3f}, strangers unassigned "
              f"{r['strangers_unassigned']:.3f}; cut {g.details['threshold']} ({g.details['cut']}); "
              f"{r['faces']} faces / {r['people']} people / {r['strangers']} strangers")
        if name == "one person":  # ARI says nothing with one person: the faces are not scattered
            assert r["groups_per_person"] <= 2 and r["unassigned"] <= 0.125
        else:
            assert r["ari"] >= FLOORS[name], name


def test_video2_ari(models, tmp_path):  # video2faces' default encoder
    need(VIDEO2)
    enc = models.get("mobilefacenet", "cpu")
    faces = video2_faces(enc, models, tmp_path / "v2")
    kept = np.flatnonzero(faces["keep"])
    label = video2_labels(faces)
    scored = np.array([j for j, i in enumerate(kept) if label[i] is not None])
    g = group(torch.from_numpy(faces["embeddings"][kept]), GroupOptions("auto"), enc.spec)
    r = score([label[kept[j]] for j in scored], as_ints(g)[scored])
    print(f"\nvideo2 mobilefacenet: {len(kept)} of {len(label)} faces kept, {r['faces']} labelled; ARI "
          f"{r['ari']:.3f}, groups per person {r['groups_per_person']:.2f}, purity {r['purity']:.3f}, "
          f"cut {g.details['threshold']} ({g.details['cut']})")
    assert r["faces"] >= 45 and r["ari"] >= VIDEO2_FLOOR


# ----------------------------------------------------------------------------- synthetic

def blobs(k, per, dim=64, spread=0.05, seed=0, strangers=0):
    """k identities x per faces (cosine distance between two faces of one ~ spread^2 dim /
    (1 + spread^2 dim)), plus isolated random points labelled -1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k + strangers, dim, generator=g), dim=1)
    y = torch.cat([torch.arange(k).repeat_interleave(per), -torch.ones(strangers, dtype=torch.long)])
    src = torch.cat([centres[:k][torch.arange(k).repeat_interleave(per)], centres[k:]])
    return torch.nn.functional.normalize(src + spread * torch.randn(len(y), dim, generator=g), dim=1), y.numpy()


def test_fast_silhouette_is_sklearns():
    x, _ = blobs(6, 15, spread=0.09, strangers=10)
    tree = gp._tree(x)
    sil, share = gp._silhouettes(x, tree, gp.AUTO_HEIGHTS, np.arange(len(x)))
    checked = 0
    for h, s, f in zip(gp.AUTO_HEIGHTS, sil, share):
        lab = gp._cut(tree, h)
        if 2 <= lab.max() + 1 <= len(x) - 1:
            assert s == pytest.approx(silhouette_score(x.numpy(), lab, metric="cosine"), abs=1e-5)
            assert f == pytest.approx((np.bincount(lab)[lab] > 1).mean())
            checked += 1
        else:
            assert np.isnan(s) and np.isnan(f)
    assert checked >= 20
    some = np.sort(np.random.default_rng(0).choice(len(x), 40, replace=False))  # rows sampled
    est, _ = gp._silhouettes(x, tree, gp.AUTO_HEIGHTS, some)
    assert np.nanmax(np.abs(est - sil)) < 0.1


@pytest.mark.parametrize("spread", [0.05, 0.12])  # faces of one person ~0.14 / ~0.48 apart
def test_one_call_fits_both_scales(spread):
    x, y = blobs(6, 12, spread=spread, seed=1, strangers=8)
    g = gp.auto(x)
    lab = np.array(g.labels)
    assert g.details["cut"] == "silhouette"
    assert adjusted_rand_score(y[y >= 0], lab[y >= 0]) == 1.0 and (lab[y >= 0] != gp.UNASSIGNED).all()
    assert (lab[y < 0] == gp.UNASSIGNED).all()  # strangers match nobody
    fixed = np.array(gp.auto(x, threshold=0.3).labels)  # a cut fit for the tight scale only
    if spread < 0.1:
        assert adjusted_rand_score(y[y >= 0], fixed[y >= 0]) == 1.0
    else:  # the loose people fall apart: 94% of their faces unassigned, ARI 0.007
        assert (fixed[y >= 0] == gp.UNASSIGNED).mean() > 0.9
        assert adjusted_rand_score(y[y >= 0], fixed[y >= 0]) < 0.1


def test_given_threshold_and_fallback_through_the_group_step():
    class Spec:  # an encoder spec's defaults, as the registry gives them
        class defaults:
            group_threshold = 0.5

    x, y = blobs(3, 5, strangers=2)
    given = group(x, GroupOptions("auto", auto_thr=0.01), Spec)
    assert given.details["cut"] == "given" and set(given.labels) == {gp.UNASSIGNED}
    chosen = group(x, GroupOptions("auto"), Spec)
    assert chosen.details["cut"] == "silhouette" and adjusted_rand_score(y, as_ints(chosen)) > 0.9
    two = group(x[:2], GroupOptions("auto"), Spec)  # no cut can be scored: the encoder's default
    assert two.details["cut"] == "fallback" and two.details["threshold"] == 0.5 and two.labels == ["0", "0"]
    scores = chosen.details["cut_score"]
    assert scores[chosen.details["threshold"]] == np.nanmax(list(scores.values()))
    row = gp.grouping_log_rows(chosen, [str(i) for i in range(len(y))])[0]
    assert row["threshold"] == chosen.details["threshold"]


def test_small_inputs():
    x, _ = blobs(2, 2, spread=0.05)  # faces 0,1: one person; 2,3: another
    assert gp.auto(x[:0]).labels == [] and gp.auto(x[:1]).labels == [gp.UNASSIGNED]
    assert gp.auto(x[:2]).labels == ["0", "0"]  # fallback cut (AUTO_THRESHOLD) on 2 faces
    assert gp.auto(x[[0, 2]]).labels == [gp.UNASSIGNED] * 2  # two people
    three = gp.auto(x[[0, 1, 2]])
    assert three.details["cut"] == "silhouette" and three.labels == ["0", "0", gp.UNASSIGNED]
    same = torch.nn.functional.normalize(torch.ones(3, 8), dim=1)
    g = gp.auto(same)  # all alike: no cut leaves 2 groups, so the fallback cut says one group
    assert g.details["cut"] == "fallback" and g.labels == ["0"] * 3 and "too alike" in g.note


def test_deterministic():
    x, _ = blobs(8, 10, spread=0.1, seed=2, strangers=5)
    a, b = gp.auto(x), gp.auto(x.clone())
    assert a.labels == b.labels and a.details["threshold"] == b.details["threshold"]
    np.testing.assert_array_equal(a.distance, b.distance)
    c = gp.auto(x, max_exact=30)  # large path: a seeded sample chooses the cut
    assert c.labels == gp.auto(x, max_exact=30).labels and c.details["method"] != a.details["method"]


def test_large_input_takes_the_memory_bounded_path():
    x = torch.nn.functional.normalize(torch.randn(20000, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    tracemalloc.start()
    g = gp.auto(x, max_exact=1000)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"\n20k random vectors: cut {g.details['threshold']}, {g.details['n_groups']} groups, "
          f"{g.details['components']} components, {g.details['approximate']} sampled; numpy peak {peak:.0f} MiB")
    assert g.details["method"].startswith("threshold-graph") and g.details["cut"] == "silhouette"
    assert len(g.labels) == 20000 and peak < 64  # the exact path: 20000^2/2 float64 = 1.6 GB
