"""A model from another package: tests/plugin_boxonly is installed (pip, into a folder put on
PYTHONPATH), registers a detector that gives boxes without landmarks through the
`tidyface.models` entry point, and crop, embed, group and video2faces all run with it."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MEDIA, need

PLUGIN = Path(__file__).parent / "plugin_boxonly"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(PLUGIN)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def cli(env, *args):
    r = subprocess.run([sys.executable, "-m", "tidyface.cli", *map(str, args)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    return r


def test_the_plugin_is_listed_with_its_source(env):
    out = cli(env, "models", "--task", "detect").stdout
    assert any(line.startswith("boxonly_detector") and line.rstrip().endswith("tidyface-boxonly")
               for line in out.splitlines())


def test_crop_frames_landmark_free_faces_by_their_boxes(env, tmp_path):
    cli(env, "crop", need(MEDIA / "skimage/astronaut.png"), "--out", tmp_path, "--det-model", "boxonly_detector")
    (name, rec), = json.loads((tmp_path / "crops.json").read_text()).items()
    m = np.array(rec["matrix"])
    assert rec["landmarks"] == [] and np.allclose(m[0, 1], 0) and m[0, 0] > 0  # box framing: no rotation
    x1, y1, x2, y2 = rec["box"]
    centre = m @ np.array([(x1 + x2) / 2, (y1 + y2) / 2, 1])
    assert abs(centre[0] - 127.5) < 30 and abs(centre[1] - 127.5) < 60  # the face is in the crop


def test_embed_and_group(env, tmp_path):
    photos = need(MEDIA / "face_recognition/knn_examples/train")
    cli(env, "embed", photos, "--out", tmp_path / "e.npz", "--det-model", "boxonly_detector",
        "--model", "mobilefacenet")
    z = np.load(tmp_path / "e.npz")
    assert len(z["embeddings"]) >= 5 and z["landmarks"].shape[1] == 0
    assert np.allclose(np.linalg.norm(z["embeddings"], axis=1), 1, atol=1e-5)
    cli(env, "group", photos, "--out", tmp_path / "g", "--det-model", "boxonly_detector")
    rows = list(csv.DictReader(open(tmp_path / "g/groups.csv")))
    assert len(rows) == len(z["embeddings"]) and all((tmp_path / "g" / r["file"]).is_file() for r in rows)


def test_video2faces(env, tmp_path):
    video = need(MEDIA / "videos/face_recognition_short_hamilton_clip.mp4")
    r = cli(env, "video2faces", video, "--out-dir", tmp_path, "--det-model", "boxonly_detector",
            "--video-step", "1")
    assert "faces kept" in r.stderr
    z = np.load(tmp_path / ".tidyface/video_01.npz")
    assert len(z["name"]) > 0 and z["landmarks"].shape[1] == 0 and z["crop_mat"].shape == (len(z["name"]), 3, 3)
    assert (tmp_path / "groups.csv").is_file()
