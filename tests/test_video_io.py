"""Video sampling: exact indices by timestamps, fragments, areas, both readers, damaged files.

Synthetic videos are written with cv2.VideoWriter; every frame draws its own index as 10 black or
white 32x32 blocks (survives MPEG-4 and MJPEG compression), so each yielded image proves which
frame it really is (no off-by-one between grab and retrieve).
"""
import fractions
import math
import struct
import sys
import warnings

import cv2
import numpy as np
import pytest
from conftest import MEDIA, need

from tidyface.ops.video import VideoReader, VideoReadError, _Selector, probe, sample_frames

W, H = 160, 128


def pattern(i: int) -> np.ndarray:
    """RGB frame showing i in binary (top half) over a fixed colour pattern (bottom half)."""
    img = np.zeros((H, W, 3), np.uint8)
    for b in range(10):
        r, c = divmod(b, 5)
        if (i >> b) & 1:
            img[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = 255
    img[64:, :80] = (200, 40, 40)
    img[64:, 80:] = (40, 40, 200)
    img[96:, :, 1] = np.arange(W, dtype=np.uint8)[None]
    return img


def read_index(img: np.ndarray) -> int:
    """The index drawn by pattern(), from the centres of its blocks."""
    return sum(1 << b for b in range(10)
               if img[(b // 5) * 32 + 8:(b // 5) * 32 + 24, (b % 5) * 32 + 8:(b % 5) * 32 + 24].mean() > 127)


def write(path, fourcc: str, fps: int, n: int):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
    assert w.isOpened(), f"OpenCV cannot write {fourcc}"
    for i in range(n):
        w.write(pattern(i)[..., ::-1])
    w.release()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"mp4": (write(d / "v25.mp4", "mp4v", 25, 200), 25, 200),   # 8 s
            "avi": (write(d / "v10.avi", "MJPG", 10, 60), 10, 60)}      # 6 s


def indices(path, reader="opencv", drawn=True, **kw):
    """Sampled indices (checked against the index drawn in each image) and the closed reader."""
    with VideoReader(path, reader=reader, **kw) as r:
        frames = list(r)
    for f in frames if drawn else ():
        assert read_index(f.image) == f.index, "yielded image is not the frame its index names"
    return [f.index for f in frames], r


READERS = ["opencv", pytest.param("pyav", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("av") is None, reason="PyAV not installed (pip install av)"))]
av_only = pytest.mark.skipif(__import__("importlib").util.find_spec("av") is None,
                             reason="PyAV not installed (pip install av)")


@pytest.mark.parametrize("reader", READERS)
def test_probe(videos, reader):
    for path, fps, n in videos.values():
        info = probe(path, reader)
        assert (info.fps, info.frame_count, info.width, info.height) == (fps, n, W, H)
        assert info.duration_s == pytest.approx(n / fps)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", ["mp4", "avi"])
def test_one_second_step_takes_every_fps_th_frame_from_frame_0(videos, kind, reader):
    path, fps, n = videos[kind]
    got, r = indices(path, reader, step=1.0)
    assert got == list(range(0, n, fps))
    s = r.summary
    assert (s.frames_read, s.frames_sampled, s.reached_end, s.truncated_suspect, s.error, s.time_source) == \
        (n, len(got), True, False, None, "timestamps")


@pytest.mark.parametrize("reader", READERS)
def test_quarter_second_step_at_25fps(videos, reader):
    path, _, n = videos["mp4"]
    got, _ = indices(path, reader, step=0.25)
    # Target k*0.25 s is first reached by frame ceil(k * 25 / 4) (frame i is shown at i/25 s).
    assert got == [-(-k * 25 // 4) for k in range(32)]
    assert got[:6] == [0, 7, 13, 19, 25, 32]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", ["mp4", "avi"])
def test_step_below_frame_interval_yields_every_frame_once(videos, kind, reader):
    path, fps, n = videos[kind]
    got, _ = indices(path, reader, step=0.3 / fps)
    assert got == list(range(n))


@pytest.mark.parametrize("reader", READERS)
def test_fragment_in_minutes_and_early_stop(videos, reader):
    path, _, n = videos["mp4"]
    got, r = indices(path, reader, step=1.0, fragment=(0.05, 0.1))  # [3 s, 6 s)
    assert got == [75, 100, 125]
    # It stops right after the fragment's last target, without decoding the rest.
    assert r.summary.frames_read == 126 and not r.summary.reached_end and not r.ended_early
    assert indices(path, reader, step=1.0, fragment=(0.05, None))[0] == [75, 100, 125, 150, 175]
    assert indices(path, reader, step=1.0, fragment=(0.05, math.inf))[0] == [75, 100, 125, 150, 175]
    assert indices(path, reader, step=2.0, fragment=(0.01, 0.05))[0] == [15, 65]  # 0.6 s, 2.6 s


@pytest.mark.parametrize("reader", READERS)
def test_area_crops_region_and_reports_offset(videos, reader):
    path, _, _ = videos["mp4"]
    full = {f.index: f.image for f in sample_frames(path, step=2.0, reader=reader)}
    crops = list(sample_frames(path, step=2.0, area=(40, 20, 999, 999), reader=reader))  # clipped to frame
    assert [f.index for f in crops] == sorted(full)
    for f in crops:
        assert f.offset == (40, 20) and f.image.shape == (H - 20, W - 40, 3) and f.image.dtype == np.uint8
        assert f.image.flags.c_contiguous
        np.testing.assert_array_equal(f.image, full[f.index][20:, 40:])
    with pytest.raises(ValueError, match=r"area \(200, 0, 300, 50\).*empty inside the 160x128 frame"):
        VideoReader(path, area=(200, 0, 300, 50), reader=reader)
    with pytest.raises(ValueError, match=r"area \(50, 10, 50, 90\).*empty"):
        VideoReader(path, area=(50, 10, 50, 90), reader=reader)


@av_only
@pytest.mark.parametrize("kind", ["mp4", "avi"])
def test_opencv_and_pyav_agree_on_indices_and_pixels(videos, kind):
    path, fps, _ = videos[kind]
    for step in (1.0, 0.25, 0.3, 0.7 / fps):
        a = list(sample_frames(path, step=step, reader="opencv"))
        b = list(sample_frames(path, step=step, reader="pyav"))
        assert [f.index for f in a] == [f.index for f in b]
        assert [f.time_s for f in a] == pytest.approx([f.time_s for f in b], abs=1e-9)
    # Both go through FFmpeg's decoder and swscale: the pixels are identical.
    assert max(int(np.abs(x.image.astype(int) - y.image).max()) for x, y in zip(a, b)) == 0


@pytest.mark.parametrize("reader", READERS)
def test_decoder_threads_change_no_frame(videos, reader):
    path, _, _ = videos["mp4"]
    with VideoReader(path, step=0.25, reader=reader) as r:
        default = [(f.index, f.image) for f in r]
    with VideoReader(path, step=0.25, reader=reader, threads=1) as r:
        single = [(f.index, f.image) for f in r]
    assert [i for i, _ in single] == [i for i, _ in default]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(single, default))
    for bad in (0, -2, 1.5, "2"):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            VideoReader(path, reader=reader, threads=bad)


@pytest.mark.parametrize("reader", READERS)
def test_bad_arguments(videos, reader):
    path = videos["avi"][0]
    for step in (0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="step must be a number of seconds > 0"):
            VideoReader(path, step=step, reader=reader)
    with pytest.raises(ValueError, match="fragment"):
        VideoReader(path, fragment=(0.2, 0.1), reader=reader)
    with pytest.raises(ValueError, match="reader must be one of opencv, pyav"):
        VideoReader(path, reader="ffmpeg")


@pytest.mark.parametrize("reader", READERS)
def test_unreadable_files_give_one_line_errors(tmp_path, reader):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    cases = {empty: "empty file (0 bytes)", text: "not a readable video",
             tmp_path / "missing.mp4": "no such file", tmp_path: "is a directory"}
    for path, what in cases.items():
        for call in (lambda: probe(path, reader), lambda: VideoReader(path, reader=reader)):
            with pytest.raises(VideoReadError) as e:
                call()
            msg = str(e.value)
            assert "\n" not in msg and msg.startswith(f"{path}: ") and what in msg, msg


@pytest.mark.parametrize("reader", READERS)
def test_truncated_avi_reads_what_decodes_and_reports_it(videos, tmp_path, reader):
    path, fps, n = videos["avi"]
    cut = tmp_path / "cut.avi"
    data = path.read_bytes()
    cut.write_bytes(data[:int(len(data) * 0.6)])
    got, r = indices(cut, reader, step=0.01)  # every frame; content checked against index
    assert 0.4 * n < len(got) < 0.7 * n and got == list(range(len(got)))
    s = r.summary
    assert s.reached_end and s.truncated_suspect and r.ended_early and s.frame_count == n
    if reader == "pyav":  # PyAV reports the decoder's complaint; OpenCV's grab() only stops
        assert s.error.startswith(f"decoding stopped after {len(got)} frames")


@pytest.mark.parametrize("reader", READERS)
def test_truncated_mp4_without_index_is_refused_as_truncated(videos, tmp_path, reader):
    path = videos["mp4"][0]
    cut = tmp_path / "cut.mp4"
    data = path.read_bytes()
    cut.write_bytes(data[:int(len(data) * 0.6)])  # cv2 writes the moov index at the end
    with pytest.raises(VideoReadError, match=r"looks like MP4/MOV .* truncated or corrupt") as e:
        VideoReader(cut, reader=reader)
    assert "\n" not in str(e.value) and str(cut) in str(e.value)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("count", [10, 0])
def test_wrong_frame_count_metadata_still_reads_to_the_end(videos, tmp_path, reader, count):
    path, fps, n = videos["avi"]
    data = bytearray(path.read_bytes())
    avih, strh = data.find(b"avih"), data.find(b"strh")
    data[avih + 24:avih + 28] = struct.pack("<I", count)  # MainAVIHeader.dwTotalFrames
    data[strh + 40:strh + 44] = struct.pack("<I", count)  # AVIStreamHeader.dwLength
    liar = tmp_path / "liar.avi"
    liar.write_bytes(bytes(data))
    assert probe(liar, reader).frame_count == (count or None)
    got, r = indices(liar, reader, step=1.0)
    assert got == list(range(0, n, fps)) and r.frames_read == n and not r.ended_early


def test_selector_falls_back_to_index_over_fps_once_when_timestamps_break():
    sel = _Selector(step=0.1, start_s=0.0, end_s=math.inf, fps=10.0, path="x.mp4")
    raw = [5.0, 5.1, 5.2, 5.2, None, 0.0, 0.0, 0.0]  # a repeat, then missing: index / fps from frame 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [sel.decide(i, t) for i, t in enumerate(raw)]
    assert [a for a, _ in out] == ["take"] * 8
    assert [t for _, t in out] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert sel.time_source == "index/fps"
    assert len(caught) == 1 and "x.mp4: timestamps missing or not increasing at frame 3" in str(caught[0].message)
    no_fps = _Selector(1.0, 0.0, math.inf, None, "y.mp4")
    no_fps.decide(0, 0.0)
    with pytest.raises(VideoReadError, match="y.mp4: frame 1 has no usable timestamp"):
        no_fps.decide(1, None)


def test_selector_advances_past_every_target_a_frame_overshoots():
    sel = _Selector(step=0.1, start_s=0.0, end_s=math.inf, fps=None, path="x")
    times = [0.0, 0.35, 0.36, 0.41, 1.0]  # 0.35 reaches 0.1..0.3: one sample, next target 0.4
    assert [sel.decide(i, t)[0] for i, t in enumerate(times)] == ["take", "take", "skip", "take", "take"]


def test_pyav_missing_gives_install_hint(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(ImportError, match=r"^reader='pyav' needs PyAV: pip install av$"):
        VideoReader(videos["avi"][0], reader="pyav")


def _write_pyav(path, times_ms, rotation=0):
    """mpeg4 in mp4 with the given presentation times (variable frame rate) and display rotation."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 1000)
        if rotation:
            s.set_display_rotation(rotation)
        for i, ms in enumerate(times_ms):
            f = av.VideoFrame.from_ndarray(pattern(i), format="rgb24")
            f.pts, f.time_base = ms, fractions.Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@av_only
@pytest.mark.parametrize("reader", READERS)
def test_variable_frame_rate_is_sampled_by_timestamps_not_fps(tmp_path, reader):
    times = [i * 40 for i in range(50)] + [2000 + i * 80 for i in range(50)]  # 25 fps, then 12.5 fps
    path = _write_pyav(tmp_path / "vfr.mp4", times)
    assert probe(path, reader).fps != pytest.approx(25)  # the average rate: neither part's rate
    got, r = indices(path, reader, step=1.0)
    assert got == [next(i for i, t in enumerate(times) if t >= 1000 * k) for k in range(6)]
    assert got == [0, 25, 50, 63, 75, 88] and r.summary.time_source == "timestamps"


@av_only
@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_rotation_metadata_is_applied_the_same_by_both_readers(tmp_path, rotation):
    path = _write_pyav(tmp_path / "rot.mp4", [i * 100 for i in range(12)], rotation)
    a = list(sample_frames(path, step=0.5, reader="opencv"))
    b = list(sample_frames(path, step=0.5, reader="pyav"))
    assert [f.index for f in a] == [f.index for f in b] == [0, 5, 10]
    shape = (H, W, 3) if rotation == 180 else (W, H, 3)
    for reader in ("opencv", "pyav"):
        assert (probe(path, reader).height, probe(path, reader).width) == shape[:2]
    for x, y in zip(a, b):
        assert x.image.shape == y.image.shape == shape
        np.testing.assert_array_equal(x.image, y.image)


def test_close_releases_and_context_manager(videos):
    path = videos["mp4"][0]
    with VideoReader(path, step=1.0) as r:
        first = next(r)
    assert first.index == 0 and r._src.cap is None
    assert list(r) == []  # closed: nothing more


@pytest.mark.parametrize("reader", READERS)
def test_real_videos(reader):
    """Real files: the Hamilton clip's stream starts at 0.852 s (PyAV's raw times; OpenCV's are
    relative), which must not shift indices; Video_2 is 24000/1001 fps, so the frame reaching k
    seconds is ceil(k * 24000 / 1001): 24k up to 41 s, then 24k - 1."""
    for name, fps_num, fps_den, n in (("videos/face_recognition_short_hamilton_clip.mp4", 2997, 100, 275),
                                      ("videos/facenet_pytorch_video.mp4", 25, 1, 105)):
        got, r = indices(need(MEDIA / name), reader, False, step=1.0)
        assert r.frames_read == n and not r.ended_early
        assert len(got) == math.ceil(n * fps_den / fps_num)
        assert got == [-(-k * fps_num // fps_den) for k in range(len(got))]
    video2 = need(MEDIA / "simplefr_video_with_identity_db/Video_2.mp4")
    got, r = indices(video2, reader, False, step=1.0, fragment=(0, 0.75))  # first 45 s, to stay fast
    assert got == [-(-k * 24000 // 1001) for k in range(45)]
    assert got[40:44] == [960, 984, 1007, 1031]
    assert r.frames_read == got[-1] + 1
