"""video2faces --engine ray (tidyface/tasks/ray_engine.py) and --chunk-minutes, on a local Ray
cluster that the module starts (2 CPUs, no dashboard) and stops.

Input: three shared videos, their first 24 s (--video-fragment 0,0.4, --video-step 1); with
--chunk-minutes 0.2 only Video_2 is longer than a chunk, and is cut in two (0-12 s, 12-24 s).
The Ray run has 2 workers of 1 CPU, and the first task's worker kills itself (the test hook), so
that task runs again on the restarted worker.

What is the same, and how it was measured (2026-12-01, 2 shared cores, torch at 1 thread in
this process and in the workers: CPU results depend on the thread count, so runs compare at one):
- Ray against the local run with the same chunks: byte for byte. Face files (names and bytes),
  groups.csv, every column of every face table, the manifests but for their timings.
- A chunked video against the whole video's local run: the same face files (names and bytes)
  and table rows, but for what depends on batching and on what came before a chunk's start.
  The encoder's float results depend on how faces are batched (oneDNN picks kernels by batch
  size and thread count), and chunks batch differently; which faces the hash window deferred
  (crop_index, NaN embeddings) depends on the faces before the chunk. Measured here: only
  crop_index differs (embeddings 0.0 apart, groups.csv identical). In a trial with other spans
  (30 s at step 0.5 cut in three, 2 torch threads) embeddings differed by up to 3.4e-7 and 44
  of 164 rows were NaN against 47, groups.csv still identical; against that run a 1-thread Ray run's
  groups.csv had one distance 1e-4 apart (its 4th decimal). Asserted: embeddings within 2e-6,
  groups.csv equal but for distances within 2e-4.
A chunk is its own manifest entry, so a resumed run redoes only a chunk that is missing.
"""
import csv
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MEDIA, need, reference
from tidyface import read_faces
from tidyface.errors import UsageError
from tidyface.options import Video2FacesOptions
from tidyface.tasks.video2faces import Video2FacesError, video_to_faces

VIDEOS = {"a_walk.mp4": "videos/facenet_pytorch_video.mp4",
          "b_hamilton.mp4": "videos/face_recognition_short_hamilton_clip.mp4",
          "c_video2.mp4": "simplefr_video_with_identity_db/Video_2.mp4"}
FLAGS = dict(video_fragment="0,0.4", video_step=1.0)
CHUNKED = "03"  # c_video2.mp4, the third video
EMBEDDING_TOL = 2e-6
DISTANCE_TOL = 2e-4


def inputs(tmp: Path) -> Path:
    folder = tmp / "in"
    folder.mkdir()
    for name, rel in VIDEOS.items():
        (folder / name).symlink_to(need(MEDIA / rel))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ray = reference("ray")
    tmp = tmp_path_factory.mktemp("ray")
    src = inputs(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    marker = tmp / "died"
    os.environ["TIDYFACE_RAY_TEST_DIE_ONCE"] = str(marker)
    try:
        out = {"whole": video_to_faces(str(src), out_dir=str(tmp / "whole"), **FLAGS),
               "ray": video_to_faces(str(src), out_dir=str(tmp / "ray"), engine="ray", chunk_minutes=0.2,
                                     **FLAGS)}
        os.environ.pop("TIDYFACE_RAY_TEST_DIE_ONCE")
        out["chunks"] = video_to_faces(str(src), out_dir=str(tmp / "chunks"), chunk_minutes=0.2, **FLAGS)
    finally:
        os.environ.pop("TIDYFACE_RAY_TEST_DIE_ONCE", None)
        ray.shutdown()
        torch.set_num_threads(threads)
    return tmp, out, marker


def faces(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in (out / "faces").iterdir()}


def groups(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "groups.csv")))


def manifest(out: Path) -> dict:
    m = json.loads((out / ".tidyface/manifest.json").read_text())
    for v in m["videos"].values():
        v.pop("seconds")
    return m


def columns(out: Path) -> dict:
    t = read_faces(out)
    return {k: getattr(t, k) for k in t.__dataclass_fields__}


def same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if a.dtype == object:
        return list(a) == list(b)
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def test_ray_run_is_the_local_run_byte_for_byte(runs):
    tmp, out, marker = runs
    ray_out, local = tmp / "ray", tmp / "chunks"
    assert marker.exists(), "the test hook did not kill a worker"
    assert out["ray"]["failed"] == [] and out["ray"]["videos"] == 3
    assert faces(ray_out) == faces(local) and len(faces(local)) > 50
    assert (ray_out / "groups.csv").read_bytes() == (local / "groups.csv").read_bytes()
    a, b = columns(ray_out), columns(local)
    assert all(same(a[k], b[k]) for k in a), [k for k in a if not same(a[k], b[k])]
    m = manifest(ray_out)
    assert m == manifest(local)
    assert list(m["videos"]) == ["01", "02", f"{CHUNKED}_c0000", f"{CHUNKED}_c0001"]
    assert m["videos"][f"{CHUNKED}_c0001"]["fragment"] == [0.2, 0.4]
    assert not list(ray_out.rglob("*.part*")), "a killed worker's half-written files were left"
    for k in ("frames", "faces", "rejected", "duplicates", "groups"):
        assert out["ray"][k] == out["chunks"][k] == out["whole"][k], k


def test_chunked_video_gives_the_whole_videos_faces(runs):
    tmp, out, _ = runs
    whole, chunked = tmp / "whole", tmp / "chunks"
    assert faces(chunked) == faces(whole)
    a, b = columns(whole), columns(chunked)
    for k in a:
        if k not in ("embeddings", "crop_index"):
            assert same(a[k], b[k]), k
    video = np.array([str(n).startswith(f"{CHUNKED}_") for n in a["name"]])
    for k in ("embeddings", "crop_index"):  # the videos that were not chunked: exactly
        assert same(a[k][~video], b[k][~video]), k
    both = ~np.isnan(a["embeddings"]).any(1) & ~np.isnan(b["embeddings"]).any(1)
    diff = np.abs(a["embeddings"][both] - b["embeddings"][both]).max()
    print(f"\nchunked vs whole: embeddings max abs diff {diff:.2e} over {both.sum()} faces")
    assert diff <= EMBEDDING_TOL
    ga, gb = groups(whole), groups(chunked)
    assert [{**r, "distance": None} for r in ga] == [{**r, "distance": None} for r in gb]
    far = max((abs(float(x["distance"]) - float(y["distance"])) for x, y in zip(ga, gb) if x["distance"]),
              default=0.0)
    assert far <= DISTANCE_TOL


def test_resume_redoes_only_the_missing_chunk(runs, capfd):
    tmp, out, _ = runs
    work = tmp / "resume"
    shutil.copytree(tmp / "chunks", work, symlinks=True)
    m = json.loads((work / ".tidyface/manifest.json").read_text())
    m["videos"][f"{CHUNKED}_c0001"]["status"] = "pending"  # as a run stopped before it finished
    (work / ".tidyface/manifest.json").write_text(json.dumps(m))
    (work / f".tidyface/video_{CHUNKED}_c0001.npz").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capfd.readouterr()
        video_to_faces(str(tmp / "in"), out_dir=str(work), chunk_minutes=0.2, **FLAGS)
    finally:
        torch.set_num_threads(threads)
    err = capfd.readouterr().err
    assert "c_video2.mp4 chunk 0: done in an earlier run, skipped" in err
    assert "chunk 1: done in an earlier run" not in err
    assert (work / "groups.csv").read_bytes() == (tmp / "chunks/groups.csv").read_bytes()
    assert faces(work) == faces(tmp / "chunks")


def test_changing_the_chunks_is_refused_before_any_work(runs):
    tmp, _, _ = runs
    with pytest.raises(Video2FacesError, match="other inputs or detection settings"):
        video_to_faces(str(tmp / "in"), out_dir=str(tmp / "chunks"), chunk_minutes=0.1, **FLAGS)


def test_missing_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    from tidyface.tasks import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UsageError) as e:  # refused with the flags, before any work
        Video2FacesOptions(input=str(tmp_path / "v.mp4"), engine="ray")
    assert str(e.value) == '--engine ray needs Ray: pip install "tidyface[ray]"'
    with pytest.raises(Video2FacesError) as e:
        ray_engine.import_ray()
    assert str(e.value) == '--engine ray needs Ray: pip install "tidyface[ray]"'
    assert not (tmp_path / "v_faces").exists()


def test_ray_flags_need_the_ray_engine():
    with pytest.raises(UsageError, match="--workers.*only with --engine ray"):
        Video2FacesOptions(input="x.mp4", workers=2)
    with pytest.raises(UsageError, match="--video-device"):
        Video2FacesOptions(input="x.mp4", video_device="cuda")  # opencv decodes on the CPU only


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed (pip install ray)")
def test_ray_workers_may_have_the_gpu_the_driver_lacks(monkeypatch):
    """--device cuda names the workers' device under --engine ray: checked as a device name only,
    and the driver's own models (grouping, references) fall back to the CPU where it has no GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device cuda: no CUDA GPU is available here"):
        Video2FacesOptions(input="x.mp4", device="cuda")
    o = Video2FacesOptions(input="x.mp4", device="cuda", engine="ray", worker_gpus=1)
    assert o.device == "cuda" and o.driver_device() == "cpu"
    assert Video2FacesOptions(input="x.mp4", device="cpu", engine="ray").driver_device() == "cpu"
    with pytest.raises(UsageError, match="--device cuda with --engine ray: give --worker-gpus"):
        Video2FacesOptions(input="x.mp4", device="cuda", engine="ray")
    with pytest.raises(UsageError, match="not a torch device"):
        Video2FacesOptions(input="x.mp4", device="gpu0", engine="ray", worker_gpus=1)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed (pip install ray)")
def test_the_local_path_never_imports_ray(tmp_path):
    video = need(MEDIA / "videos/facenet_pytorch_video.mp4")
    code = ("import sys; from tidyface.tasks.video2faces import video_to_faces; "
            f"video_to_faces({str(video)!r}, out_dir={str(tmp_path / 'o')!r}, video_fragment='0,0.03', "
            "chunk_minutes=0.01); assert 'ray' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
