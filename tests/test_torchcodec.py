"""--video-reader torchcodec (ops/video.py, _TorchCodecSource): the frames OpenCV samples.

torchcodec fetches frames by index from the index it builds when it opens a file (exact seek
mode), so the reader looks up each target's frame instead of decoding every frame in order; the
selection rule (the first frame whose timestamp reaches each target) is the one OpenCV and PyAV
follow frame by frame.
Set-up measured here: torchcodec 0.13.0 (PyPI's last release built for CPU torch: the 0.14-0.17
wheels there link libtorch_cuda and CUDA 13) on torch 2.13.0+cpu, with Debian 12's FFmpeg 5.1
shared libraries (apt-get install libavdevice59 libavfilter8 libavformat59 libavcodec59 libswscale6
libswresample4). Measured 2026-12-01: the same indices as OpenCV, and identical pixels (max abs
difference 0 grey levels), on the three shared videos (Video_2 at 36-45 s, where its 24000/1001
frame rate puts frame 984, not 983, at 41 s) and on synthetic videos whose frames draw their own
index (steps 1, 0.25, every frame; fragments; an area; variable frame rate; rotation 90/180/-90;
a truncated AVI: the same 33 frames, then the decoder's error). Asserted: indices equal, pixels
within 1 grey level (colour conversion is FFmpeg's swscale on both sides, but the builds differ:
OpenCV's own FFmpeg against the system's).
No GPU here: --video-device cuda is only checked to be refused where CUDA is absent.
"""
import math
import sys

import numpy as np
import pytest

from conftest import MEDIA, need
from test_video_io import _write_pyav, av_only, indices, read_index, write
from tidyface.ops.video import VideoReader, VideoReadError, probe, sample_frames

GREY_TOL = 1


def _torchcodec_loads() -> str:
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        return f"torchcodec unavailable ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})"
    return ""


needs_torchcodec = pytest.mark.skipif(bool(_torchcodec_loads()), reason=_torchcodec_loads() or "-")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"mp4": write(d / "v25.mp4", "mp4v", 25, 200), "avi": write(d / "v10.avi", "MJPG", 10, 60)}


def same_frames(path, drawn=True, **kw):
    """OpenCV's and torchcodec's frames of one read: indices, times and summaries equal, pixels
    within GREY_TOL; -> the indices and the largest pixel difference."""
    with VideoReader(path, reader="opencv", **kw) as r:
        a = list(r)
    with VideoReader(path, reader="torchcodec", **kw) as s:
        b = list(s)
    got = [f.index for f in b]
    assert [f.index for f in a] == got
    assert not drawn or all(read_index(f.image) == f.index for f in b)  # each is the frame it names
    assert [f.time_s for f in a] == pytest.approx([f.time_s for f in b], abs=1e-6)
    assert r.summary.frames_read == s.summary.frames_read and r.summary.reached_end == s.summary.reached_end
    diff = max((int(np.abs(x.image.astype(int) - y.image.astype(int)).max()) for x, y in zip(a, b)), default=0)
    assert all(x.image.shape == y.image.shape and x.offset == y.offset for x, y in zip(a, b))
    assert diff <= GREY_TOL
    return got, diff


@needs_torchcodec
@pytest.mark.parametrize("name,kw", [
    ("videos/face_recognition_short_hamilton_clip.mp4", dict(step=1.0)),  # stream starts at 0.852 s
    ("videos/facenet_pytorch_video.mp4", dict(step=0.5)),
    ("simplefr_video_with_identity_db/Video_2.mp4", dict(step=1.0, fragment=(0.6, 0.75)))])
def test_shared_videos_same_frames_as_opencv(name, kw):
    got, diff = same_frames(need(MEDIA / name), drawn=False, **kw)
    print(f"\n{name}: {len(got)} frames, max pixel difference {diff}")
    if "Video_2" in name:
        assert got[5:7] == [983 + 1, 1007] and got[0] == -(-36 * 24000 // 1001)  # 41 s, 42 s; 36 s


@needs_torchcodec
@pytest.mark.parametrize("kw", [dict(step=1.0), dict(step=0.25), dict(step=0.01), dict(step=1.0, fragment=(0.05, 0.1)),
                                dict(step=2.0, fragment=(0.01, 0.05)), dict(step=1.0, area=(10, 20, 100, 90))])
@pytest.mark.parametrize("kind", ["mp4", "avi"])
def test_synthetic_videos_same_frames_as_opencv(videos, kind, kw):
    same_frames(videos[kind], drawn="area" not in kw, **kw)


@needs_torchcodec
@av_only
def test_variable_frame_rate_and_rotation(tmp_path):
    times = [i * 40 for i in range(50)] + [2000 + i * 80 for i in range(50)]  # 25 fps, then 12.5 fps
    vfr = _write_pyav(tmp_path / "vfr.mp4", times)
    assert same_frames(vfr, step=1.0)[0] == [0, 25, 50, 63, 75, 88]  # the mean rate misplaces 63..88
    same_frames(vfr, step=0.1)
    for rotation in (90, 180, -90):
        path = _write_pyav(tmp_path / f"rot{rotation}.mp4", [i * 100 for i in range(12)], rotation)
        assert same_frames(path, drawn=False, step=0.5)[0] == [0, 5, 10]
        assert (probe(path, "torchcodec").width, probe(path, "torchcodec").height) == \
            (probe(path, "opencv").width, probe(path, "opencv").height)


@needs_torchcodec
def test_damaged_and_unreadable_files(videos, tmp_path):
    data = videos["avi"].read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    got, _ = same_frames(cut, step=0.01)
    with VideoReader(cut, reader="torchcodec", step=0.01) as r:
        list(r)
    assert r.ended_early and r.error.startswith(f"decoding stopped at frame {len(got)}: ") and ".cpp" not in r.error
    short = tmp_path / "cut.mp4"
    short.write_bytes(videos["mp4"].read_bytes()[:int(videos["mp4"].stat().st_size * 0.6)])
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    for path, what in ((short, "looks like MP4/MOV but torchcodec cannot open it"), (text, "not a readable video")):
        with pytest.raises(VideoReadError) as e:
            VideoReader(path, reader="torchcodec")
        assert str(e.value).startswith(f"{path}: ") and what in str(e.value) and "\n" not in str(e.value)


@needs_torchcodec
def test_cuda_decoding_is_refused_without_a_gpu(videos):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    with pytest.raises(ValueError, match="no CUDA GPU is available here"):
        VideoReader(videos["mp4"], reader="torchcodec", device="cuda")
    with pytest.raises(ValueError, match="only reader='torchcodec' decodes on a GPU"):
        VideoReader(videos["mp4"], reader="opencv", device="cuda")


def test_missing_torchcodec_gives_install_hint(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # the import now raises ImportError
    with pytest.raises(ImportError, match=r"^reader='torchcodec' needs torchcodec and FFmpeg's shared libraries"):
        VideoReader(videos["mp4"], reader="torchcodec")


@pytest.mark.parametrize("reader", ["opencv", pytest.param("torchcodec", marks=needs_torchcodec)])
def test_fragments_that_meet_tile_the_stream(videos, reader):
    """What --chunk-minutes relies on: [a, b) then [b, c) sample exactly what [a, c) does, even
    where a frame lies within the timestamp tolerance before b (25 fps: frame 25 at 1 s; a step
    of 0.04 s puts a target on every frame)."""
    path = videos["mp4"]
    whole, _ = indices(path, reader, step=0.04, fragment=(0, 0.1))
    for b in (1 / 60, (1 + 5e-7) / 60, 0.0501, 0.05):  # 1 s, frame 25 just before b, 3.006 s, 3 s
        parts = indices(path, reader, step=0.04, fragment=(0, b))[0] + indices(path, reader, step=0.04,
                                                                               fragment=(b, 0.1))[0]
        assert parts == whole, b
    assert indices(path, reader, step=1.0, fragment=(0.05, -1))[0] == [75, 100, 125, 150, 175]  # -1: to the end
    assert math.isfinite(probe(path, reader).duration_s)


@needs_torchcodec
def test_video2faces_with_torchcodec_saves_the_same_faces(tmp_path):
    from tidyface.tasks.video2faces import video_to_faces

    video = need(MEDIA / "videos/face_recognition_short_hamilton_clip.mp4")
    flags = dict(video_fragment="0,0.1", video_step=1.0)
    a = video_to_faces(str(video), out_dir=str(tmp_path / "cv"), **flags)
    b = video_to_faces(str(video), out_dir=str(tmp_path / "tc"), video_reader="torchcodec", **flags)
    fa = {p.name: p.read_bytes() for p in (tmp_path / "cv/faces").iterdir()}
    fb = {p.name: p.read_bytes() for p in (tmp_path / "tc/faces").iterdir()}
    assert fa == fb and a["faces"] == b["faces"] > 0
    assert (tmp_path / "cv/groups.csv").read_bytes() == (tmp_path / "tc/groups.csv").read_bytes()
    assert sample_frames(video, reader="torchcodec", fragment=(0, 0.02)).info.frame_count == 275
