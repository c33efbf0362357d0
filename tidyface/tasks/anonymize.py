"""Anonymisation of photos and videos: every face found is made unrecognisable, nothing else.

detect (low threshold, full resolution; large photos in overlapping tiles plus once whole) ->
per face a region mask in its own frame (parse: the parser's face classes on its aligned crop;
ellipse / box: around the detector box) -> softened (grown, feathered) -> composited through each
face's image -> mask matrix (ops.obscure). Recall first: faces too small for the parser, and
faces whose parse covers too little of their box (a profile, an occlusion, a false parse), get
the ellipse. Videos: every frame is written; faces are tracked by box overlap, so a face parsed a
moment ago keeps its mask (moved by its landmarks) instead of being parsed on every frame, and a
face the detector misses for a few frames stays covered by an ellipse at its last place.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..cache import ModelCache, resolve_device
from ..errors import UsageError
from ..ops import graphs
from ..ops.image import IMAGE_EXTS, as_rgb_uint8, expand_paths, write_image
from ..ops.nms import box_iou, nms
from ..ops.obscure import box_frames, composite, edge_taper, shape_masks, soften
from ..options import AnonymizeOptions
from ..types import Detections
from . import pipeline as pl
from .common import background, load_models, progress, readable, warn
from .outdir import OutputFolder

LOG = "anonymize_log.jsonl"
# A parse whose obscured classes cover less than this share of the detector box is not trusted
# (a profile, a hand over the face, a blurred face the parser calls background): the ellipse
# covers that face instead.
MIN_PARSE_COVER = 0.3
# How far the parsed face may reach: the ellipse of the detector box grown this much (a face's
# hair line, ears and chin lie inside it on RetinaFace boxes).
PARSE_REACH = 1.8
# brows, eyes, glasses, nose, mouth, lips (CelebAMask-HQ ids), and the share of the crop they
# must cover inside the box for a parse to be trusted
FEATURES = torch.tensor([2, 3, 4, 5, 6, 10, 11, 12, 13], dtype=torch.uint8)
MIN_FEATURES = 0.002
TILE_OVERLAP = 0.25  # of the tile: a face up to a quarter of a tile lies whole in one of them
TRACK_IOU = 0.3


@dataclass
class Regions:
    """The regions of one image's faces: masks (h,w) in 0..1, one per face, their image -> mask
    matrices (N,3,3) and face sizes in pixels (N,); counts of how each face was covered."""

    masks: list[Tensor] = field(default_factory=list)
    mats: list[Tensor] = field(default_factory=list)
    face_px: list[float] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"parse": 0, "shape": 0, "held": 0})

    def add(self, masks: Sequence[Tensor], mats: Tensor, boxes: Tensor, kind: str) -> None:
        self.masks += list(masks)
        self.mats += list(mats.to("cpu", torch.float64))
        self.face_px += (boxes[:, 2:] - boxes[:, :2]).amax(1).tolist()
        self.counts[kind] += len(masks)

    def apply(self, image: np.ndarray, o: AnonymizeOptions) -> np.ndarray:
        if not self.masks:
            return np.zeros(image.shape[:2], np.uint8) if o.method == "mask" else image
        return composite(image, self.masks, torch.stack(self.mats), torch.tensor(self.face_px),
                         o.method, o.strength, o.color)


def _box_regions(boxes: Tensor, mats: Tensor, side: int, scale: float) -> Tensor:
    """(N,side,side) bool: the pixels of each crop (image -> crop `mats`) inside the ellipse
    inscribed in its detector box grown `scale` times about its centre (scale 1: the box's own
    ellipse; the box itself at scale sqrt(2) and more)."""
    from ..ops.align import invert

    grid = torch.arange(side, dtype=torch.float64, device=boxes.device)
    pts = torch.stack(torch.broadcast_tensors(grid[None, :], grid[:, None]), -1).reshape(-1, 2)
    inv = invert(mats.to(torch.float64))
    img = pts @ inv[:, :2, :2].transpose(1, 2) + inv[:, None, :2, 2]  # (N,S*S,2) image pixels
    b = boxes.to(torch.float64)
    centre, half = (b[:, None, :2] + b[:, None, 2:]) / 2, (b[:, None, 2:] - b[:, None, :2]).clamp(min=1) * scale / 2
    return (((img - centre) / half) ** 2).sum(-1).reshape(-1, side, side) <= 1


class Anonymizer:
    """The models and settings of one run; `image` anonymises a photo, `video` a whole video."""

    def __init__(self, o: AnonymizeOptions, models: ModelCache | None = None):
        self.o = o
        self.device = resolve_device(o.device)
        (self.detector,) = load_models(models, self.device, o.weights_dir, o.det_model, precision=o.precision)
        self.parser, self._shape = None, None
        if o.region == "parse":
            (self.parser,) = load_models(models, self.device, o.weights_dir, o.parse_model, precision=o.precision)
            self.geometry = pl.parser_geometry(self.parser)
            self.classes = torch.tensor([int(c) for c in o.classes.split(",")], dtype=torch.uint8)
            n = len(self.parser.spec.meta.class_names)
            if int(self.classes.max()) >= n:
                raise UsageError(f"--classes: {o.parse_model} has classes 0-{n - 1}, got {o.classes}")

    # -- detection
    def detect(self, image: Tensor) -> Detections:
        """Faces of one (3,H,W) image at full resolution; above det_tile pixels, in overlapping
        full-resolution tiles (one batched call) plus the whole image at det_tile, merged by NMS."""
        o, det = self.o, self.detector
        h, w = image.shape[1:]
        if max(h, w) <= o.det_tile:
            return det.detect(image[None], min_score=o.det_threshold, max_size=0)
        tile = o.det_tile
        step = int(tile * (1 - TILE_OVERLAP))
        xs = sorted({*range(0, max(w - tile, 0), step), max(w - tile, 0)})
        ys = sorted({*range(0, max(h - tile, 0), step), max(h - tile, 0)})
        corners = torch.tensor([(x, y) for y in ys for x in xs], dtype=torch.float32)
        tiles = torch.stack([image[:, y:y + tile, x:x + tile] for x, y in corners.long().tolist()])
        parts = det.detect(tiles, min_score=o.det_threshold, max_size=0)
        shift = corners[parts.image_index.cpu()].to(parts.boxes)
        lm = None if parts.landmarks is None else parts.landmarks + shift[:, None]
        parts = Detections(parts.boxes + shift.repeat(1, 2), parts.scores, lm,
                           torch.zeros_like(parts.image_index))
        found = Detections.cat([det.detect(image[None], min_score=o.det_threshold, max_size=tile), parts])
        return found.select(nms(found.boxes, found.scores, 0.4))

    # -- regions
    def parse_masks(self, image: Tensor, dets: Detections) -> tuple[Tensor, Tensor, Tensor]:
        """Soft masks of the obscured classes on each face's parser crop, their matrices, and
        whether each parse is trusted (covers MIN_PARSE_COVER of its box)."""
        faces = pl.parse(self.parser, pl.align([image], dets, self.geometry))
        side = faces.masks.shape[-1]
        # the face classes only near the face: skin of a neck or an arm, and the crop's own
        # border, are not taken (so a false detection on skin blurs no more than its box)
        region = torch.isin(faces.masks, self.classes.to(faces.masks.device))
        region &= _box_regions(dets.boxes, faces.crop_mat, side, PARSE_REACH)
        inner = _box_regions(dets.boxes, faces.crop_mat, side, 1.0)
        cover = (region & inner).flatten(1).sum(1) / inner.flatten(1).sum(1).clamp(min=1)
        # a face shows an eye, a brow, its nose or its mouth; skin alone (an arm, a chest the
        # detector took for a face) is not trusted as a parse
        features = torch.isin(faces.masks, FEATURES.to(faces.masks.device)) & inner
        trusted = (cover >= MIN_PARSE_COVER) & (features.flatten(1).float().mean(1) >= MIN_FEATURES)
        soft = soften(region, self.o.grow, self.o.feather) * edge_taper(side, self.o.feather, region.device)
        return soft, faces.crop_mat, trusted

    def shapes(self, boxes: Tensor, regions: Regions, kind: str = "shape") -> None:
        """Ellipses (or boxes) around detector boxes: one softened mask serves every face."""
        if self._shape is None:
            shape = "box" if self.o.region == "box" else "ellipse"
            self._shape = soften(shape_masks(1, shape), self.o.grow, self.o.feather)[0]
        regions.add([self._shape] * len(boxes), box_frames(boxes, self.o.box_scale), boxes, kind)

    def regions(self, image: Tensor, dets: Detections) -> Regions:
        """Every face of a photo: parsed where it is large enough and the parse holds, else the
        ellipse (or the region asked for)."""
        r = Regions()
        if len(dets) == 0:
            return r
        parse = self._parseable(dets)
        if parse.any():
            masks, mats, ok = self.parse_masks(image, dets.select(parse.nonzero().flatten()))
            idx = parse.nonzero().flatten()
            r.add(masks[ok], mats[ok], dets.boxes[idx[ok]], "parse")
            parse[idx[~ok]] = False
        if (~parse).any():
            self.shapes(dets.boxes[~parse], r)
        return r

    def _parseable(self, dets: Detections) -> Tensor:
        if self.parser is None:
            return torch.zeros(len(dets), dtype=torch.bool, device=dets.boxes.device)
        return (dets.boxes[:, 2] - dets.boxes[:, 0]) >= self.o.min_parse_size

    # -- a photo
    def image(self, image: np.ndarray) -> tuple[np.ndarray, dict]:
        t = pl.as_chw(image, self.device)
        r = self.regions(t, self.detect(t))
        return r.apply(image, self.o), {"faces": len(r.masks), **r.counts}

    # -- a video
    def video(self, path: Path, out: Path, bar) -> dict:
        """Every frame of `path` into `out` (same size, rate and frame count, audio kept with PyAV)."""
        from ..ops.video import VideoReader
        from ..ops.video_write import VideoWriter

        reader = VideoReader(path, step=1e-9, reader=self.o.video_reader)
        fps = reader.info.fps or 25.0
        tracks = Tracker(hold=int(round(self.o.hold * fps)), reparse=max(1, int(round(self.o.reparse * fps))))
        totals = {"frames": 0, "frames_with_faces": 0, "parse": 0, "shape": 0, "held": 0, "parsed_anew": 0}
        # Every frame has one shape: the detector runs as a CPU graph (ops.graphs).
        with reader, VideoWriter(out, path, reader.info.fps) as writer, graphs.stream(self.detector):
            for frame in background(reader, depth=4):
                r = self._frame(frame.image, frame.index, tracks, totals)
                result = r.apply(frame.image, self.o)
                writer.write(np.repeat(result[..., None], 3, 2) if result.ndim == 2 else result, frame.time_s)
                for k, v in r.counts.items():
                    totals[k] += v
                totals["frames"] += 1
                totals["frames_with_faces"] += bool(r.masks)
                bar.update(1)
            if reader.ended_early or reader.error:
                warn(f"{path}: the decoder stopped early ({reader.error or 'truncated?'}); "
                     f"{totals['frames']} frames written")
        if writer.warning:
            warn(f"{path}: {writer.warning}")
        return {**totals, "audio": writer.audio, "faces": totals["parse"] + totals["shape"] + totals["held"]}

    def _frame(self, image: np.ndarray, index: int, tracks: "Tracker", totals: dict) -> Regions:
        t = pl.as_chw(image, self.device)
        dets = self.detect(t)
        found = tracks.match(dets.boxes, index)
        r = Regions()
        covered = torch.zeros(len(dets), dtype=torch.bool)
        candidates = self._parseable(dets).cpu().nonzero().flatten().tolist()
        stale = [k for k in candidates if found[k].stale(index, tracks.reparse)]
        if stale:  # parsed again now; the others keep their mask, moved by their landmarks
            masks, _, ok = self.parse_masks(t, dets.select(torch.tensor(stale)))
            for j, k in enumerate(stale):
                found[k].mask, found[k].parsed_at = (masks[j] if ok[j] else None), index
            totals["parsed_anew"] += len(stale)
        keep = [k for k in candidates if found[k].mask is not None]
        if keep:
            chosen = dets.select(torch.tensor(keep))
            r.add([found[k].mask for k in keep], self.geometry.matrices(chosen), chosen.boxes, "parse")
            covered[keep] = True
        if (~covered).any():
            self.shapes(dets.boxes[(~covered).to(dets.boxes.device)], r)
        held = tracks.held(index)
        if held:
            self.shapes(torch.stack([h.box for h in held]).to(dets.boxes), r, "held")
        return r


@dataclass(eq=False)
class Track:
    """One face over consecutive frames (identity, not value, makes two tracks equal)."""

    box: Tensor
    seen: int
    mask: Tensor | None = None  # the face's last trusted parse, in its parser frame
    parsed_at: int | None = None

    def stale(self, index: int, reparse: int) -> bool:
        return self.parsed_at is None or index - self.parsed_at >= reparse


class Tracker:
    """Faces of consecutive frames linked by box overlap (greedy, highest IoU first)."""

    def __init__(self, hold: int, reparse: int):
        self.hold, self.reparse = hold, reparse
        self.tracks: list[Track] = []

    def match(self, boxes: Tensor, index: int) -> list[Track]:
        """The track of each box of frame `index` (a new one where none overlaps)."""
        live = [tr for tr in self.tracks if index - tr.seen <= self.hold + 1]
        boxes = boxes.detach().cpu().float()
        out: list[Track | None] = [None] * len(boxes)
        if live and len(boxes):
            iou = box_iou(boxes, torch.stack([tr.box for tr in live]))
            while True:
                best = int(iou.argmax())
                i, j = divmod(best, iou.shape[1])
                if float(iou[i, j]) < TRACK_IOU:
                    break
                out[i] = live[j]
                iou[i, :], iou[:, j] = -1, -1
        for i, tr in enumerate(out):
            if tr is None:
                tr = out[i] = Track(boxes[i], index)
                live.append(tr)
            tr.box, tr.seen = boxes[i], index
        self.tracks = live
        return out

    def held(self, index: int) -> list[Track]:
        """Tracks not seen in frame `index` but at most `hold` frames before it."""
        return [tr for tr in self.tracks if 0 < index - tr.seen <= self.hold]


# ----------------------------------------------------------------------------- the command

def anonymize(images, models: ModelCache | None = None, **flags):
    """In-memory photos with their faces obscured: one image (a path, numpy RGB array, PIL image
    or tensor) -> a numpy RGB uint8 array; a list -> a list. flags: AnonymizeOptions' fields
    (region, method, strength, det_threshold, ...); method "mask" gives (H,W) uint8 masks."""
    from ..ops.image import image_list

    items, single = image_list(images)
    anon = Anonymizer(AnonymizeOptions(**flags), models)
    out = [anon.image(as_rgb_uint8(im, "image" if single else f"images[{i}]"))[0] for i, im in enumerate(items)]
    return out[0] if single else out


def _output_name(rel: Path, o: AnonymizeOptions, is_video: bool) -> Path:
    return rel.with_suffix(".png") if o.method == "mask" and not is_video else rel


def _done_before(log: Path) -> set[str]:
    """Files an interrupted earlier run finished (its log lines), so a rerun skips them."""
    if not log.exists():
        return set()
    done = set()
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            done.add(json.loads(line)["file"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill: that file is done again
    return done


class _Log:
    """anonymize_log.jsonl: one line per finished file, flushed to disk as it is written."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def add(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def run_anonymize(paths: Sequence[str], o: AnonymizeOptions, models: ModelCache | None = None) -> int:
    """The `tidyface anonymize` command: every photo and video of `paths` rewritten into o.out
    (the inputs' tree) with its faces obscured. Returns the exit code (1: some inputs unreadable)."""
    if not paths:
        raise UsageError("give at least one photo, video, folder or .txt list")
    if not o.out:
        raise UsageError("give --out DIR (inputs are never written over)")
    video_exts = {"." + e.strip().lower().lstrip(".") for e in o.video_ext.split(";") if e.strip()}
    folder = OutputFolder(o.out, "anonymize", paths)
    folder.check()
    files = list(expand_paths(paths, exts=set(IMAGE_EXTS) | video_exts))
    if not files:
        raise UsageError("no photos or videos found in " + ", ".join(map(str, paths)))
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    anon = Anonymizer(o, models)  # weights before the output folder is touched
    with folder:
        folder.claim(o.overwrite, resume=True)
        out, done = folder.path, _done_before(folder.path / LOG)
        folder.record([LOG])
        todo = [f for f in files if str(_output_name(f.resolve().relative_to(root), o, False)) not in done
                and str(f.resolve().relative_to(root)) not in done]
        if len(todo) < len(files):
            print(f"tidyface: resuming: {len(files) - len(todo)} of {len(files)} files were done before",
                  file=sys.stderr)
        log = _Log(out / LOG)
        try:
            failed = _anonymize_files(anon, todo, root, folder, log, video_exts)
        finally:
            log.close()
    print(f"tidyface: {len(todo) - failed} files anonymized into {out} (log: {out / LOG})"
          + (f"; {failed} unreadable" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _anonymize_files(anon: Anonymizer, files: list[Path], root: Path, folder: OutputFolder, log: _Log,
                     video_exts: set[str]) -> int:
    from ..ops.video import VideoReadError

    o, failed, recorded = anon.o, [], set()
    videos = [f for f in files if f.suffix.lower() in video_exts]
    photos = [f for f in files if f.suffix.lower() not in video_exts]

    def target(f: Path, is_video: bool) -> tuple[str, Path]:
        rel = _output_name(f.resolve().relative_to(root), o, is_video)
        if rel.parts[0] not in recorded:
            recorded.add(rel.parts[0])
            folder.record([rel.parts[0]])
        return str(rel), folder.path / rel

    with progress(len(photos), "img", "anonymize") as bar:
        for path, image in readable(photos, failed):
            start = time.perf_counter()
            result, rec = anon.image(image)
            name, dest = target(path, False)
            write_image(dest, result)
            log.add({"file": name, "source": str(path), "kind": "photo", **rec,
                     "seconds": round(time.perf_counter() - start, 3)})
            bar.update(1)
    for path in videos:
        name, dest = target(path, True)
        start = time.perf_counter()
        try:
            from ..ops.video import probe

            with progress(probe(path).frame_count, "frame", path.name) as bar:
                rec = anon.video(path, dest, bar)
        except VideoReadError as e:
            warn(str(e))
            failed.append(path)
            continue
        log.add({"file": name, "source": str(path), "kind": "video", **rec,
                 "seconds": round(time.perf_counter() - start, 3)})
    return len(failed)
