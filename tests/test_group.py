"""Grouping real photos by person in each mode (ARI against folder labels), and the command."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sklearn.metrics import adjusted_rand_score

from conftest import MEDIA, need
from tidyface.tasks.group import run_group

KNN = MEDIA / "face_recognition/knn_examples"
BIGBANG = MEDIA / "bigbang_mobilefacenet_tutorial"


def rows(out: Path):
    with open(out / "groups.csv") as fh:
        return list(csv.DictReader(fh))


def truth_knn(row):
    """knn train: the folder names the person of face 0; other faces are strangers."""
    src = Path(row["source"])
    return src.parent.name if row["face_index"] == "0" else f"stranger:{src.name}:{row['face_index']}"


def truth_bigbang(row):
    return Path(row["source"]).stem


def ari(rs, truth):
    """Unassigned faces count as their own singletons, which is what they claim to be."""
    pred = [r["group"] if r["group"] != "unassigned" else f"u{i}" for i, r in enumerate(rs)]
    return adjusted_rand_score([truth(r) for r in rs], pred)


def bigbang_photos(tmp_path):
    """facebank/ and images/ hold one photo of each of 5 people: 10 faces, 2 per person."""
    src = tmp_path / "bigbang"
    for sub in ("facebank", "images"):
        shutil.copytree(need(BIGBANG / sub), src / sub)
    return src


# knn train has 5 people with 1-2 photos each plus a stranger in one photo: auto puts the
# singletons in unassigned/, while KMeans must put them into some group (ARI 0.78 measured).
FLOORS = {("knn", "auto"): 0.95, ("bigbang", "auto"): 0.95, ("knn", "cluster"): 0.75,
          ("bigbang", "cluster"): 0.95}


@pytest.mark.parametrize("mode,encoder", [("auto", "facenet_casia_tf"), ("auto", "mobilefacenet"),
                                          ("cluster", "facenet_casia_tf")])
def test_knn_and_bigbang_unsupervised(tmp_path, mode, encoder):
    for name, src, truth in (("knn", need(KNN / "train"), truth_knn),
                             ("bigbang", bigbang_photos(tmp_path), truth_bigbang)):
        floor = FLOORS[name, mode]
        out = tmp_path / f"{name}-{mode}"
        run_group(str(src), str(out), mode=mode, enc_model=encoder, group_log=True)
        rs = rows(out)
        score = ari(rs, truth)
        groups = sorted({r["group"] for r in rs})
        print(f"\n{name} {mode} {encoder}: ARI {score:.3f}, {len(rs)} faces, groups {groups}")
        assert score >= floor
        for r in rs:  # every listed picture is where the manifest says
            assert (out / r["file"]).is_file()
        assert (out / "group_log.csv").is_file()


def test_classify_against_references(tmp_path):
    # knn: references are the first training photo of each person; test photos are classified
    refs = tmp_path / "refs"
    for person in sorted(p.name for p in need(KNN / "train").iterdir()):
        (refs / person).mkdir(parents=True)
        first = sorted((KNN / "train" / person).iterdir())[0]
        shutil.copy(first, refs / person / first.name)
    out = tmp_path / "knn-classify"
    run_group(str(KNN / "test"), str(out), mode="classify", ref_dir=str(refs), enc_oth_thr=0.6)
    by_photo = {}
    for r in rows(out):  # bystanders in the test photos are "other"
        by_photo.setdefault(Path(r["source"]).stem, set()).add(r["group"])
    by_photo = {k: v - {"other"} for k, v in by_photo.items()}
    print(f"\nknn classify: {by_photo}")
    assert by_photo["alex_lacamoire1"] == {"alex_lacamoire"}
    assert by_photo["johnsnow_test1"] == {"kit_harington"}
    assert by_photo["obama1"] == {"obama"}
    assert by_photo["obama_and_biden"] == {"obama", "biden"}
    assert by_photo["kit_with_rose"] == {"kit_harington", "rose_leslie"}

    # bigbang: the facebank crops are the references; images/ are classified: accuracy and ARI
    refs = tmp_path / "facebank"
    for p in need(BIGBANG / "facebank").iterdir():
        (refs / p.stem).mkdir(parents=True)
        shutil.copy(p, refs / p.stem / p.name)
    out = tmp_path / "bigbang-classify"
    run_group(str(BIGBANG / "images"), str(out), mode="classify", ref_dir=str(refs), enc_oth_thr=0.7,
              group_log=True)
    rs = rows(out)
    acc = sum(r["group"] == truth_bigbang(r) for r in rs) / len(rs)
    print(f"bigbang classify: accuracy {acc:.2f} on {len(rs)} faces, ARI {ari(rs, truth_bigbang):.3f}")
    assert len(rs) == 5 and acc == 1.0
    log = list(csv.DictReader(open(out / "group_log.csv")))
    assert {"distance_Penny", "nearest_class"} <= set(log[0])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tidyface.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_group_edge_cases(tmp_path):
    # no faces at all: a clear message and a valid empty result
    empty = tmp_path / "nofaces"
    empty.mkdir()
    shutil.copy(need(MEDIA / "dlib_faces_landmarks/dogs.jpg"), empty / "dogs.jpg")
    out = tmp_path / "out"
    r = _cli("group", empty, "--out", out, "--det-model", "mtcnn")
    assert r.returncode == 0, r.stderr
    assert "no faces found" in r.stderr
    assert rows(out) == []
    # the same output folder again: refused, nothing touched
    r = _cli("group", empty, "--out", out)
    assert r.returncode == 2 and "already holds a tidyface group result" in r.stderr and "Traceback" not in r.stderr
    assert (out / "groups.csv").is_file()
    # one face: valid result (cluster mode cannot cluster one face: it says so)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(need(MEDIA / "skimage/astronaut.png"), one / "a.png")
    r = _cli("group", one, "--out", tmp_path / "o1", "--mode", "cluster", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert len(rows(tmp_path / "o1")) == 1
    # bad arguments are one-line errors
    r = _cli("group", one, "--out", tmp_path / "o2", "--mode", "classify")
    assert r.returncode == 2 and "--ref-dir" in r.stderr
    r = _cli("group", one, "--out", tmp_path / "o3", "--mode", "cluster", "--clusters", "9-2")
    assert r.returncode == 2 and "9-2" in r.stderr


def test_cropped_faces_and_dedup(tmp_path):
    """--cropped: the aligned pictures of a first run are grouped again as crops; an exact copy
    is dropped as a duplicate (the larger/sharper face of the set is kept)."""
    first = tmp_path / "first"
    run_group(str(need(KNN / "train")), str(first))
    crops = tmp_path / "crops"
    crops.mkdir()
    for r in rows(first):
        shutil.copy(first / r["file"], crops / Path(r["file"]).name)
    dup = sorted(crops.iterdir())[0]
    shutil.copy(dup, crops / ("copy_" + dup.name))
    out = tmp_path / "second"
    res = run_group(str(crops), str(out), cropped=True, hash_thr=0, enc_dup_thr=0)
    rs = rows(out)
    assert sum(r["group"] == "duplicate" for r in rs) == 1 and res.dropped == 1
    assert len(list((out / "_duplicates").iterdir())) == 1


def test_group_without_weights_leaves_no_output(tmp_path):
    env = dict(os.environ, TIDYFACE_HOME=str(tmp_path / "store"), TIDYFACE_MIRROR="", TIDYFACE_OFFLINE="1")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tidyface.cli", "group", str(need(KNN / "train")), "--out", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "TIDYFACE_OFFLINE=1" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
