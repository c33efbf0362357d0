"""`tidyface video2faces`: videos in, face images grouped per person out.

Two stages, each re-runnable on its own:
- detection: frames are decoded once (sequentially, on a reader thread), detected in batches,
  filtered, cropped from the full frame and written to OUT/faces/; every face's embedding,
  hash, box, score, landmarks and frame index go to a per-video table in OUT/.tidyface/, written
  atomically when the video is done (this is what resume relies on);
- grouping: dedup (hash pass, then embedding pass) and grouping over all faces of all videos;
  OUT/groups/<group>/ is rebuilt from scratch as hard links (or copies) of OUT/faces/, so
  grouping can be run again with other settings without decoding anything.
"""
from __future__ import annotations

import html
import json
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..ops.image import atomic_path, atomic_write_bytes, write_image
from ..ops.parallel import split_cpu_threads, torch_threads
from . import dedup as dd
from . import grouping as gp
from .common import cached_model, model_device, resolve_device, warn
from .embed import embedding_dim, encode, encoder_faces, encoder_geometry, parse_area
from .group import reference_embeddings, write_csv

STATE = ".tidyface"
LIVE_DEFAULTS = {"det_model": "retinaface_mnet025", "enc_model": "mobilefacenet"}
# The anime models of a later issue: named here so the refusal says exactly what is missing.
ANIME_MODELS = {"det_model": "faster_rcnn_anime (hysts/anime-face-detector, mmdet checkpoint)",
                "enc_model": "vit_anime (animesion ViT-B/16 or L/16)"}
DETECTION_KEYS = ("style", "video_step", "video_fragment", "video_area", "det_model", "det_min_score",
                  "det_min_size", "det_min_border", "det_scale", "det_square", "det_size", "enc_model",
                  "enc_area", "out_prefix")


class Video2FacesError(RuntimeError):
    """A problem with the run as a whole (bad flags, output folder in use): one line, no traceback."""


@dataclass
class Settings:
    input: str
    out_dir: str | None = None
    out_prefix: str = ""
    input_ext: str = "mkv;mp4"
    mode: str = "full"
    style: str = "live"
    device: str | None = None
    video_step: float = 1.0
    video_fragment: tuple | None = None
    video_area: tuple | None = None
    video_reader: str = "opencv"
    det_model: str | None = None
    det_batch_size: int = 4
    det_min_score: float = 0.4
    det_min_size: int = 50
    det_min_border: int = 5
    det_scale: tuple = (1.5, 1.5, 2.2, 1.2)
    det_square: bool = True
    det_size: int | None = 640
    hash_thr: int = 8
    enc_model: str | None = None
    enc_batch_size: int = 16
    enc_area: tuple | None = None
    enc_dup_thr: float = 0.25
    group_mode: str = "auto"
    clusters: str = "2-9"
    clusters_save_all: bool = False
    random_state: int = 0
    ref_dir: str | None = None
    enc_oth_thr: float = -1
    auto_thr: float | None = None
    group_log: bool = False
    save_frames: bool = False
    save_rejects: bool = False
    save_dupes: bool = False
    overwrite: bool = False
    weights_dir: str | None = None

    def detection_signature(self) -> dict:
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in DETECTION_KEYS}


def _floats(v, n: int, name: str) -> tuple | None:
    if v is None or v == "":
        return None
    vals = v.replace(",", " ").split() if isinstance(v, str) else list(v)
    try:
        vals = tuple(float(x) for x in vals)
    except (TypeError, ValueError):
        raise Video2FacesError(f"--{name} needs {n} numbers, got {v!r}") from None
    if len(vals) != n:
        raise Video2FacesError(f"--{name} needs {n} numbers, got {v!r}")
    return vals


def validate(s: Settings) -> Settings:
    if s.mode not in ("full", "detection", "grouping"):
        raise Video2FacesError(f"--mode must be full, detection or grouping, got {s.mode!r}")
    if s.style not in ("live", "anime"):
        raise Video2FacesError(f"--style must be live or anime, got {s.style!r}")
    if s.style == "anime" and s.mode != "grouping":
        missing = [ANIME_MODELS[k] for k in ("det_model", "enc_model") if getattr(s, k) is None]
        if missing:
            raise Video2FacesError("--style anime needs the anime face detector and encoder, whose weights "
                                   "are not in tidyface yet: " + "; ".join(missing)
                                   + " (pass --det-model/--enc-model to use other registered models)")
    for k, v in LIVE_DEFAULTS.items():
        if getattr(s, k) is None:
            setattr(s, k, v)
    if not s.video_step > 0:
        raise Video2FacesError(f"--video-step must be > 0 seconds, got {s.video_step}")
    s.video_fragment = _floats(s.video_fragment, 2, "video-fragment")
    area = _floats(s.video_area, 4, "video-area")
    s.video_area = None if area is None else tuple(int(round(a)) for a in area)
    s.det_scale = _floats(s.det_scale, 4, "det-scale")
    s.enc_area = parse_area(s.enc_area)
    if s.group_mode not in ("cluster", "auto", "classify"):
        raise Video2FacesError(f"--group-mode must be cluster, auto or classify, got {s.group_mode!r}")
    if s.group_mode == "classify" and s.mode != "detection" and not s.ref_dir:
        raise Video2FacesError("--group-mode classify needs --ref-dir (one subfolder of reference images per person)")
    if s.group_mode == "cluster":
        try:
            gp.parse_clusters(s.clusters)
        except ValueError as e:
            raise Video2FacesError(str(e)) from None
    if s.video_reader not in ("opencv", "pyav"):
        raise Video2FacesError(f"--video-reader must be opencv or pyav, got {s.video_reader!r}")
    return s


def video_list(inp: Path, exts: str) -> list[Path]:
    """A video, a folder of videos (by extension, sorted), or a .txt list of paths."""
    if not inp.exists():
        raise Video2FacesError(f"{inp}: no such file or folder")
    if inp.is_dir():
        allowed = {"." + e.strip().lower().lstrip(".") for e in exts.split(";") if e.strip()}
        files = sorted(p for p in inp.iterdir() if p.is_file() and p.suffix.lower() in allowed)
        if not files:
            raise Video2FacesError(f"{inp}: no videos with extension {' or '.join(sorted(allowed))} "
                                   f"(set --input-ext, e.g. 'mkv;mp4;avi')")
        return files
    if inp.suffix.lower() == ".txt":
        lines = [l.strip() for l in inp.read_text().splitlines()]
        files = [Path(l) if Path(l).is_absolute() else inp.parent / l for l in lines if l and not l.startswith("#")]
        if not files:
            raise Video2FacesError(f"{inp}: the list names no videos")
        return files
    return [inp]


# ----------------------------------------------------------------------------- geometry

def reject_reasons(boxes: torch.Tensor, scores: torch.Tensor, w: int, h: int, s: Settings) -> torch.Tensor:
    """(N,3) bool: score too low, box too small (either side), too close to a frame border."""
    low = scores < s.det_min_score
    small = ((boxes[:, 2] - boxes[:, 0]) < s.det_min_size) | ((boxes[:, 3] - boxes[:, 1]) < s.det_min_size)
    b = s.det_min_border
    near = ((boxes[:, 0] < b) | (boxes[:, 1] < b) | (boxes[:, 2] > w - b) | (boxes[:, 3] > h - b)) if b > 0 \
        else torch.zeros_like(low)
    return torch.stack([low, small, near], 1)


def crop_boxes(boxes: torch.Tensor, w: int, h: int, scale: Sequence[float], square: bool) -> torch.Tensor:
    """Integer crop boxes (N,4): each border moved away from the box centre by its factor
    (left, right, up, down); with square, the shorter side grows to the longer one. At frame
    borders a box is shifted back inside, never shrunk, unless it is larger than the frame."""
    sl, sr, su, sd = scale
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    xc, yc = boxes[:, 0] + bw / 2, boxes[:, 1] + bh / 2
    x1, x2 = xc - sl * bw / 2, xc + sr * bw / 2
    y1, y2 = yc - su * bh / 2, yc + sd * bh / 2
    if square:
        side = torch.maximum(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        x1, x2, y1, y2 = cx - side / 2, cx + side / 2, cy - side / 2, cy + side / 2
        # shift inside the frame; only a square larger than the frame is cut
        dx = (-x1).clamp(min=0) - (x2 - w).clamp(min=0)
        dy = (-y1).clamp(min=0) - (y2 - h).clamp(min=0)
        x1, x2, y1, y2 = x1 + dx, x2 + dx, y1 + dy, y2 + dy
    out = torch.stack([x1.floor(), y1.floor(), x2.ceil(), y2.ceil()], 1)
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out.long()


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
            raise Video2FacesError(f"{self.manifest_path}: unreadable manifest; use another --out-dir "
                                   f"or --overwrite") from None

    def save_manifest(self, m: dict) -> None:
        atomic_write_bytes(self.manifest_path, json.dumps(m, indent=1).encode())

    def table_path(self, key: str) -> Path:
        return self.state / f"video_{key}.npz"

    def crops_path(self, key: str) -> Path:
        return self.state / f"video_{key}.crops"

    def clear(self) -> None:
        for p in (self.state, self.faces, self.inter, self.out / "groups"):
            shutil.rmtree(p, ignore_errors=True)
        for f in ("groups.csv", "index.html"):
            (self.out / f).unlink(missing_ok=True)


def save_table(path: Path, t: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **t)


def empty_table(dim: int) -> dict:
    return {"name": np.zeros(0, dtype="<U64"), "frame": np.zeros(0, np.int64), "face_index": np.zeros(0, np.int64),
            "boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
            "landmarks": np.zeros((0, 5, 2), np.float32), "embeddings": np.zeros((0, dim), np.float32),
            "hash": np.zeros(0, np.int64), "quality": np.zeros(0, np.float64), "crop_index": np.zeros(0, np.int64)}


class CropStore:
    """The aligned 8-bit encoder crops of faces whose embedding is deferred (stage 1 of the hash
    pass linked them: almost always dropped duplicates), in a raw file beside the video's table:
    a later grouping with other settings can still embed them without decoding the video."""

    def __init__(self, path: Path):
        self.path, self.count, self._fh = path, 0, None

    def add(self, crop: torch.Tensor) -> int:
        if self._fh is None:
            self._fh = open(self.path.with_name(self.path.name + ".part"), "wb")
        self._fh.write(crop.cpu().contiguous().numpy().tobytes())
        self.count += 1
        return self.count - 1

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


# ----------------------------------------------------------------------------- detection stage

@dataclass
class VideoStats:
    path: str
    frames: int = 0
    faces: int = 0
    rejected: int = 0
    ended_early: bool = False
    error: str = ""
    seconds: float = 0.0


def _prepare(f, det_size: int | None):
    """Work done on the reader thread, overlapping the models: the detector's shrunk copy
    (cv2 INTER_LINEAR, as upstream RetinaFace resizes) and a (3,H,W) view of the 8-bit frame (the
    aligner converts only the pixels its crops read, see ops.align.warp)."""
    import cv2

    h, w = f.image.shape[:2]
    small = f.image
    if det_size and max(h, w) > det_size:
        s = det_size / max(h, w)
        small = cv2.resize(f.image, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
    return f, small, torch.from_numpy(f.image).permute(2, 0, 1)


def _reader_thread(path, s: Settings, q: queue.Queue, stop: threading.Event, box: dict,
                   threads: int | None):
    """Decode (and prepare) on a thread: OpenCV, PyAV and torch release the GIL, so decoding
    overlaps the models."""
    from ..ops.video import VideoReader

    try:
        with VideoReader(path, step=s.video_step, fragment=s.video_fragment, area=s.video_area,
                         reader=s.video_reader, threads=threads) as r:
            box["reader"] = r
            for f in r:
                item = _prepare(f, s.det_size)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
    except Exception as e:  # reported by name by the consumer
        box["error"] = e
    finally:
        q.put(None)


def draw_frame(image: np.ndarray, boxes, scores, rejected) -> np.ndarray:
    """Downscaled to fit 1024 px; kept boxes green, rejected red, with scores."""
    import cv2

    h, w = image.shape[:2]
    sc = min(1.0, 1024 / max(h, w))
    out = cv2.resize(image, (int(w * sc), int(h * sc)), interpolation=cv2.INTER_AREA) if sc < 1 else image.copy()
    for b, sco, rej in zip(boxes.tolist(), scores.tolist(), rejected.tolist()):
        x1, y1, x2, y2 = (int(v * sc) for v in b)
        c = (255, 0, 0) if rej else (0, 255, 0)
        cv2.rectangle(out, (x1, y1), (x2, y2), c, 2)
        cv2.putText(out, f"{sco:.2f}", (x1, y1 - 3 if y1 > 12 else y2 - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, c, 1,
                    cv2.LINE_AA)
    return out


def detect_video(path: Path, key: str, name_prefix: str, s: Settings, ws: Workspace, det, enc,
                 writer: ThreadPoolExecutor) -> tuple[dict, list[dict], VideoStats]:
    """Run the detection stage over one video -> (face table, reject log rows, stats)."""
    from tqdm import tqdm

    from ..ops.video import probe

    t0 = time.time()
    stats = VideoStats(str(path))
    info = probe(path)  # raises a one-line VideoReadError for unreadable files
    dev = model_device(det)
    dim = embedding_dim(enc)
    table = {k: [] for k in empty_table(dim)}
    rejects: list[dict] = []
    q: queue.Queue = queue.Queue(maxsize=2 * s.det_batch_size + 2)
    stop, box = threading.Event(), {}
    decode_threads, model_threads = split_cpu_threads(dev)
    th = threading.Thread(target=_reader_thread, args=(path, s, q, stop, box, decode_threads), daemon=True)
    th.start()
    expected = None
    if info.duration_s:
        span = info.duration_s
        if s.video_fragment:
            end = s.video_fragment[1] if s.video_fragment[1] is not None and s.video_fragment[1] >= 0 else float("inf")
            span = min(span, end * 60) - s.video_fragment[0] * 60
        expected = max(1, int(span / s.video_step) + 1)
    bar = tqdm(total=expected, unit="frame", desc=path.name[:30], file=sys.stderr, disable=None, leave=False)
    floor = min(s.det_min_score, 0.3)  # see near misses in rejects/frames logs
    pending = []
    futures = []
    enc_queue: list[torch.Tensor] = []  # aligned 8-bit crops waiting for the encoder
    enc_rows: list[int] = []  # their rows in the table
    # Faces that stage 1 of the hash pass links to a recent face are almost always dropped as
    # duplicates: their embedding waits for the whole pass (end of the video), crops on disk.
    stage1 = dd.HashWindow(s.hash_thr) if s.hash_thr != -1 else None
    deferred = CropStore(ws.crops_path(key))

    def process(items):
        batch = [f for f, _, _ in items]
        small = torch.from_numpy(np.stack([sm for _, sm, _ in items])).to(dev).permute(0, 3, 1, 2).float()
        fulls = [full.to(dev) for _, _, full in items]
        dets = det.detect(small, min_score=floor, max_size=None)
        h, w = fulls[0].shape[1:]
        if small.shape[2:] != (h, w):  # back to full-frame pixels
            sx, sy = w / small.shape[3], h / small.shape[2]
            dets.boxes = dets.boxes * torch.tensor([sx, sy, sx, sy], device=dev)
            if dets.landmarks is not None:
                dets.landmarks = dets.landmarks * torch.tensor([sx, sy], device=dev)
        reasons = reject_reasons(dets.boxes, dets.scores, w, h, s)
        bad = reasons.any(1)
        keep = dets.select(~bad)
        if len(keep):
            # one warp per frame that has faces (no copy of the batch's full frames into one tensor)
            crops = torch.cat([encoder_faces(fulls[i][None], keep.for_image(i).shift_images(-i), enc, s.enc_area).crops
                               for i in torch.unique(keep.image_index).tolist()])
            order = torch.argsort(keep.image_index, stable=True)
            keep = keep.select(order)  # rows now follow the crops: grouped by frame
            # 8-bit, as stored for deferred faces: every face is embedded from the same pixels
            crops_u8 = crops.round().clamp(0, 255).to(torch.uint8)
            hashes = dd.average_hash(crops_u8).cpu()
            sharp = dd.sharpness(crops_u8).cpu()
        cboxes = crop_boxes(keep.boxes, w, h, s.det_scale, s.det_square).cpu() if len(keep) else None
        kb, kidx = keep.boxes.cpu(), keep.image_index.cpu()
        all_img = dets.image_index.cpu()
        for i, f in enumerate(batch):
            stats.frames += 1
            sel = torch.nonzero(kidx == i).flatten()
            ox, oy = f.offset
            for j, n in enumerate(sel.tolist()):
                x1, y1, x2, y2 = cboxes[n].tolist()
                fname = f"{name_prefix}{f.index:06d}_{j}.jpg"
                futures.append(writer.submit(write_image, ws.faces / fname, f.image[y1:y2, x1:x2]))
                bx = kb[n]
                table["name"].append(fname)
                table["frame"].append(f.index)
                table["face_index"].append(j)
                table["boxes"].append((bx + torch.tensor([ox, oy, ox, oy])).numpy())
                table["scores"].append(float(keep.scores[n]))
                lm = keep.landmarks[n].cpu() + torch.tensor([ox, oy]) if keep.landmarks is not None \
                    else torch.full((5, 2), float("nan"))
                table["landmarks"].append(lm.numpy())
                row, h = len(table["embeddings"]), int(hashes[n])
                table["embeddings"].append(np.full(dim, np.nan, np.float32))  # deferred faces stay NaN
                if stage1 is not None and stage1.link(row, h) >= 0:
                    table["crop_index"].append(deferred.add(crops_u8[n]))
                else:  # embedded in full batches of --enc-batch-size, see flush_encoder
                    table["crop_index"].append(-1)
                    enc_queue.append(crops_u8[n])
                    enc_rows.append(row)
                table["hash"].append(h)
                table["quality"].append(float((bx[2] - bx[0]) * (bx[3] - bx[1]) * (sharp[n] + 1)))
            stats.faces += len(sel)
            rsel = torch.nonzero(all_img == i).flatten()
            r_j = 0
            for n in rsel.tolist():
                rs = reasons[n].tolist()
                if not any(rs):
                    continue
                stats.rejected += 1
                b = dets.boxes[n].cpu()
                fname = f"{name_prefix}{f.index:06d}_r{r_j}.jpg"
                r_j += 1
                if s.save_rejects:
                    x1, y1, x2, y2 = (int(v) for v in b.round().clamp(min=0).tolist())
                    if x2 > x1 and y2 > y1:
                        futures.append(writer.submit(write_image, ws.inter / "rejects" / fname, f.image[y1:y2, x1:x2]))
                rejects.append({"file_name": fname, "video": str(path), "frame": f.index,
                                "score": round(float(dets.scores[n]), 4),
                                "width": round(float(b[2] - b[0]), 1), "height": round(float(b[3] - b[1]), 1),
                                "x1": round(float(b[0]) + ox, 1), "y1": round(float(b[1]) + oy, 1),
                                "x2": round(float(b[2]) + ox, 1), "y2": round(float(b[3]) + oy, 1),
                                f"too_low(min_score={s.det_min_score})": int(rs[0]),
                                f"too_small(min_size={s.det_min_size})": int(rs[1]),
                                f"too_close(min_border={s.det_min_border})": int(rs[2])})
            if s.save_frames:
                fb = dets.boxes[rsel].cpu()
                img = draw_frame(f.image, fb, dets.scores[rsel].cpu(), bad[rsel].cpu())
                futures.append(writer.submit(write_image, ws.inter / "frames" / f"{name_prefix}{f.index:06d}.jpg",
                                             img, 50))
        if len(enc_queue) >= s.enc_batch_size:
            flush_encoder()
        bar.update(len(batch))
        bar.set_postfix(faces=stats.faces)

    def flush_encoder():
        if enc_queue:
            emb = encode(enc, torch.stack(enc_queue).float(), s.enc_batch_size).cpu().numpy()
            for row, e in zip(enc_rows, emb):
                table["embeddings"][row] = e
            enc_queue.clear()
            enc_rows.clear()

    try:
        with torch_threads(model_threads):  # while the decoder runs beside the models
            while True:
                f = q.get()
                if f is None:
                    break
                pending.append(f)
                if len(pending) >= s.det_batch_size:
                    process(pending)
                    pending = []
        if pending:
            process(pending)
        flush_encoder()
        deferred.finish()
        for fu in futures:
            fu.result()
    finally:
        deferred.abandon()
        stop.set()
        bar.close()
        th.join(timeout=5)
    if "error" in box:
        raise box["error"]
    r = box.get("reader")
    if r is not None:
        stats.ended_early = bool(getattr(r, "ended_early", False))
        stats.error = str(getattr(r, "error", "") or "")
    out = empty_table(dim)
    if table["name"]:
        out = {k: np.asarray(v) for k, v in table.items()}
        out["name"] = out["name"].astype(str)
        if (out["crop_index"] >= 0).any():
            # The video's hash pass, as grouping will run it: the deferred faces it keeps are
            # embedded now; the dropped ones stay NaN (grouping embeds any it keeps otherwise).
            kept = dd.hash_duplicates(torch.from_numpy(out["hash"]), out["quality"], s.hash_thr).keep
            embed_missing(out, kept, np.zeros(len(kept), np.int64), [deferred.path], enc, s.enc_batch_size)
    stats.seconds = time.time() - t0
    return out, rejects, stats


# ----------------------------------------------------------------------------- grouping stage

def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_index(out: Path, groups: dict[str, list[str]], title: str) -> None:
    """OUT/index.html: each group as a grid of thumbnails with its count."""
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>body{font:14px sans-serif;margin:16px}h2{margin:18px 0 6px}"
             ".g{display:flex;flex-wrap:wrap;gap:4px}.g img{height:96px;width:auto;border-radius:3px}"
             "figure{margin:0}figcaption{font-size:10px;color:#666;max-width:96px;overflow:hidden}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for g, files in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        parts.append(f"<h2 id='{html.escape(g)}'>{html.escape(g)} <small>({len(files)} faces)</small></h2><div class=g>")
        for f in files:
            src = html.escape(f"groups/{g}/{f}")
            parts.append(f"<figure><a href='{src}'><img loading=lazy src='{src}' title='{html.escape(f)}'></a>"
                         f"<figcaption>{html.escape(f)}</figcaption></figure>")
        parts.append("</div>")
    atomic_write_bytes(out / "index.html", "\n".join(parts).encode())


def _warm_imports(group_mode: str) -> None:
    """Import the grouping stage's libraries (~0.3-0.8 s) on a thread while frames decode."""
    def run():
        import scipy.sparse.csgraph  # noqa: F401  (dedup)
        if group_mode == "auto":
            import scipy.cluster.hierarchy  # noqa: F401
        elif group_mode == "cluster":
            import sklearn.cluster  # noqa: F401
            import sklearn.metrics  # noqa: F401

    threading.Thread(target=run, daemon=True).start()


def embed_missing(t: dict, rows_needed: np.ndarray, video_of_row: np.ndarray, crop_files: list[Path], enc,
                  batch_size: int) -> None:
    """Fill, in place, the embeddings of needed faces whose embedding detection deferred (NaN),
    from their stored crops."""
    missing = np.flatnonzero(rows_needed & np.isnan(t["embeddings"]).any(1))
    size = encoder_geometry(enc)[0]
    for v in np.unique(video_of_row[missing]).tolist():
        rows = missing[video_of_row[missing] == v]
        crops = CropStore.read(crop_files[v], t["crop_index"][rows], size)
        t["embeddings"][rows] = encode(enc, crops.float(), batch_size).cpu().numpy()


def group_stage(s: Settings, ws: Workspace, manifest: dict, device) -> dict:
    """Dedup and group every face recorded in the manifest; rebuild OUT/groups/."""
    tables, keys = [], []
    for key, v in manifest["videos"].items():
        if v.get("status") == "done" and ws.table_path(key).is_file():
            z = np.load(ws.table_path(key))
            tables.append({k: z[k] for k in z.files})
            keys.append(key)
    if not tables:
        return {"faces": 0, "duplicates": 0, "groups": {}}
    t = {k: np.concatenate([x[k] for x in tables]) for k in tables[0]}
    video_of_row = np.repeat(np.arange(len(keys)), [len(x["name"]) for x in tables])
    files = [str(f) for f in t["name"]]
    n = len(files)
    enc = cached_model(manifest["detection"]["enc_model"], device, s.weights_dir)
    keep = np.ones(n, bool)
    dupe_logs = {}
    if n and s.hash_thr != -1:
        r = dd.hash_duplicates(torch.from_numpy(t["hash"]), t["quality"], s.hash_thr)
        keep &= r.keep
        dupe_logs[1] = dd.dedup_log_rows(r, files)
    embed_missing(t, keep, video_of_row, [ws.crops_path(k) for k in keys], enc, s.enc_batch_size)
    if keep.any() and s.enc_dup_thr != -1:
        idx = np.flatnonzero(keep)
        r = dd.embedding_duplicates(torch.from_numpy(t["embeddings"][idx]), t["quality"][idx], s.enc_dup_thr)
        keep[idx[~r.keep]] = False
        dupe_logs[2] = dd.dedup_log_rows(r, [files[i] for i in idx])
    kept = np.flatnonzero(keep)

    for stale in ws.out.glob(".groups.*"):  # left by an interrupted grouping
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ws.out / f".groups.part-{os.getpid()}"
    rows, grouping = [], None
    if len(kept):
        e = torch.from_numpy(t["embeddings"][kept])
        if s.group_mode == "cluster":
            grouping = gp.cluster(e, s.clusters, random_state=s.random_state, save_all=s.clusters_save_all)
        elif s.group_mode == "auto":
            thr = s.auto_thr if s.auto_thr is not None else enc.spec.preprocess.get("auto_threshold", gp.AUTO_THRESHOLD)
            grouping = gp.auto(e, thr)
        else:
            ref_e, ref_l = reference_embeddings(Path(s.ref_dir), enc.spec.name, manifest["detection"]["det_model"],
                                                None, device, s.enc_area, s.weights_dir)
            grouping = gp.classify(e, ref_e, ref_l, s.enc_oth_thr)
        if grouping.note:
            print(f"tidyface: {grouping.note}", file=sys.stderr)
        for j, i in enumerate(kept):
            link(ws.faces / files[i], tmp / grouping.labels[j] / files[i])
            rows.append({"file": f"groups/{grouping.labels[j]}/{files[i]}", "frame": int(t["frame"][i]),
                         "face_index": int(t["face_index"][i]), "group": grouping.labels[j],
                         "distance": f"{grouping.distance[j]:.4f}", "score": f"{t['scores'][i]:.4f}"})
        if s.group_mode == "cluster" and s.clusters_save_all:
            for k, labels in grouping.details.get("labels_per_k", {}).items():
                for j, i in enumerate(kept):
                    link(ws.faces / files[i], tmp / f"G{k}" / labels[j] / files[i])
    tmp.mkdir(exist_ok=True)
    old = ws.out / "groups"
    if old.exists():
        trash = ws.out / f".groups.old-{os.getpid()}"
        os.replace(old, trash)
        os.replace(tmp, old)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, old)
    for i in np.flatnonzero(~keep):
        rows.append({"file": f"faces/{files[i]}", "frame": int(t["frame"][i]), "face_index": int(t["face_index"][i]),
                     "group": "duplicate", "distance": "", "score": f"{t['scores'][i]:.4f}"})
    write_csv(ws.out / "groups.csv", rows, ["file", "frame", "face_index", "group", "distance", "score"])
    for p, rows_p in dupe_logs.items():
        if s.save_dupes:
            shutil.rmtree(ws.inter / f"dupes{p}", ignore_errors=True)
            for row in rows_p:
                link(ws.faces / row["name"], ws.inter / f"dupes{p}" / row["name"])
            write_csv(ws.inter / f"log_dupes{p}.csv", rows_p, ["name", "kept", "set", "distance"])
    if s.group_log and grouping is not None:
        write_csv(ws.out / "log_grouping.csv", gp.grouping_log_rows(grouping, [files[i] for i in kept]))
    groups = {} if grouping is None else {g: [files[kept[i]] for i in idx] for g, idx in grouping.groups().items()}
    write_index(ws.out, groups, f"tidyface video2faces: {len(kept)} faces in {len(groups)} groups")
    return {"faces": n, "duplicates": int((~keep).sum()), "groups": {g: len(v) for g, v in groups.items()}}


# ----------------------------------------------------------------------------- the run

def video_to_faces(input: str, **kw) -> dict:
    """Videos in, faces grouped per person out; the flags of `tidyface video2faces` as keywords.

    Returns the run's summary (also printed): videos, frames, faces, rejects, duplicates, groups.
    """
    s = validate(Settings(input=input, **kw))
    t0 = time.time()
    inp = Path(s.input)
    out = Path(s.out_dir) if s.out_dir else (inp if inp.is_dir() else inp.resolve().parent)
    ws = Workspace(out)
    device = resolve_device(s.device)
    man = ws.manifest()
    summary = {"videos": 0, "failed": [], "frames": 0, "faces": 0, "rejected": 0, "duplicates": 0,
               "groups": {}, "seconds": 0.0, "out": str(out)}

    if s.mode == "grouping":
        if man is None:
            raise Video2FacesError(f"{out}: no detection results here (no {STATE}/manifest.json); run "
                                   f"--mode detection or full first, with the same --out-dir")
    else:
        videos = video_list(inp, s.input_ext)
        sig = s.detection_signature()
        listing = [str(p) for p in videos]
        if man is not None and s.overwrite:
            ws.clear()
            man = None
        elif man is None and ws.faces.exists() and any(ws.faces.iterdir()):
            raise Video2FacesError(f"{ws.faces} already holds files that are not from a tidyface run; "
                                   f"choose another --out-dir")
        if man is not None and (man["detection"] != sig or man["inputs"] != listing):
            raise Video2FacesError(f"{out} holds results of a run with other inputs or detection settings; "
                                   f"re-run with the same ones to resume, use another --out-dir, or pass "
                                   f"--overwrite to replace them")
        if man is None:
            man = {"version": 1, "detection": sig, "inputs": listing, "videos": {}}
        # weights before the first write: a run that cannot get them leaves no folder behind
        det = cached_model(s.det_model, device, s.weights_dir)
        enc = cached_model(s.enc_model, device, s.weights_dir)
        for d in (ws.faces, ws.state) + ((ws.inter / "frames",) if s.save_frames else ()) + \
                ((ws.inter / "rejects",) if s.save_rejects else ()):
            d.mkdir(parents=True, exist_ok=True)
        ws.save_manifest(man)
        if s.mode == "full":
            _warm_imports(s.group_mode)
        multi = len(videos) > 1 or inp.is_dir() or inp.suffix.lower() == ".txt"
        all_rejects = []
        with ThreadPoolExecutor(2) as writer:
            for k, path in enumerate(videos, 1):
                key = f"{k:02d}"
                rec = man["videos"].get(key)
                if rec and rec.get("status") == "done" and ws.table_path(key).is_file():
                    print(f"tidyface: {path.name}: done in an earlier run, skipped", file=sys.stderr)
                    all_rejects += rec.get("rejects", [])
                    continue
                prefix = s.out_prefix + (f"{key}_" if multi else "")
                try:
                    table, rejects, st = detect_video(path, key, prefix, s, ws, det, enc, writer)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
                    warn(f"{path}: {msg}" if str(path) not in msg else msg)
                    man["videos"][key] = {"path": str(path), "status": "failed", "error": msg}
                    summary["failed"].append(str(path))
                    ws.save_manifest(man)
                    continue
                save_table(ws.table_path(key), table)
                if st.ended_early:
                    warn(f"{path}: the video ended after {st.frames} sampled frames, earlier than its "
                         f"metadata promised (truncated or corrupt?); faces found up to there are kept")
                if st.faces == 0:
                    warn(f"{path}: no faces found in {st.frames} sampled frames")
                man["videos"][key] = {"path": str(path), "status": "done", "frames": st.frames, "faces": st.faces,
                                      "rejected": st.rejected, "ended_early": st.ended_early, "rejects": rejects,
                                      "seconds": round(st.seconds, 2)}
                ws.save_manifest(man)
                all_rejects += rejects
        if s.save_rejects:
            write_csv(ws.inter / "log_rejects.csv", all_rejects)
    for v in man["videos"].values():
        if v.get("status") == "done":
            summary["videos"] += 1
            summary["frames"] += v["frames"]
            summary["faces"] += v["faces"]
            summary["rejected"] += v["rejected"]
        elif v.get("status") == "failed" and v["path"] not in summary["failed"]:
            summary["failed"].append(v["path"])
    if s.mode != "detection":
        g = group_stage(s, ws, man, device)
        summary["duplicates"], summary["groups"] = g["duplicates"], g["groups"]
    summary["seconds"] = round(time.time() - t0, 1)
    groups = ", ".join(f"{k}={v}" for k, v in sorted(summary["groups"].items(), key=lambda kv: (-kv[1], kv[0])))
    print(f"tidyface: {summary['videos']} videos ({len(summary['failed'])} failed), {summary['frames']} frames, "
          f"{summary['faces']} faces kept, {summary['rejected']} rejected, {summary['duplicates']} duplicates; "
          f"groups: {groups or 'none'}; {summary['seconds']} s -> {out}", file=sys.stderr)
    return summary
