"""`tidyface video2faces`: videos in, face images grouped per person out.

Three parts, and two stages each re-runnable on its own:
- the frame source (FrameSource): decoding, sampling and area, on a reader thread that also
  prepares each frame for the detector (its resize or letterbox), so that overlaps the models;
- the steps (pipeline.py): detect -> reject by score, size and border -> align onto the
  encoder's template -> describe (hash, quality) -> embed, batch by batch (on CPU, two threads
  take the batches in turn up to describe, results in order, and a third embeds);
- the sink (FaceSink): face pictures (cut straight from the full frame, each with its 3x3 crop
  matrix) in OUT/faces/, the video's face table in OUT/.tidyface/ (written atomically when the
  video is done: what resume relies on), rejects and frames on request.
The grouping stage then dedups (hash pass, then embedding pass) and groups all faces of all
videos, and rebuilds OUT/groups/<group>/ as hard links (or copies) of OUT/faces/.
"""
from __future__ import annotations

import copy
import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..cache import ModelCache
from ..errors import InputError, OutputError, TidyfaceError
from ..models.base import PreparedImage, model_device
from ..ops import graphs
from ..ops.image import atomic_write_bytes, write_image
from ..ops.parallel import in_order, side_workers, split_cpu_threads, torch_threads
from ..options import Video2FacesOptions
from ..types import Detections, Faces, FaceTable
from . import dedup as dd
from . import pipeline as pl
from .common import load_models, warn
from .group import write_csv
from .outdir import OutputFolder
from .video_report import draw_frame, reject_row, warm_imports, write_index

STATE = ".tidyface"
MANIFEST_VERSION = 2  # the face tables' columns (types.FaceTable)


# Sampled frames (of the whole video) from which the detector and encoder run as CPU graphs
# (ops.graphs). Their builds cost a run about 1 s on 2 cores, and they save time only where the
# models, not the decoder, hold the run back: on Video_2 they made the run 0.8 s slower at
# --video-step 1 (83 frames) and 1.2 s at 0.25 (329), and 14% faster on all 1972 frames
# (benchmarks/RESULTS.md, video2faces).
GRAPH_MIN_FRAMES = 1500


class Video2FacesError(TidyfaceError):
    """A problem with the run as a whole (bad flags, output folder in use): one line, no traceback."""


def video_list(inp: Path, exts: str) -> list[Path]:
    """A video, a folder of videos (by extension, sorted), or a .txt list of paths."""
    if not inp.exists():
        raise InputError(f"{inp}: no such file or folder")
    if inp.is_dir():
        allowed = {"." + e.strip().lower().lstrip(".") for e in exts.split(";") if e.strip()}
        files = sorted(p for p in inp.iterdir() if p.is_file() and p.suffix.lower() in allowed)
        if not files:
            raise InputError(f"{inp}: no videos with extension {' or '.join(sorted(allowed))} "
                             f"(set --input-ext, e.g. 'mkv;mp4;avi')")
        return files
    if inp.suffix.lower() == ".txt":
        lines = [line.strip() for line in inp.read_text().splitlines()]
        files = [Path(x) if Path(x).is_absolute() else inp.parent / x for x in lines if x and not x.startswith("#")]
        if not files:
            raise InputError(f"{inp}: the list names no videos")
        return files
    return [inp]


def reject_reasons(boxes: torch.Tensor, scores: torch.Tensor, w: int, h: int, o) -> torch.Tensor:
    """(N,3) bool: score too low, box too small (either side), too close to a frame border."""
    low = scores < o.det_min_score
    small = ((boxes[:, 2] - boxes[:, 0]) < o.det_min_size) | ((boxes[:, 3] - boxes[:, 1]) < o.det_min_size)
    b = o.det_min_border
    near = ((boxes[:, 0] < b) | (boxes[:, 1] < b) | (boxes[:, 2] > w - b) | (boxes[:, 3] > h - b)) if b > 0 \
        else torch.zeros_like(low)
    return torch.stack([low, small, near], 1)


# ----------------------------------------------------------------------------- state on disk

class Workspace:
    """The output folder: what is where, and the manifest that makes runs resumable."""

    def __init__(self, out: Path):
        self.out = out
        self.state = out / STATE
        self.faces = out / "faces"
        self.inter = out / "intermediate"
        self.manifest_path = self.state / "manifest.json"

    def manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except ValueError:
            raise OutputError(f"{self.manifest_path}: unreadable manifest; use another --out-dir "
                              f"or --overwrite") from None

    def save_manifest(self, m: dict) -> None:
        atomic_write_bytes(self.manifest_path, json.dumps(m, indent=1).encode())

    def table_path(self, key: str) -> Path:
        return self.state / f"video_{key}.npz"

    def crops_path(self, key: str) -> Path:
        return self.state / f"video_{key}.crops"

    def done_tables(self, manifest: dict) -> tuple[FaceTable, list[str], np.ndarray]:
        """The face tables of every finished video, joined; their keys, and which of them
        each row comes from."""
        keys = [k for k, v in manifest["videos"].items()
                if v.get("status") == "done" and self.table_path(k).is_file()]
        tables = [FaceTable.load(self.table_path(k)) for k in keys]
        video_of_row = np.repeat(np.arange(len(keys)), [len(t) for t in tables]).astype(np.int64)
        return (FaceTable.cat(tables) if tables else FaceTable.empty()), keys, video_of_row


class CropStore:
    """The aligned 8-bit encoder crops of faces whose embedding is deferred (stage 1 of the hash
    pass linked them: almost always dropped duplicates), in a raw file beside the video's table:
    a later grouping with other settings can still embed them without decoding the video."""

    def __init__(self, path: Path):
        self.path, self.count, self._fh = path, 0, None

    def add(self, crops: torch.Tensor) -> np.ndarray:
        """Store (n,3,S,S) uint8 crops; -> their rows in the file."""
        if self._fh is None:
            self._fh = open(self.path.with_name(self.path.name + ".part"), "wb")
        self._fh.write(crops.cpu().contiguous().numpy().tobytes())
        self.count += len(crops)
        return np.arange(self.count - len(crops), self.count)

    def abandon(self) -> None:
        """After a failure or Ctrl-C: no half-written file is left (no-op once finished)."""
        if self._fh is not None:
            self._fh.close()
            Path(self._fh.name).unlink(missing_ok=True)
            self._fh = None

    def finish(self) -> None:
        """Close and publish the file (before the table that points into it is saved)."""
        if self._fh is not None:
            self._fh.close()
            os.replace(self._fh.name, self.path)
            self._fh = None
        elif self.path.exists():
            self.path.unlink()  # a stale file of an interrupted earlier attempt

    @staticmethod
    def read(path: Path, index: np.ndarray, size: int) -> torch.Tensor:
        crops = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, size, size)
        return torch.from_numpy(np.ascontiguousarray(crops[index]))


# ----------------------------------------------------------------------------- the frame source

@dataclass
class SourceFrame:
    """A sampled frame (ops.video.Frame: index, image, area offset), prepared for the detector."""

    frame: object
    prepared: PreparedImage
    pixels: torch.Tensor  # (3,H,W) uint8 view of frame.image, for the aligner


class FrameSource:
    """Frames of one video, decoded and prepared on a reader thread (OpenCV, PyAV and torch
    release the GIL, so decoding overlaps the models), handed over in batches."""

    def __init__(self, path: Path, o: Video2FacesOptions, detector, threads: int | None):
        from ..ops.video import VideoReader

        self.path, self.o, self.detector = path, o, detector
        self.ended_early, self.error = False, ""
        # Opened here, on the caller's thread: an unreadable file raises its one-line
        # VideoReadError before any work, and the file is opened once (read on the thread).
        self.reader = VideoReader(path, step=o.video_step, fragment=o.video_fragment, area=o.video_area,
                                  reader=o.video_reader, threads=threads, device=o.video_device)
        self.info = self.reader.info
        self._q: queue.Queue = queue.Queue(maxsize=2 * o.det_batch_size + 2)
        self._stop, self._box = threading.Event(), {}
        self._thread = threading.Thread(target=self._read, daemon=True)

    def whole_video_samples(self) -> int:
        """Frames the sampling takes from the whole video, fragment or not (0: length unknown).
        It decides CPU graphs, so a Ray chunk decides as its whole video's local run does."""
        return self._samples(self.info.duration_s) if self.info.duration_s else 0

    def expected_frames(self) -> int | None:
        if not self.info.duration_s:
            return None
        span, frag = self.info.duration_s, self.o.video_fragment
        if frag:
            end = frag[1] if frag[1] is not None and frag[1] >= 0 else float("inf")
            span = min(span, end * 60) - frag[0] * 60
        return self._samples(span)

    def _samples(self, span: float) -> int:
        return max(1, int(span / self.o.video_step) + 1)

    def _read(self) -> None:
        o = self.o
        try:
            with self.reader as r:
                for f in r:
                    item = SourceFrame(f, self.detector.prepare(f.image, o.det_size),
                                       torch.from_numpy(f.image).permute(2, 0, 1))
                    if not self._put(item):
                        return
        except Exception as e:  # reported by name by the consumer
            self._box["error"] = e
        finally:
            self._q.put(None)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def batches(self):
        """Lists of up to det_batch_size SourceFrames; raises the reader's error at the end."""
        self._thread.start()
        pending = []
        while (item := self._q.get()) is not None:
            pending.append(item)
            if len(pending) >= self.o.det_batch_size:
                yield pending
                pending = []
        if pending:
            yield pending
        if "error" in self._box:
            raise self._box["error"]
        self.ended_early, self.error = bool(self.reader.ended_early), str(self.reader.error or "")

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is None:  # never started: the reader is still ours to close
            self.reader.close()
        elif self._thread.is_alive():
            self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- the steps

@dataclass
class FrameFaces:
    """What the steps found in one batch of frames: the kept faces (aligned encoder crops,
    hashes, quality; image_index into the batch), and every detection with its reject reasons.
    enhanced: rows of faces whose pictures were enhanced (--enhance-below), with those pictures
    (N,3,P,P) uint8 and their frame -> picture matrices (in the batch's area pixels)."""

    faces: Faces
    detections: Detections
    reasons: torch.Tensor  # (N,3) bool per detection
    enhanced: torch.Tensor | None = None
    pictures: torch.Tensor | None = None
    picture_mat: torch.Tensor | None = None


def find_faces(batch: list[SourceFrame], detector, geometry, o: Video2FacesOptions, enhancer=None) -> FrameFaces:
    """detect -> reject -> align -> (enhance small faces) -> describe over one batch of
    same-size frames."""
    dev = model_device(detector)
    floor = min(o.det_min_score, 0.3)  # near misses go to the rejects and frames logs
    dets = detector.detect_prepared([f.prepared for f in batch], min_score=floor)
    h, w = batch[0].pixels.shape[1:]
    reasons = reject_reasons(dets.boxes, dets.scores, w, h, o)
    kept = dets.select(~reasons.any(1))
    frames = [f.pixels.to(dev) for f in batch]
    faces = pl.align(frames, kept, geometry)
    # every face is embedded from the 8-bit pixels that deferred faces are stored as (below)
    found = FrameFaces(faces, dets.to("cpu"), reasons.cpu())
    if enhancer is not None:
        found = enhance_small(found, frames, enhancer, geometry, o)
    found.faces = pl.describe(replace(found.faces, crops=pl.to_uint8(found.faces.crops)))
    return found


def enhance_small(found: FrameFaces, frames: list[torch.Tensor], enhancer, geometry, o) -> FrameFaces:
    """--enhance-below: the faces whose box is smaller than that get their saved picture (the
    slice that would be saved, warped to one side P for the batch) enhanced by the model in one
    batch, and their encoder crops cut again from those pictures, so what is saved is what is
    embedded. Matrices compose: frame -> P square -> enhanced picture -> encoder crop."""
    from ..ops.align import invert, scale_matrix

    faces = found.faces
    b = faces.detections.boxes
    small = torch.nonzero(torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) < o.enhance_below).flatten()
    if not len(small):
        return found
    h, w = frames[0].shape[1:]
    slices = pl.slice_boxes(b[small].cpu(), w, h, o.det_scale, o.det_square).double()
    extent = (slices[:, 2:] - slices[:, :2]).amax(1)  # pixels across each slice's longer side
    side = int(extent.max())
    # each slice's pixels onto a side x side square, centre on centre (pixel centres)
    k = side / extent
    to_square = torch.zeros(len(small), 3, 3, dtype=torch.float64)
    to_square[:, 0, 0], to_square[:, 1, 1], to_square[:, 2, 2] = k, k, 1
    to_square[:, :2, 2] = (side - 1) / 2 - k[:, None] * (slices[:, :2] + slices[:, 2:] - 1) / 2
    image_index = faces.image_index[small]
    squares = pl.cut(frames, to_square.to(frames[0].device), image_index, (side, side))
    pictures = torch.cat([enhancer.enhance(squares[i:i + 8]) for i in range(0, len(squares), 8)])
    pictures = pictures.round().clamp(0, 255).to(torch.uint8)
    to_picture = scale_matrix(pictures.shape[-1] / side).to(to_square) @ to_square
    crop_in_picture = faces.crop_mat[small].to(torch.float64) @ invert(to_picture).to(faces.crop_mat.device)
    crops = pl.cut(list(pictures), crop_in_picture.to(pictures.device), torch.arange(len(small)),
                   geometry.size)
    crops = pl.finish_crops(geometry, crops, faces.crop_mat[small], faces.detections.select(small))
    new_crops = faces.crops.clone()
    new_crops[small.to(new_crops.device)] = crops.to(new_crops)
    return replace(found, faces=replace(faces, crops=new_crops), enhanced=small.cpu(), pictures=pictures.cpu(),
                   picture_mat=to_picture.cpu())


class Embedder:
    """The embed step in full batches of enc_batch_size, and the hash window of the dedup pass:
    a face that the window links to a recent one is likely a duplicate, so its embedding waits
    (NaN) and its crop goes to the CropStore. The grouping embeds it when it keeps it or checks
    its hash link by embeddings (by default every link is checked, so this defers work rather
    than saving it: benchmarks/RESULTS.md, video2faces).

    With a worker (a thread of its own, ops.parallel.side_workers) each batch is embedded there
    while the caller detects the next frames, one batch in flight at a time: on CPU the decoder
    leaves much of its core idle once the models are the bottleneck (benchmarks/RESULTS.md)."""

    def __init__(self, encoder, o: Video2FacesOptions, store: CropStore, worker: ThreadPoolExecutor | None = None):
        self.encoder, self.batch_size, self.store, self.worker = encoder, o.enc_batch_size, store, worker
        self.window = dd.HashWindow(o.hash_thr) if o.hash_thr != -1 else None
        self.rows, self._queue, self._queue_rows = 0, [], []
        self._done: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, their embeddings)
        self._flight = None  # (rows, future of their embeddings) on the worker

    def add(self, faces: Faces) -> np.ndarray:
        """Queue the faces (rows self.rows...); -> their crop_index (-1: embedded, not deferred)."""
        n, first = len(faces), self.rows
        self.rows += n
        linked = np.array([self.window is not None and self.window.link(first + k, h) >= 0
                           for k, h in enumerate(faces.hashes.tolist())], dtype=bool)
        crop_index = np.full(n, -1, np.int64)
        if linked.any():
            crop_index[linked] = self.store.add(faces.crops[torch.from_numpy(linked).to(faces.crops.device)])
        todo = np.flatnonzero(~linked)
        if len(todo):
            self._queue.append(faces.crops[torch.from_numpy(todo).to(faces.crops.device)])
            self._queue_rows.append(first + todo)
        if sum(len(q) for q in self._queue) >= self.batch_size:
            self.flush(whole_batches=True)
        return crop_index

    def flush(self, whole_batches: bool = False) -> None:
        """Embed what is queued; whole_batches: only whole batches, the rest stays queued (every
        encoder call but a video's last then has one shape: CPU graphs, ops.graphs)."""
        if not self._queue:
            return
        crops, rows = torch.cat(self._queue), np.concatenate(self._queue_rows)
        n = len(rows) - len(rows) % self.batch_size if whole_batches else len(rows)
        self._queue, self._queue_rows = ([crops[n:]], [rows[n:]]) if n < len(rows) else ([], [])
        if n == 0:
            return
        crops, rows = crops[:n], rows[:n]
        if self.worker is None:
            self._done.append((rows, self._encode(crops)))
            return
        self.wait()  # memory stays bounded, and an encoder error surfaces a batch later
        self._flight = (rows, self.worker.submit(self._encode, crops))

    def _encode(self, crops: torch.Tensor) -> np.ndarray:
        return pl.encode(self.encoder, crops, self.batch_size).cpu().numpy()

    def wait(self) -> None:
        """Until the batch in flight (if any) is embedded."""
        if self._flight is not None:
            rows, future = self._flight
            self._flight = None
            self._done.append((rows, future.result()))

    def fill(self, table: FaceTable) -> None:
        self.flush()
        self.wait()
        for rows, embeddings in self._done:
            table.embeddings[rows] = embeddings


def embed_missing(table: FaceTable, needed: np.ndarray, video_of_row: np.ndarray, crop_files: list[Path],
                  encoder, batch_size: int) -> None:
    """Fill, in place, the embeddings of needed faces whose embedding detection deferred (NaN),
    from their stored crops."""
    missing = np.flatnonzero(needed & np.isnan(table.embeddings).any(1))
    size = encoder.spec.meta.input_size[0]
    for v in np.unique(video_of_row[missing]).tolist():
        rows = missing[video_of_row[missing] == v]
        crops = CropStore.read(crop_files[v], table.crop_index[rows], size)
        table.embeddings[rows] = pl.encode(encoder, crops, batch_size).cpu().numpy()


# ----------------------------------------------------------------------------- the sink

@dataclass
class VideoStats:
    path: str
    frames: int = 0
    faces: int = 0
    rejected: int = 0
    ended_early: bool = False
    error: str = ""
    seconds: float = 0.0
    duration_s: float | None = None  # what the container says


@dataclass
class FaceSink:
    """Where one video's results go: face pictures (slices of the full frame), the rows of its
    face table, the rejects log and, on request, reject pictures and drawn frames."""

    path: Path
    prefix: str
    ws: Workspace
    o: Video2FacesOptions
    writer: ThreadPoolExecutor
    dim: int
    stats: VideoStats = None
    parts: list = field(default_factory=list)
    rejects: list = field(default_factory=list)
    futures: list = field(default_factory=list)

    def __post_init__(self):
        self.stats = VideoStats(str(self.path))

    def _write(self, path: Path, image: np.ndarray, quality: int = 95) -> None:
        self.futures.append(self.writer.submit(write_image, path, image, quality))

    def add(self, batch: list[SourceFrame], found: FrameFaces, crop_index: np.ndarray) -> None:
        """The batch's kept faces (rows follow found.faces, grouped by frame) and its rejects."""
        faces = found.faces
        image_index = faces.image_index.cpu()
        boxes = faces.detections.boxes.cpu()
        h, w = batch[0].pixels.shape[1:]
        slices = pl.slice_boxes(boxes, w, h, self.o.det_scale, self.o.det_square)
        face_index = _rank_within(image_index)
        offsets = torch.tensor([batch[i].frame.offset for i in image_index.tolist()], dtype=torch.float64)
        names, offsets = [], offsets.reshape(-1, 2)
        crop_mat = pl.slice_matrices(slices + offsets.repeat(1, 2).long())
        enhanced = {} if found.enhanced is None else {int(r): n for n, r in enumerate(found.enhanced.tolist())}
        for k, (i, j) in enumerate(zip(image_index.tolist(), face_index.tolist())):
            f = batch[i].frame
            names.append(f"{self.prefix}{f.index:06d}_{j}.jpg")
            if k in enhanced:  # the enhanced picture, and its matrix from the full frame
                n = enhanced[k]
                self._write(self.ws.faces / names[-1], found.pictures[n].permute(1, 2, 0).numpy())
                crop_mat[k] = found.picture_mat[n] @ pl.slice_matrices(-offsets[k:k + 1].long())[0]
                continue
            x1, y1, x2, y2 = slices[k].tolist()
            self._write(self.ws.faces / names[-1], f.image[y1:y2, x1:x2])
        moved = faces.detections.to("cpu").moved(offsets)
        table = FaceTable.from_faces(replace(faces, crop_mat=crop_mat, detections=moved).to("cpu"), name=names,
                                     source=[str(self.path)] * len(names), face_index=face_index.numpy(),
                                     frame=[batch[i].frame.index for i in image_index.tolist()],
                                     crop_index=crop_index,
                                     embeddings=np.full((len(names), self.dim), np.nan, np.float32))
        self.parts.append(table)
        self.stats.frames += len(batch)
        self.stats.faces += len(table)
        self._rejects(batch, found)

    def _rejects(self, batch: list[SourceFrame], found: FrameFaces) -> None:
        dets, reasons = found.detections, found.reasons
        bad = reasons.any(1)
        for i, sf in enumerate(batch):
            f, sel = sf.frame, torch.nonzero(dets.image_index == i).flatten()
            for r_j, n in enumerate(sel[bad[sel]].tolist()):
                name = f"{self.prefix}{f.index:06d}_r{r_j}.jpg"
                self.rejects.append(reject_row(name, self.path, f, dets.boxes[n], float(dets.scores[n]),
                                               reasons[n].tolist(), self.o))
                x1, y1, x2, y2 = (int(v) for v in dets.boxes[n].round().clamp(min=0).tolist())
                if self.o.save_rejects and x2 > x1 and y2 > y1:
                    self._write(self.ws.inter / "rejects" / name, f.image[y1:y2, x1:x2])
            self.stats.rejected += int(bad[sel].sum())
            if self.o.save_frames:
                drawn = draw_frame(f.image, dets.boxes[sel], dets.scores[sel], bad[sel])
                self._write(self.ws.inter / "frames" / f"{self.prefix}{f.index:06d}.jpg", drawn, 50)

    def table(self) -> FaceTable:
        for fu in self.futures:
            fu.result()
        return FaceTable.cat(self.parts) if self.parts else FaceTable.empty(self.dim)


def _rank_within(image_index: torch.Tensor) -> torch.Tensor:
    """Each face's position among the faces of its frame (rows grouped by frame)."""
    if len(image_index) == 0:
        return image_index
    starts = torch.searchsorted(image_index, image_index)
    return torch.arange(len(image_index)) - starts


# ----------------------------------------------------------------------------- detection stage

def detect_video(path: Path, key: str, prefix: str, o: Video2FacesOptions, ws: Workspace, detector, encoder,
                 writer: ThreadPoolExecutor, enhancer=None) -> tuple[FaceTable, list[dict], VideoStats]:
    """source -> steps -> sink over one video -> (face table, reject log rows, stats)."""
    from tqdm import tqdm

    t0 = time.time()
    decode_threads, model_threads = split_cpu_threads(model_device(detector))
    source = FrameSource(path, o, detector, decode_threads)  # opens it: unreadable files fail here
    sink = FaceSink(path, prefix, ws, o, writer, encoder.spec.meta.embedding_dim)
    store = CropStore(ws.crops_path(key))
    # On CPU two threads detect (batches in turn) and a third embeds, beside the decoder.
    side = side_workers(model_threads) if model_threads else None
    finders = side_workers(model_threads, 2) if model_threads else None
    embedder = Embedder(encoder, o, store, side)
    geometry = pl.encoder_geometry(encoder, o.enc_area, o.enc_region)
    bar = tqdm(total=source.expected_frames(), unit="frame", desc=path.name[:30], file=sys.stderr,
               disable=None, leave=False)
    try:
        long_video = source.whole_video_samples() >= GRAPH_MIN_FRAMES
        # the models' threads beside the decoder's; CPU graphs over a long video
        with torch_threads(model_threads), graphs.stream(detector, encoder, enabled=long_video):
            def steps(batch):
                return batch, find_faces(batch, detector, geometry, o, enhancer)

            for n, (batch, found) in enumerate(in_order(steps, source.batches(), finders)):
                sink.add(batch, found, embedder.add(found.faces))
                if n == 0 and o.mode == "full" and o.engine != "ray":
                    # Only now: importing them holds the GIL, which before the first frame
                    # would delay it (start-up, benchmarks/bench_video2faces.py --startup).
                    warm_imports(o.group_mode)
                bar.update(len(batch))
                bar.set_postfix(faces=sink.stats.faces)
            embedder.wait()  # its last whole batch still in the stream, whatever the timing
        table = sink.table()
        embedder.fill(table)  # the remainder (one call: not worth a graph)
        store.finish()
    finally:
        for pool in (side, finders):
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        store.abandon()
        source.close()
        bar.close()
    sink.stats.ended_early, sink.stats.error = source.ended_early, source.error
    sink.stats.duration_s = source.info.duration_s
    if (table.crop_index >= 0).any():
        # The video's hash pass, as grouping will run it: the deferred faces it keeps are
        # embedded now; the dropped ones stay NaN (grouping embeds any it keeps otherwise).
        kept = dd.hash_duplicates(torch.from_numpy(table.hash), table.quality, o.hash_thr).keep
        embed_missing(table, kept, np.zeros(len(kept), np.int64), [store.path], encoder, o.enc_batch_size)
    sink.stats.seconds = time.time() - t0
    return table, sink.rejects, sink.stats


# ----------------------------------------------------------------------------- grouping stage

def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _face_row(file: str, table: FaceTable, i: int, group: str, distance: str) -> dict:
    return {"file": file, "frame": int(table.frame[i]), "face_index": int(table.face_index[i]),
            "group": group, "distance": distance, "score": f"{table.scores[i]:.4f}"}


def _place_parts(tmp: Path, ws: Workspace, table: FaceTable, kept: np.ndarray, grouping, sorter) -> list[dict]:
    """Each kept face into its person's attribute / mask folders (groups/<person>/<attr>/<mask>/,
    masks in <mask>_mask/ as PNG); a face in no group stays in faces/ only, its row says so."""
    import cv2

    rows = []
    for part, routes in sorter.chunks(table, kept):
        for i, face_routes in zip(part.tolist(), routes):
            j = int(np.searchsorted(kept, i))
            name, group, dist = str(table.name[i]), grouping.labels[j], f"{grouping.distance[j]:.4f}"
            if not face_routes:
                rows.append({**_face_row(f"faces/{name}", table, i, group, dist), "parts": ""})
            for folder, mask in face_routes:
                link(ws.faces / name, tmp / group / folder / name)
                rows.append({**_face_row(f"groups/{group}/{folder}/{name}", table, i, group, dist), "parts": folder})
                if mask is not None:
                    ok, png = cv2.imencode(".png", mask)
                    atomic_write_bytes(tmp / group / f"{folder}_mask" / Path(name).with_suffix(".png"), png.tobytes())
    return rows


def _group_rows(ws: Workspace, table: FaceTable, kept: np.ndarray, grouping, o, sorter=None) -> list[dict]:
    """OUT/groups/ rebuilt in a fresh folder then swapped in (an interrupted regrouping leaves
    the old one whole); -> the groups.csv rows of the kept faces. With a sorter (attribute or
    mask groups, face_parts.PartSorter), faces go into sub-folders of their person's folder."""
    for stale in ws.out.glob(".groups.*"):  # left by an interrupted grouping
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ws.out / f".groups.part-{os.getpid()}"
    tmp.mkdir()
    rows = []
    if sorter is not None and grouping is not None:
        rows = _place_parts(tmp, ws, table, kept, grouping, sorter)
    for j, i in enumerate(kept.tolist() if grouping is not None and sorter is None else []):
        name, group = str(table.name[i]), grouping.labels[j]
        link(ws.faces / name, tmp / group / name)
        rows.append(_face_row(f"groups/{group}/{name}", table, i, group, f"{grouping.distance[j]:.4f}"))
    if grouping is not None and o.group_mode == "cluster" and o.clusters_save_all:
        for k, labels in grouping.details.get("labels_per_k", {}).items():
            for j, i in enumerate(kept.tolist()):
                link(ws.faces / table.name[i], tmp / f"G{k}" / labels[j] / table.name[i])
    old = ws.out / "groups"
    if old.exists():
        trash = ws.out / f".groups.old-{os.getpid()}"
        os.replace(old, trash)
        os.replace(tmp, old)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, old)
    return rows


def _write_group_records(ws: Workspace, table: FaceTable, outcome: pl.DedupOutcome, rows: list[dict],
                         grouping, o) -> dict[str, list[str]]:
    """groups.csv (duplicates too), the dedup and grouping logs, index.html; -> the groups."""
    kept = np.flatnonzero(outcome.keep)
    _remove_stale_logs(ws, o)
    parts = ["parts"] if rows and "parts" in rows[0] else []
    for i in np.flatnonzero(~outcome.keep):
        rows.append({**_face_row(f"faces/{table.name[i]}", table, i, "duplicate", ""), **dict.fromkeys(parts, "")})
    write_csv(ws.out / "groups.csv", rows, ["file", "frame", "face_index", "group", "distance", "score"] + parts)
    for p, rows_p in outcome.logs.items():
        if o.save_dupes:
            shutil.rmtree(ws.inter / f"dupes{p}", ignore_errors=True)
            for row in rows_p:
                link(ws.faces / row["name"], ws.inter / f"dupes{p}" / row["name"])
            write_csv(ws.inter / f"log_dupes{p}.csv", rows_p, ["name", "kept", "set", "distance"])
    names = [str(table.name[i]) for i in kept]
    if o.group_log and grouping is not None:
        from . import grouping as gp

        write_csv(ws.out / "log_grouping.csv", gp.grouping_log_rows(grouping, names))
    groups = {} if grouping is None else {g: [names[i] for i in idx] for g, idx in grouping.groups().items()}
    write_index(ws.out, groups, f"tidyface video2faces: {len(kept)} faces in {len(groups)} groups")
    return groups


def _remove_stale_logs(ws: Workspace, o) -> None:
    """Logs of an earlier grouping that this one does not write again would describe other
    settings: they go."""
    if not o.group_log:
        (ws.out / "log_grouping.csv").unlink(missing_ok=True)
    if not o.save_dupes:
        for p in (1, 2):
            shutil.rmtree(ws.inter / f"dupes{p}", ignore_errors=True)
            (ws.inter / f"log_dupes{p}.csv").unlink(missing_ok=True)


def _part_sorter(o: Video2FacesOptions, ws: Workspace, models):
    """The attribute / mask sorter of --attr-groups / --mask-groups, or None without them."""
    routing = o.routing()
    if not routing.active:
        return None
    from .face_parts import PartSorter

    (parser,) = load_models(models, o.driver_device(), o.weights_dir, o.parse_model, precision=o.precision)
    return PartSorter(parser, routing, ws.faces, ws.state / "classes" / o.parse_model)


def group_stage(o: Video2FacesOptions, ws: Workspace, manifest: dict, models: ModelCache | None) -> dict:
    """dedup -> group over every face recorded in the manifest; rebuild OUT/groups/."""
    table, keys, video_of_row = ws.done_tables(manifest)
    if not len(table):
        return {"faces": 0, "duplicates": 0, "groups": {}}
    det = manifest["detection"]
    (encoder,) = load_models(models, o.driver_device(), o.weights_dir, det["enc_model"], precision=o.precision)
    crop_files = [ws.crops_path(k) for k in keys]

    def fill(t, needed):
        embed_missing(t, needed, video_of_row, crop_files, encoder, o.enc_batch_size)

    def references():
        (detector,) = load_models(models, o.driver_device(), o.weights_dir, det["det_model"], precision=o.precision)
        return pl.reference_embeddings(Path(o.ref_dir), encoder, detector, area=o.enc_area,
                                       region=det.get("enc_region", "full"), masked=o.masked)

    outcome = pl.dedup(table, o.hash_thr, o.enc_dup_thr, fill, dd.hash_confirm_threshold(encoder.spec))
    kept = np.flatnonzero(outcome.keep)
    grouping = None
    if len(kept):
        grouping = pl.group(torch.from_numpy(table.embeddings[kept]), o.grouping(o.group_mode), encoder.spec,
                            references)
        if grouping.note:
            print(f"tidyface: {grouping.note}", file=sys.stderr)
    rows = _group_rows(ws, table, kept, grouping, o, _part_sorter(o, ws, models))
    groups = _write_group_records(ws, table, outcome, rows, grouping, o)
    return {"faces": len(table), "duplicates": int((~outcome.keep).sum()),
            "groups": {g: len(v) for g, v in groups.items()}}


# ----------------------------------------------------------------------------- the run

def default_out_dir(inp: Path) -> Path:
    """INPUT_faces beside the input (a video's folder, or a folder's parent): never inside it."""
    inp = inp.resolve()
    return inp.parent / f"{inp.stem if inp.is_file() else inp.name}_faces"


RESULT_ENTRIES = ("faces", "groups", "intermediate", "groups.csv", "index.html", "log_grouping.csv",
                  f"{STATE}/manifest.json")


def _open_workspace(o: Video2FacesOptions, ws: Workspace, videos: list[Path], folder: OutputFolder) -> dict:
    """The manifest to continue: this run's own (resume), or a new one; a folder holding other
    results is refused before anything is written; --overwrite removes exactly the earlier
    run's files."""
    if folder.owner() is None and ws.faces.is_dir() and any(ws.faces.iterdir()):
        raise Video2FacesError(f"{ws.faces} already holds files that are not from a tidyface run; "
                               f"choose another --out-dir")
    folder.claim(o.overwrite, resume=True)
    man = ws.manifest()
    # resolved: the same videos named from another folder, or relatively, are the same inputs
    sig, listing = o.detection_signature(), [str(p.resolve()) for p in videos]
    if man is not None and man.get("version") != MANIFEST_VERSION:
        raise Video2FacesError(f"{ws.out} holds results of an older tidyface (manifest version "
                               f"{man.get('version')}); pass --overwrite to redo them, or use another --out-dir")
    if man is not None and (man["detection"] != sig or man["inputs"] != listing):
        raise Video2FacesError(f"{ws.out} holds results of a run with other inputs or detection settings; "
                               f"re-run with the same ones to resume, use another --out-dir, or pass "
                               f"--overwrite to replace them")
    folder.record(RESULT_ENTRIES)
    return man or {"version": MANIFEST_VERSION, "detection": sig, "inputs": listing, "videos": {}}


@dataclass(frozen=True)
class Unit:
    """One detection task: a whole video, or a chunk of one (--chunk-minutes). key names its
    manifest entry and its table and crops files; prefix and the frame indices (counted from the
    video's start whatever the fragment) name its faces, so a chunked video's faces have the
    names, and its tables the rows, of the whole video's run."""

    key: str
    path: Path
    prefix: str
    fragment: tuple | None  # minutes, as --video-fragment
    chunk: int | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.chunk is None else chunk_label(str(self.path), self.chunk, self.fragment)

    def record(self) -> dict:
        """What a chunk's manifest entry says about it (nothing for a whole video)."""
        if self.chunk is None:
            return {}
        return {"video": self.key.split("_c")[0], "chunk": self.chunk, "fragment": list(self.fragment)}


def chunk_label(path: str, chunk: int, fragment) -> str:
    end = "end" if fragment[1] is None else f"{fragment[1]:g}"
    return f"{path} (chunk {chunk}: minutes {fragment[0]:g}-{end})"


def chunk_spans(path: Path, o: Video2FacesOptions) -> list[tuple]:
    """--chunk-minutes: fragments (minutes) tiling the part of the video to read, each a whole
    number of --video-step long, so each chunk samples the frames that the whole video's run
    samples there (ops.video counts frames from the start and tiles fragments that meet). The
    last runs to the end, wherever the metadata put it. [] when one chunk holds it all, or the
    length is unknown (the detection reports an unreadable file)."""
    from ..ops.video import probe

    try:
        duration = probe(path).duration_s
    except (TidyfaceError, OSError):
        return []
    frag = o.video_fragment
    start = frag[0] if frag else 0.0
    end = frag[1] if frag and frag[1] >= 0 else None
    if not duration:
        return []
    stop_s = duration if end is None else min(60 * end, duration)
    length = max(1, round(o.chunk_minutes * 60 / o.video_step)) * o.video_step
    n = math.ceil((stop_s - 60 * start) / length - 1e-9)
    if n <= 1:
        return []
    bounds = [start] + [(60 * start + i * length) / 60 for i in range(1, n)] + [end]
    return list(zip(bounds[:-1], bounds[1:]))


def plan_units(videos: list[Path], o: Video2FacesOptions, multi: bool) -> list[Unit]:
    units = []
    for k, path in enumerate(videos, 1):
        key, prefix = f"{k:02d}", o.out_prefix + (f"{k:02d}_" if multi else "")
        spans = chunk_spans(path, o) if o.chunk_minutes else []
        units += [Unit(f"{key}_c{i:04d}", path, prefix, span, i) for i, span in enumerate(spans)] \
            or [Unit(key, path, prefix, o.video_fragment)]
    return units


def finished(unit: Unit, o, ws: Workspace, man: dict) -> list[dict] | None:
    """The reject rows of a unit that an earlier run finished (it is skipped), else None."""
    rec = man["videos"].get(unit.key)
    if not (rec and rec.get("status") == "done" and ws.table_path(unit.key).is_file()):
        return None
    name = unit.path.name if unit.chunk is None else f"{unit.path.name} chunk {unit.chunk}"
    print(f"tidyface: {name}: done in an earlier run, skipped", file=sys.stderr)
    saved = rec.get("saved", {})
    missing = [f"--save-{k}" for k in ("rejects", "frames") if getattr(o, f"save_{k}") and not saved.get(k)]
    if missing:
        warn(f"{name} was processed without {' and '.join(missing)}: nothing of it is saved now "
             f"(--overwrite redoes the run with them)")
    return [{**r, "file_name": r["file_name"] if saved.get("rejects") else ""} for r in rec.get("rejects", [])]


def detect_unit(unit: Unit, o, ws: Workspace, models, writer) -> dict:
    """The detection stage of one video or chunk: faces and table written (each atomically),
    warnings printed; -> its manifest record. It reads no manifest, so the Ray engine's workers
    run it as the local loop does."""
    path, key, label = unit.path, unit.key, unit.label
    if unit.fragment != o.video_fragment:
        o = copy.copy(o)  # not replace(): the options are checked already
        o.video_fragment = unit.fragment
    detector, encoder = load_models(models, o.device, o.weights_dir, o.det_model, o.enc_model,
                                    precision=o.precision)
    enhancer = (load_models(models, o.device, o.weights_dir, o.enh_model, precision=o.precision)[0]
                if o.enhance_below else None)
    try:
        table, rejects, st = detect_video(path, key, unit.prefix, o, ws, detector, encoder, writer, enhancer)
    except (TidyfaceError, OSError) as e:  # this video fails, the others go on; a bug stops the run
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        warn(f"{label}: {msg}" if str(path) not in msg else msg)
        return {"path": str(path), "status": "failed", "error": msg, **unit.record()}
    table.save(ws.table_path(key))
    if st.ended_early:
        warn(f"{label}: the video ended after {st.frames} sampled frames, earlier than its metadata "
             f"promised (truncated or corrupt?); faces found up to there are kept")
    start = o.video_fragment[0] * 60 if o.video_fragment else 0
    if st.frames == 0 and st.duration_s is not None and start >= st.duration_s:
        warn(f"{label}: --video-fragment starts at {start:g} s, after the video's end ({st.duration_s:.1f} s): "
             f"no frames sampled")
    elif st.faces == 0:
        warn(f"{label}: no faces found in {st.frames} sampled frames")
    return {"path": str(path), "status": "done", "frames": st.frames, "faces": st.faces,
            "rejected": st.rejected, "ended_early": st.ended_early, "rejects": rejects,
            "saved": {"rejects": o.save_rejects, "frames": o.save_frames},
            "seconds": round(st.seconds, 2), **unit.record()}


def _detect_one(unit: Unit, o, ws: Workspace, man: dict, models, writer) -> list[dict]:
    """The detection stage of one video or chunk, recorded in the manifest; -> its reject rows."""
    earlier = finished(unit, o, ws, man)
    if earlier is not None:
        return earlier
    man["videos"][unit.key] = rec = detect_unit(unit, o, ws, models, writer)
    ws.save_manifest(man)
    return rec.get("rejects", [])


def unit_files(ws: Workspace, unit: Unit) -> list[str]:
    """The unit's files, for the folder's record of what this command wrote."""
    return [ws.table_path(unit.key).relative_to(ws.out).as_posix(),
            ws.crops_path(unit.key).relative_to(ws.out).as_posix()]


def detection_stage(o: Video2FacesOptions, ws: Workspace, inp: Path, models, folder: OutputFolder) -> dict:
    videos = video_list(inp, o.input_ext)
    # weights before the first write: a run that cannot get them leaves no folder behind
    needed = (o.det_model, o.enc_model) + ((o.enh_model,) if o.enhance_below else ()) \
        + ((o.parse_model,) if o.mode == "full" and o.routing().active else ())
    load_models(models, o.driver_device(), o.weights_dir, *needed, precision=o.precision)
    man = _open_workspace(o, ws, videos, folder)
    for d in (ws.faces, ws.state):  # intermediate/ folders appear with their first file
        d.mkdir(parents=True, exist_ok=True)
    ws.save_manifest(man)
    if o.mode == "full" and o.engine == "ray":  # the local loop starts them after its first frame
        warm_imports(o.group_mode)
    multi = len(videos) > 1 or inp.is_dir() or inp.suffix.lower() == ".txt"
    units = plan_units(videos, o, multi)
    rejects = []
    if o.engine == "ray":
        from .ray_engine import detect_on_ray  # Ray is imported on this path only

        rejects = detect_on_ray(units, o, ws, man, folder)
    else:
        with ThreadPoolExecutor(2) as writer:
            for unit in units:
                rejects += _detect_one(unit, o, ws, man, models, writer)
                folder.record(unit_files(ws, unit))
    if o.save_rejects:
        write_csv(ws.inter / "log_rejects.csv", rejects)
    return man


def run_video2faces(o: Video2FacesOptions, models: ModelCache | None = None) -> dict:
    """Videos in, faces grouped per person out. Returns the run's summary (also printed):
    videos, failed, frames, faces, rejected, duplicates, groups, seconds, out."""
    t0 = time.time()
    inp = Path(o.input) if o.input else None
    out = Path(o.out_dir) if o.out_dir else default_out_dir(inp)
    ws = Workspace(out)
    with OutputFolder(out, "video2faces", [inp] if inp else [], "--out-dir") as folder:
        if o.mode == "grouping":
            man = ws.manifest()
            if man is None:
                raise Video2FacesError(f"{out}: no detection results here (no {STATE}/manifest.json); run "
                                       f"--mode detection or full first, with the same --out-dir")
            folder.claim(False, resume=True)
        else:
            man = detection_stage(o, ws, inp, models, folder)
        summary = _summary(man, out)
        if o.mode != "detection":
            g = group_stage(o, ws, man, models)
            summary["duplicates"], summary["groups"] = g["duplicates"], g["groups"]
    summary["seconds"] = round(time.time() - t0, 1)
    groups = ", ".join(f"{k}={v}" for k, v in sorted(summary["groups"].items(), key=lambda kv: (-kv[1], kv[0])))
    print(f"tidyface: {summary['videos']} videos ({len(summary['failed'])} failed), {summary['frames']} frames, "
          f"{summary['faces']} faces kept, {summary['rejected']} rejected, {summary['duplicates']} duplicates; "
          f"groups: {groups or 'none'}; {summary['seconds']} s -> {out}", file=sys.stderr)
    return summary


def _summary(man: dict, out: Path) -> dict:
    """videos: those finished whole (every chunk done); failed: each failed video's path, or
    the path and minutes of each failed chunk."""
    recs = man["videos"].items()
    done = [v for v in man["videos"].values() if v.get("status") == "done"]
    bad = {v.get("video", k) for k, v in recs if v.get("status") == "failed"}
    videos = {v.get("video", k) for k, v in recs if v.get("status") == "done"} - bad
    failed = [v["path"] if "chunk" not in v else chunk_label(v["path"], v["chunk"], v["fragment"])
              for v in man["videos"].values() if v.get("status") == "failed"]
    return {"videos": len(videos), "failed": failed,
            "frames": sum(v["frames"] for v in done), "faces": sum(v["faces"] for v in done),
            "rejected": sum(v["rejected"] for v in done), "duplicates": 0, "groups": {}, "out": str(out)}


def video_to_faces(input: str, models: ModelCache | None = None, **flags) -> dict:
    """Videos in, faces grouped per person out; the flags of `tidyface video2faces`
    (Video2FacesOptions) as keywords. Returns the run's summary."""
    return run_video2faces(Video2FacesOptions(input=input, **flags), models)
