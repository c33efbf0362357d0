"""Video io: exact frame sampling by presentation time (OpenCV, PyAV or torchcodec).

OpenCV and PyAV count frames by reading the stream in order, never by seeking (OpenCV's seek is
inexact for most codecs, so a seek-based index can be off by several frames). Every frame is demuxed
and decoded (grab), but only the sampled ones are converted to RGB (retrieve), which is the costly
part. torchcodec indexes every frame by its timestamp when it opens a file (its "exact" seek mode
scans the packets), so it fetches frames by index: only those it looks at are decoded to RGB, a
fragment starts at the keyframe before it, and it can decode on a CUDA GPU (NVDEC).
Selection uses the container's timestamps, so a file whose fps metadata is wrong still samples at
real times; the readers count and time frames the same way and yield the same indices.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import InputError

READERS = ("opencv", "pyav", "torchcodec")
# Absorbs float rounding only (pts * time_base computed two ways by OpenCV and PyAV). Not larger:
# at 24000/1001 fps frame 983 is stamped 0.96 ms before 41 s, and must not count as reaching it.
TIME_TOLERANCE_S = 1e-6
# The decoder ending before this share of the frame count in the metadata suggests a truncated file.
TRUNCATED_SHARE = 0.98


class VideoReadError(InputError):
    """A video that cannot be read; the one-line message names the file and what is wrong."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says. frame_count and fps are metadata and may be wrong (None: not stated)."""

    path: str
    fps: float | None
    frame_count: int | None
    width: int
    height: int
    duration_s: float | None


@dataclass(frozen=True, eq=False)
class Frame:
    """One sampled frame.

    index: 0-based position of the frame in the decoded stream (counted, not sought);
    time_s: its presentation time in seconds from the first frame;
    image: RGB uint8 (H,W,3); with an `area` it is that region only, so a box found in it must be
    shifted by `offset` = (x1, y1) to be in full-frame pixels.
    """

    index: int
    time_s: float
    image: np.ndarray
    offset: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class ReadSummary:
    """How a read went. truncated_suspect: the decoder ended (not the fragment) before
    TRUNCATED_SHARE of the metadata frame count; error: the decoder's error text, if it raised one;
    time_source: "timestamps", or "index/fps" when the file's timestamps were unusable."""

    frames_read: int
    frames_sampled: int
    frame_count: int | None
    reached_end: bool
    truncated_suspect: bool
    error: str | None
    time_source: str


# ----------------------------------------------------------------------------- checks and probing

def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoReadError(f"{path}: no such file")
    if path.is_dir():
        raise VideoReadError(f"{path}: is a directory, not a video file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)")


def _container_kind(path: Path) -> str | None:
    """The container a file's first bytes announce, to tell 'damaged video' from 'not a video'."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free"):
        return "MP4/MOV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:3] == b"FLV":
        return "FLV"
    if head[:4] == b"\x00\x00\x01\xba" or head[:1] == b"\x47":
        return "MPEG"
    return None


def _unreadable(path: Path, who: str) -> VideoReadError:
    kind = _container_kind(path)
    if kind:
        why = (f"looks like {kind} but {who} cannot open it: truncated or corrupt? "
               "(an MP4 cut short loses the index stored at its end)")
    else:
        why = f"not a readable video ({who} cannot open it; is it a video?)"
    return VideoReadError(f"{path}: {why}")


def _positive(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) and float(x) > 0 else None


def probe(path: str | os.PathLike, reader: str = "opencv") -> VideoInfo:
    """Open a video, decode its first frame, and return what its metadata says.

    Raises VideoReadError (one line naming the file) for a missing, empty, non-video or
    undecodable file. width/height are those of the displayed frame (rotation metadata applied).
    """
    src = _open(Path(path), reader)
    src.close()
    return src.info


# ----------------------------------------------------------------------------- the two decoders

class _OpenCVSource:
    """cv2.VideoCapture on the FFmpeg backend (OpenCV applies rotation metadata itself)."""

    def __init__(self, path: Path, threads: int | None = None):
        import cv2

        self._cv2 = cv2
        self.path = path
        api = cv2.CAP_FFMPEG if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG) else cv2.CAP_ANY
        # FFmpeg explicitly: CAP_ANY may treat a name with '%' as an image-sequence pattern.
        params = [cv2.CAP_PROP_N_THREADS, threads] if threads and hasattr(cv2, "CAP_PROP_N_THREADS") else []
        self.cap = cv2.VideoCapture(str(path), api, params)
        if not self.cap.isOpened():
            self.close()
            raise _unreadable(path, "OpenCV")
        if not self.cap.grab():  # the first frame stays grabbed for frames() to hand out
            self.close()
            raise VideoReadError(f"{path}: opens, but no frame can be decoded (truncated or corrupt?)")
        fps = _positive(self.cap.get(cv2.CAP_PROP_FPS))
        count = self.cap.get(cv2.CAP_PROP_FRAME_COUNT)
        count = int(count) if math.isfinite(count) and count > 0 else None
        self.info = VideoInfo(str(path), fps, count, int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                              int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                              count / fps if count and fps else None)
        self.error: str | None = None

    def frames(self) -> Iterator[tuple[float | None, Callable]]:
        """(presentation time in s or None, fetch(area) -> RGB) per frame, in decode order."""
        cv2, cap = self._cv2, self.cap

        def fetch(area):
            ok, bgr = cap.retrieve()
            if not ok:
                raise VideoReadError(f"{self.path}: OpenCV grabbed a frame but cannot decode it")
            if area is not None:  # crop before converting: only the area is converted
                x1, y1, x2, y2 = _clip(area, bgr.shape[1], bgr.shape[0], self.path)
                bgr = bgr[y1:y2, x1:x2]
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

        more = True  # the first frame was grabbed at open
        while more:
            # POS_MSEC after grab: the grabbed frame's pts, relative to the stream's start time.
            ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            yield (ms / 1000.0 if math.isfinite(ms) and ms >= 0 else None), fetch
            more = cap.grab()

    def close(self) -> None:
        cap, self.cap = getattr(self, "cap", None), None
        if cap is not None:
            cap.release()


class _PyAVSource:
    """PyAV (FFmpeg) decoding with frame threading; rotation applied to match OpenCV's output."""

    def __init__(self, path: Path, threads: int | None = None):
        try:
            import av
        except ImportError:
            raise ImportError("reader='pyav' needs PyAV: pip install av") from None
        self._av = av
        self.path = path
        self.error: str | None = None
        self.container = None
        try:
            self.container = av.open(str(path), mode="r")
        except av.error.FFmpegError:
            raise _unreadable(path, "PyAV") from None
        if not self.container.streams.video:
            self.close()
            raise VideoReadError(f"{path}: has no video stream")
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.thread_count = threads
        self._decoded = self.container.decode(stream)
        self._count = 0
        self._first = self._next()
        if self._first is None:
            self.close()
            raise VideoReadError(f"{path}: opens, but no frame can be decoded (truncated or corrupt?)"
                                 + (f": {self.error}" if self.error else ""))
        fps = _positive(stream.average_rate) or _positive(stream.guessed_rate)
        # Count and duration as OpenCV derives them, so both readers report and judge alike:
        # nb_frames, else container duration * fps; duration = count / fps.
        container_s = _positive(self.container.duration / 1e6) if self.container.duration else None
        count = stream.frames or (int(math.floor(container_s * fps + 0.5)) if container_s and fps else 0)
        count = count if count > 0 else None
        duration = count / fps if count and fps else container_s
        w, h = self._first.width, self._first.height
        if self._turns(self._first) % 2:
            w, h = h, w
        self.info = VideoInfo(str(path), fps, count, w, h, duration)

    def _next(self):
        try:
            frame = next(self._decoded)
        except StopIteration:
            return None
        except self._av.error.FFmpegError as e:  # damaged data: end the stream, keep the message
            self.error = f"decoding stopped after {self._count} frames: {e.strerror or e}"
            return None
        self._count += 1
        return frame

    @staticmethod
    def _turns(frame) -> int:
        return round((frame.rotation or 0) / 90) % 4  # display matrix, counter-clockwise degrees

    def _rotate(self, frame, img: np.ndarray) -> np.ndarray:
        k = self._turns(frame)
        return np.rot90(img, k) if k else img

    def frames(self) -> Iterator[tuple[float | None, Callable]]:
        frame = self._first
        self._first = None
        while frame is not None:
            def fetch(area, frame=frame):
                rgb = self._rotate(frame, frame.to_ndarray(format="rgb24"))
                if area is not None:
                    x1, y1, x2, y2 = _clip(area, rgb.shape[1], rgb.shape[0], self.path)
                    rgb = rgb[y1:y2, x1:x2]
                return np.ascontiguousarray(rgb)

            t = frame.time
            yield (float(t) if t is not None and math.isfinite(t) else None), fetch
            frame = self._next()

    def close(self) -> None:
        c, self.container = self.container, None
        if c is not None:
            c.close()


class _TorchCodecSource:
    """torchcodec's VideoDecoder in exact seek mode, on the CPU or a CUDA device (NVDEC; frames
    stay there until the sampled one is copied out). Frames are fetched by index: the reader
    (VideoReader._run_indexed) asks for the frames around each target, so only those are
    converted to RGB.
    torchcodec applies rotation metadata itself, as OpenCV does."""

    def __init__(self, path: Path, threads: int | None = None, device: str = "cpu"):
        try:
            from torchcodec.decoders import VideoDecoder
        except (ImportError, OSError, RuntimeError) as e:  # RuntimeError: FFmpeg's libraries not found
            raise ImportError(f"reader='torchcodec' needs torchcodec and FFmpeg's shared libraries "
                              f"(pip install torchcodec; e.g. apt-get install libavdevice59): "
                              f"{str(e).splitlines()[0] if str(e) else e.__class__.__name__}") from None
        import torch

        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (torchcodec decodes on cpu)")
        self.path = path
        self.error: str | None = None
        self._cache: dict[int, tuple[float, object]] = {}
        try:
            self.dec = VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC",
                                    num_ffmpeg_threads=threads or 0, device=str(device))
        except (RuntimeError, ValueError):
            raise _unreadable(path, "torchcodec") from None
        self.count = len(self.dec)
        if not self.count or self._frame(0) is None:
            raise VideoReadError(f"{path}: opens, but no frame can be decoded (truncated or corrupt?)"
                                 + (f": {self.error}" if self.error else ""))
        md = self.dec.metadata
        fps = _positive(md.average_fps_from_header) or _positive(md.average_fps)
        # As OpenCV derives them: the header's count, else duration * fps; duration = count / fps.
        header_s = _positive(md.duration_seconds_from_header)
        count = md.num_frames_from_header or (int(math.floor(header_s * fps + 0.5)) if header_s and fps else 0)
        count = count if count and count > 0 else None
        h, w = self._cache[0][1].shape[:2]
        self.info = VideoInfo(str(path), fps, count, int(w), int(h),
                              count / fps if count and fps else _positive(md.duration_seconds))
        self.origin = self._cache[0][0]

    def _frame(self, i: int):
        """(pts in s, HWC uint8 tensor on the decoder's device) of frame i, or None when it is
        past the end or cannot be decoded (the error is kept: the stream ends there)."""
        if i not in self._cache:
            if i >= self.count or self.error:
                return None
            try:
                f = self.dec.get_frame_at(i)
            except (RuntimeError, IndexError) as e:  # FFmpeg's words, without torchcodec's source position
                why = re.sub(r"^.*\.cpp:\d+, ", "", str(e).splitlines()[0]) if str(e) else e.__class__.__name__
                self.error = f"decoding stopped at frame {i}: {why}"
                self.count = i
                return None
            self._cache = {k: v for k, v in self._cache.items() if k >= i - 1}  # the neighbour stays
            self._cache[i] = (float(f.pts_seconds), f.data)
        return self._cache[i]

    def _time(self, i: int) -> float:
        got = self._frame(i)
        return math.inf if got is None else got[0] - self.origin

    def first_reaching(self, t: float, lo: int) -> int:
        """The smallest index >= lo whose time (from the first frame) is >= t; self.count if none.
        It starts where the mean frame rate puts t and looks at the frame before first (frames
        are fetched forwards: a backward fetch seeks), so a constant-rate file costs two frames;
        where the rate varies it jumps by the time still missing, then bisects."""
        fps = self.info.fps or 1.0
        j = min(max(lo, math.ceil(t * fps - 1e-6)), self.count)
        if j > lo and self._time(j - 1) >= t:
            return self._bisect(t, lo, j - 1)
        below = j - 1  # the highest index known to come before t (lo - 1: none known)
        while j < self.count and self._time(j) < t:
            below, j = j, min(self.count, j + max(1, int((t - self._time(j)) * fps)))
        return self._bisect(t, below + 1, j) if j - below > 1 else j

    def _bisect(self, t: float, a: int, b: int) -> int:
        """The first index in [a, b] reaching t, given that b does (b == count: the end does)."""
        while a < b:
            m = (a + b) // 2
            a, b = (a, m) if self._time(m) >= t else (m + 1, b)
        return a

    def image(self, i: int, area) -> np.ndarray:
        data = self._cache[i][1]
        if area is not None:
            x1, y1, x2, y2 = _clip(area, data.shape[1], data.shape[0], self.path)
            data = data[y1:y2, x1:x2]
        return np.ascontiguousarray(data.cpu().numpy())

    def close(self) -> None:
        self._cache = {}
        self.dec = None


def _open(path: Path, reader: str, threads: int | None = None, device: str = "cpu"):
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    if reader != "torchcodec" and str(device) != "cpu":
        raise ValueError(f"device {device!r}: only reader='torchcodec' decodes on a GPU")
    _check_file(path)
    if reader == "torchcodec":
        return _TorchCodecSource(path, threads, device)
    return (_OpenCVSource if reader == "opencv" else _PyAVSource)(path, threads)


# ----------------------------------------------------------------------------- selection

def _clip(area, w: int, h: int, path) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = max(0, area[0]), max(0, area[1]), min(w, area[2]), min(h, area[3])
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{path}: area {tuple(area)} (x1 y1 x2 y2) is empty inside the {w}x{h} frame")
    return x1, y1, x2, y2


def _check_args(step, fragment, area):
    try:
        ok = math.isfinite(float(step)) and float(step) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"step must be a number of seconds > 0, got {step!r}")
    start_s, end_s = 0.0, math.inf
    if fragment is not None:
        if len(fragment) != 2:
            raise ValueError(f"fragment must be (start_min, end_min), got {fragment!r}")
        start, end = fragment
        start_s = 60.0 * float(start if start is not None else 0.0)
        end_s = math.inf if end is None or float(end) < 0 else 60.0 * float(end)  # -1: to the end
        if not (math.isfinite(start_s) and start_s >= 0 and end_s > start_s):
            raise ValueError(f"fragment {tuple(fragment)} must satisfy 0 <= start < end (minutes)")
    if area is not None:
        if len(area) != 4:
            raise ValueError(f"area must be (x1, y1, x2, y2) in pixels, got {area!r}")
        area = tuple(int(round(float(v))) for v in area)
        if area[2] <= area[0] or area[3] <= area[1]:
            raise ValueError(f"area {area} (x1 y1 x2 y2) is empty: needs x2 > x1 and y2 > y1")
    return float(step), start_s, end_s, area


class _Selector:
    """Decides, frame by frame, which frames to sample: the first frame at or after each target
    time start, start+step, start+2*step, ... inside [start, end). Targets a frame overshoots are
    all consumed by it, so a frame is taken at most once. Times are relative to the first frame;
    when timestamps are missing or stop increasing, times become index / fps from there on."""

    TAKE, SKIP, STOP = "take", "skip", "stop"

    def __init__(self, step: float, start_s: float, end_s: float, fps: float | None, path):
        self.step, self.start, self.end, self.fps, self.path = step, start_s, end_s, fps, path
        self.tol = TIME_TOLERANCE_S
        self.k = 0  # next target: start + k * step (integer k: no drift from repeated additions)
        self.origin: float | None = None
        self.last: float | None = None
        self.time_source = "timestamps"

    def _time(self, index: int, raw: float | None) -> float:
        if self.time_source == "timestamps":
            if index == 0 and raw is not None:
                self.origin = raw
            if raw is not None and self.origin is not None and (index == 0 or raw - self.origin > self.last):
                self.last = raw - self.origin
                return self.last
            if not self.fps:
                raise VideoReadError(f"{self.path}: frame {index} has no usable timestamp and the file "
                                     "states no frame rate, so times cannot be known")
            self.time_source = "index/fps"
            warnings.warn(f"{self.path}: timestamps missing or not increasing at frame {index}; "
                          f"using index / fps ({self.fps:.3f}) from there on", stacklevel=5)
        return index / self.fps

    def target(self) -> float:
        return self.start + self.k * self.step

    def decide(self, index: int, raw: float | None) -> tuple[str, float]:
        return self.decide_time(self._time(index, raw))

    def decide_time(self, t: float) -> tuple[str, float]:
        """decide() for a frame whose time from the first frame is known (torchcodec's index)."""
        # The end compares with the same tolerance as the targets, so fragments that meet tile
        # the stream: a frame belongs to exactly one of [a, b) and [b, c) (video2faces' chunks).
        if t >= self.end - self.tol:
            return self.STOP, t
        target = self.target()
        if t < target - self.tol:
            return self.SKIP, t
        # Skip every target this frame reaches: the next is the first one still ahead of t.
        self.k = math.floor((t + self.tol - self.start) / self.step) + 1
        return self.TAKE, t

    def done(self) -> bool:
        return self.target() >= self.end - self.tol


# ----------------------------------------------------------------------------- public reader

class VideoReader:
    """Iterator of sampled Frames, and a context manager that releases the decoder.

    step: seconds between samples (> 0); fragment: (start_min, end_min) in minutes, end None, inf
    or negative for "to the end", half-open [start, end); area: (x1, y1, x2, y2) in frame pixels,
    clipped to the frame: each Frame.image is that region only, and boxes found in it must be
    offset by Frame.offset = (x1, y1) to be in frame pixels; reader: "opencv", "pyav" or
    "torchcodec"; threads: the decoder's threads (None: FFmpeg's choice, one per core; fewer leave
    cores to models that run alongside, see video2faces); device: where torchcodec decodes ("cpu",
    "cuda", "cuda:1"; Frame.image is copied to the host either way).

    Frame i is taken when its presentation time reaches the next target (see _Selector). Reading
    stops right after the fragment's last target, without decoding the rest of the file. A
    damaged file yields what decodes and then ends; check `summary` (or `ended_early`, `error`)
    after the loop. Opening happens here, so an unreadable file raises VideoReadError at once.
    """

    def __init__(self, path: str | os.PathLike, step: float = 1.0,
                 fragment: tuple[float | None, float | None] | None = None,
                 area: tuple[int, int, int, int] | None = None, reader: str = "opencv",
                 threads: int | None = None, device: str = "cpu"):
        self.path = Path(path)
        step, start_s, end_s, self._area = _check_args(step, fragment, area)
        self._src = _open(self.path, reader, threads, device)
        self.info: VideoInfo = self._src.info
        if self._area is not None:
            # Against the stream's size now (fail before any decoding), against each frame later.
            try:
                _clip(self._area, self.info.width, self.info.height, self.path)
            except ValueError:
                self._src.close()
                raise
        self._sel = _Selector(step, start_s, end_s, self.info.fps, self.path)
        self.frames_read = 0
        self.sampled = 0
        self._reached_end = False
        self._gen = self._run()

    def _run(self) -> Iterator[Frame]:
        if isinstance(self._src, _TorchCodecSource):
            yield from self._run_indexed()
            return
        sel, area = self._sel, self._area
        offset = (0, 0)
        try:
            for index, (raw, fetch) in enumerate(self._src.frames()):
                self.frames_read = index + 1
                action, t = sel.decide(index, raw)
                if action == sel.STOP:
                    return
                if action == sel.TAKE:
                    image = fetch(area)
                    if area is not None:
                        offset = (max(0, area[0]), max(0, area[1]))
                    self.sampled += 1
                    yield Frame(index, t, image, offset)
                    if sel.done():
                        return
            self._reached_end = True
        finally:
            self._src.close()

    def _run_indexed(self) -> Iterator[Frame]:
        """_run for a decoder that fetches by index: each target's frame is looked up (the first
        frame reaching it), so the same frames are taken without decoding the ones between."""
        sel, src, area = self._sel, self._src, self._area
        offset = (0, 0) if area is None else (max(0, area[0]), max(0, area[1]))
        lo = 0
        try:
            while True:
                j = src.first_reaching(sel.target() - sel.tol, lo)
                if j >= src.count:
                    self.frames_read, self._reached_end = src.count, True
                    return
                self.frames_read = j + 1
                action, t = sel.decide_time(src._time(j))
                if action == sel.STOP:
                    return
                self.sampled += 1
                yield Frame(j, t, src.image(j, area), offset)
                if sel.done():
                    return
                lo = j + 1
        finally:
            src.close()

    def __iter__(self) -> "VideoReader":
        return self

    def __next__(self) -> Frame:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # runs _run's finally: releases the decoder
        self._src.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if hasattr(self, "_gen"):
            self.close()

    @property
    def error(self) -> str | None:
        """The decoder's error text when it stopped on damaged data (PyAV reports it; OpenCV only
        stops, which `ended_early` catches when the metadata states a frame count)."""
        return self._src.error

    @property
    def ended_early(self) -> bool:
        """The decoder ended before TRUNCATED_SHARE of the metadata frame count: truncated or corrupt."""
        n = self.info.frame_count
        return self._reached_end and n is not None and self.frames_read < TRUNCATED_SHARE * n

    @property
    def summary(self) -> ReadSummary:
        """Progress so far; final once iteration has ended."""
        return ReadSummary(self.frames_read, self.sampled, self.info.frame_count, self._reached_end,
                           self.ended_early, self.error, self._sel.time_source)


def sample_frames(path: str | os.PathLike, step: float = 1.0,
                  fragment: tuple[float | None, float | None] | None = None,
                  area: tuple[int, int, int, int] | None = None, reader: str = "opencv",
                  device: str = "cpu") -> VideoReader:
    """Frames sampled every `step` seconds (see VideoReader, which this returns: iterate it, then
    read its `summary`; use it in a `with` block to release the decoder if you stop early)."""
    return VideoReader(path, step=step, fragment=fragment, area=area, reader=reader, device=device)
