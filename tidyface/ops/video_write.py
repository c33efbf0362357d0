"""Writing a video frame by frame, next to a source video whose rate, time stamps and audio it keeps.

With PyAV (the `video` extra): H.264 (libx264, yuv420p; VP9 for .webm), each frame stamped with
its source time, and the source's audio streams copied packet by packet, interleaved with the
video as it is written (nothing re-encoded, nothing buffered beyond the current frame). Without
PyAV: OpenCV's mp4v at the source's frame rate, without audio (a warning says so). The file is
written under a temporary name beside the target and renamed in only when complete.
"""
from __future__ import annotations

import os
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import OutputError

# Constant quality close to visually lossless, at a preset fast enough to stay below the models.
X264_OPTIONS = {"crf": "18", "preset": "veryfast"}


def _have_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


class VideoWriter:
    """Frames (RGB uint8, one size) into `path`, shaped after the video `source`.

    write(image, time_s): time_s is the frame's presentation time from the source's first frame
    (ops.video.Frame.time_s). close() finishes and renames the file in; leaving a `with` block
    by an exception removes the partial file instead. `audio` is False when the source's audio
    could not be kept (then `warning` says why)."""

    def __init__(self, path: str | os.PathLike, source: str | os.PathLike, fps: float | None = None):
        self.path, self.source = Path(path), Path(source)
        self.tmp = self.path.with_name(f".{self.path.stem}.part-{os.getpid()}{self.path.suffix}")
        self.fps, self.frames, self.audio, self.warning = fps, 0, False, ""
        self._pyav = _have_pyav()
        self._out = self._cv = self._stream = None

    # -- PyAV
    def _open_pyav(self, width: int, height: int) -> None:
        import av

        src = av.open(str(self.source))
        vin = src.streams.video[0]
        self._rate = vin.average_rate or Fraction(self.fps or 25).limit_denominator(1001)
        self._out = av.open(str(self.tmp), "w")
        codec = "libvpx-vp9" if self.path.suffix.lower() == ".webm" else "libx264"
        self._stream = self._out.add_stream(codec, rate=self._rate,
                                            options=X264_OPTIONS if codec == "libx264" else {})
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.time_base = Fraction(1, 90000)
        self._audio_in, self._audio_map, self._pending = src, {}, None
        for a in src.streams.audio:
            try:
                self._audio_map[a.index] = self._out.add_stream_from_template(a)
            except Exception as e:  # a codec this container cannot hold
                self.warning = f"audio stream {a.index} ({a.codec_context.name}) not kept: {e}"
        self.audio = bool(self._audio_map)
        self._packets = src.demux([src.streams[i] for i in self._audio_map]) if self.audio else iter(())
        if not self.audio:
            src.close()

    def _mux_audio_until(self, t: float | None) -> None:
        """Copy source audio packets stamped up to t (None: all that are left). The packet that
        passes t waits in _pending for the next frame."""
        while True:
            packet, self._pending = self._pending, None
            if packet is None:
                try:
                    packet = next(self._packets)
                except (StopIteration, RuntimeError):  # the demuxer's end (or av's StopIteration)
                    self._packets = iter(())
                    return
            if t is not None and packet.pts is not None and float(packet.pts * packet.time_base) > t:
                self._pending = packet
                return
            self._mux_audio(packet)

    def _mux_audio(self, packet) -> None:
        if packet.dts is None:  # the demuxer's flush packet
            return
        packet.stream = self._audio_map[packet.stream.index]
        self._out.mux(packet)

    # -- OpenCV
    def _open_cv(self, width: int, height: int) -> None:
        import cv2

        if not self.fps:
            raise OutputError(f"{self.source}: the frame rate is not known; install PyAV "
                              "(pip install av) to copy the source's time stamps")
        self._cv = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(self.fps), (width, height))
        if not self._cv.isOpened():
            raise OutputError(f"{self.path}: OpenCV cannot write this video format; install PyAV (pip install av)")
        self.warning = "PyAV is not installed, so the audio is not kept (pip install av)"

    def write(self, image: np.ndarray, time_s: float) -> None:
        h, w = image.shape[:2]
        if self.frames == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open_pyav(w, h) if self._pyav else self._open_cv(w, h)
        if self._cv is not None:
            import cv2

            self._cv.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        else:
            import av

            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = int(round(time_s * 90000))
            frame.time_base = self._stream.time_base
            if self.audio:
                self._mux_audio_until(time_s)
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Finish the file and rename it into place (a run with no frames leaves nothing)."""
        if self._cv is not None:
            self._cv.release()
        elif self._out is not None:
            for packet in self._stream.encode():
                self._out.mux(packet)
            if self.audio:
                self._mux_audio_until(None)
                self._audio_in.close()
            self._out.close()
        if self.frames:
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        try:
            if self._cv is not None:
                self._cv.release()
            elif self._out is not None:
                self._out.close()
                if self.audio:
                    self._audio_in.close()
        except Exception as e:  # the partial file goes regardless
            warnings.warn(f"{self.tmp}: {e}")
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()
