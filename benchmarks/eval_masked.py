"""Masked faces: plain embeddings, masked references (--masked) and upper-face embeddings
(--enc-region upper), per encoder, on synthetic masks (tidyface.ops.masks).

    python benchmarks/eval_masked.py --encoders facenet_casia_tf,mobilefacenet,dlib_resnet

Masks are drawn on the whole photo or frame at the face's detected 5 points, and the masked
picture goes through the pipeline again (detect -> align -> embed), so the detector and its
points see the mask too; a masked face the detector no longer finds (no box with IoU >= 0.3 of
the unmasked one) is aligned on its unmasked points and counted in "refound".

- deepface pairs (shared/media/deepface_pairs, 300 labelled pairs): the second photo of each pair
  wears the mask; ROC AUC of the pair's cosine similarity for: plain (masked probe vs plain
  reference), masked refs (the best of the reference and its three masked versions, drawn on its
  aligned crop as --masked does), upper (both sides' crops blanked below the nose tip; mean or
  zero fill), upper zoom (both sides' upper part zoomed onto the whole crop, for comparison).
- Video_2 (simplefr): the 50 faces of people labelled in tests/data/video2_faces_truth.csv, found
  as video2faces finds them (retinaface_mnet025 at 640 px, score 0.4), classified against the 14
  database faces (nearest person, no "other"); the probe wears the mask.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from _paths import ROOT, SHARED, VIDEO

PAIRS = SHARED / "media/deepface_pairs"
TRUTH = ROOT / "tests/data/video2_faces_truth.csv"
METHODS = ("plain", "masked refs", "upper", "upper zero", "upper zoom")


@dataclass(frozen=True)
class UpperZoom:
    """The upper part of each aligned crop (top to the nose tip, as wide as high, centred) zoomed
    onto the whole crop: the alternative to blanking that pipeline.UpperFace was measured against."""

    base: object

    @property
    def size(self):
        return self.base.size

    def matrices(self, dets):
        from tidyface.tasks import pipeline as pl

        m = self.base.matrices(dets)
        nose_y = pl.crop_points(dets.five_points(), m, self.base.points)[:, 2, 1].clamp(min=1.0)
        side = self.size[1] - 1
        k = side / nose_y
        cx = (self.size[0] - 1) / 2
        z = torch.zeros_like(m)
        z[:, 0, 0], z[:, 1, 1], z[:, 2, 2] = k, k, 1
        z[:, 0, 2] = cx * (1 - k)
        return z @ m


def largest(dets):
    b = dets.boxes
    return dets.select(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax().reshape(1))


def redetect(detector, image: np.ndarray, box: torch.Tensor, orig, **kw):
    """The face in `image` (masked) that overlaps `box` most (IoU >= 0.3), else `orig` (the
    unmasked detection) -> (Detections of one face, refound?)."""
    from tidyface.ops.nms import box_iou
    from tidyface.tasks import pipeline as pl

    _, _, d = next(pl.detect_stream([(0, image)], detector, **kw))
    if len(d):
        iou = box_iou(box[None].to(d.boxes), d.boxes)[0]
        if iou.max() >= 0.3:
            return d.select(iou.argmax().reshape(1)), True
    return orig, False


def masked_image(image: np.ndarray, points: torch.Tensor, shape: str) -> np.ndarray:
    from tidyface.ops.masks import draw_masks

    t = torch.from_numpy(image).permute(2, 0, 1)[None]
    return draw_masks(t, points[None].float(), shape)[0].permute(1, 2, 0).contiguous().numpy()


def geometries(encoder):
    from tidyface.tasks import pipeline as pl

    full = pl.encoder_geometry(encoder)
    upper = pl.encoder_geometry(encoder, region="upper")
    return {"plain": full, "upper": upper, "upper zero": pl.UpperFace(full, "zero"), "upper zoom": UpperZoom(full)}


def embed_faces(encoder, items, geo) -> torch.Tensor:
    """(N,D) embeddings of [(image, one-face Detections)] under geometry `geo`."""
    from tidyface.models.base import model_device
    from tidyface.tasks import pipeline as pl

    dev = model_device(encoder)
    crops = torch.cat([pl.align([pl.as_chw(im, dev)], d, geo).crops for im, d in items])
    return pl.encode(encoder, crops)


def masked_ref_embeddings(encoder, items) -> torch.Tensor:
    """(N,4,D): each face plain, then wearing each mask drawn on its aligned crop (--masked)."""
    from tidyface.models.base import model_device
    from tidyface.ops.masks import SHAPES
    from tidyface.tasks import pipeline as pl

    dev = model_device(encoder)
    geo = pl.encoder_geometry(encoder)
    out = []
    for im, d in items:
        faces = pl.align([pl.as_chw(im, dev)], d, geo)
        out.append(pl.encode(encoder, torch.cat([faces.crops, pl.masked_crops(faces, geo)])))
    return torch.stack(out)


# ----------------------------------------------------------------------------- deepface pairs

def pairs_data(detector, shapes):
    from tidyface.ops.image import read_image
    from tidyface.tasks import pipeline as pl

    rows = list(csv.DictReader(open(PAIRS / "master.csv")))
    files = sorted({r["file_x"] for r in rows} | {r["file_y"] for r in rows})
    photos, masked, refound = {}, {s: {} for s in shapes}, {s: 0 for s in shapes}
    for f in files:
        im = read_image(PAIRS / f)
        _, _, d = next(pl.detect_stream([(f, im)], detector))
        d = largest(d)
        photos[f] = (im, d)
        for s in shapes:
            m = masked_image(im, d.landmarks[0], s)
            md, ok = redetect(detector, m, d.boxes[0], d)
            masked[s][f] = (m, md)
            refound[s] += ok
    same = np.array([r["Decision"] == "Yes" for r in rows])
    return rows, files, photos, masked, refound, same


def pairs_auc(encoder, data, shapes) -> dict:
    rows, files, photos, masked, _, same = data
    geos = geometries(encoder)
    index = {f: i for i, f in enumerate(files)}
    x = [index[r["file_x"]] for r in rows]
    y = [index[r["file_y"]] for r in rows]
    ref = {m: embed_faces(encoder, [photos[f] for f in files], g) for m, g in geos.items()}
    ref_masked = masked_ref_embeddings(encoder, [photos[f] for f in files])
    out = {}
    for s in [None, *shapes]:
        src = photos if s is None else masked[s]
        probe = {m: embed_faces(encoder, [src[f] for f in files], g) for m, g in geos.items()}
        col = "unmasked" if s is None else s
        for m in METHODS:
            if m == "masked refs":
                sc = torch.einsum("nkd,nd->nk", ref_masked[x], probe["plain"][y]).amax(1)
            else:
                sc = (ref[m][x] * probe[m][y]).sum(1)
            out[(m, col)] = roc_auc_score(same, sc.numpy())
    return out


# ----------------------------------------------------------------------------- Video_2

def refs_dir(tmp: Path) -> Path:
    out = tmp / "refs"
    for p in sorted((VIDEO.parent / "database").glob("*.png")):
        d = out / p.stem.split("_", 1)[1]
        d.mkdir(parents=True)
        shutil.copy(p, d / p.name)
    return out


def video_data(detector, shapes):
    """The labelled faces of people (frame, box, person), their frames and detections, masked."""
    from tidyface.ops.nms import box_iou
    from tidyface.tasks import pipeline as pl

    truth = [r for r in csv.DictReader(l for l in open(TRUTH) if not l.startswith("#")) if r["person"] != "none"]
    wanted = {int(r["frame"]) for r in truth}
    frames, cap, k = {}, cv2.VideoCapture(str(VIDEO)), 0
    while len(frames) < len(wanted):
        ok, bgr = cap.read()
        if not ok:
            break
        if k in wanted:
            frames[k] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        k += 1
    cap.release()
    kw = dict(min_score=0.4, max_size=640)
    found = {f: next(pl.detect_stream([(f, im)], detector, **kw))[2] for f, im in frames.items()}
    faces, masked, refound = [], {s: [] for s in shapes}, {s: 0 for s in shapes}
    for r in truth:
        d = found[int(r["frame"])]
        if not len(d):
            continue
        iou = box_iou(torch.tensor([[float(r[c]) for c in ("x1", "y1", "x2", "y2")]]), d.boxes)[0]
        if iou.max() < 0.5:
            continue
        one = d.select(iou.argmax().reshape(1))
        im = frames[int(r["frame"])]
        faces.append((im, one, r["person"]))
        for s in shapes:
            m = masked_image(im, one.landmarks[0], s)
            md, ok = redetect(detector, m, one.boxes[0], one, **kw)
            masked[s].append((m, md))
            refound[s] += ok
    return faces, masked, refound, len(truth)


def video_accuracy(encoder, detector, data, shapes, refs: Path) -> dict:
    from tidyface.tasks import grouping as gp
    from tidyface.tasks import pipeline as pl

    faces, masked, _, _ = data
    truth = [p for _, _, p in faces]
    geos = geometries(encoder)
    refsets = {"plain": pl.reference_embeddings(refs, encoder, detector),
               "masked refs": pl.reference_embeddings(refs, encoder, detector, masked=True)}
    refsets["upper"] = pl.reference_embeddings(refs, encoder, detector, region="upper")
    for m in ("upper zero", "upper zoom"):  # the same faces under the geometries not in the library
        refsets[m] = _refs_with(encoder, detector, refs, geos[m])
    out = {}
    for s in [None, *shapes]:
        items = [(im, d) for im, d, _ in faces] if s is None else masked[s]
        col = "unmasked" if s is None else s
        for m in METHODS:
            probe = embed_faces(encoder, items, geos["plain" if m == "masked refs" else m])
            emb, labels = refsets[m]
            got = gp.classify(probe, emb, labels).labels
            out[(m, col)] = (sum(g == t for g, t in zip(got, truth)), len(truth))
    return out


def _refs_with(encoder, detector, refs: Path, geo):
    """reference_embeddings' faces (the largest of each database crop) under another geometry."""
    from tidyface.ops.image import read_image
    from tidyface.tasks import pipeline as pl

    items, labels = [], []
    for d in sorted(p for p in refs.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            im = read_image(f)
            _, _, det = next(pl.detect_stream([(f, im)], detector))
            if len(det):
                items.append((im, largest(det)))
                labels.append(d.name)
    return embed_faces(encoder, items, geo), labels


# ----------------------------------------------------------------------------- table

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", default="facenet_casia_tf,mobilefacenet,dlib_resnet")
    ap.add_argument("--skip-video", action="store_true")
    args = ap.parse_args()
    from tidyface.cache import default_cache
    from tidyface.ops.masks import SHAPES

    torch.set_grad_enabled(False)
    models = default_cache()
    detector = models.get("retinaface_mnet025", "cpu")
    t0 = time.time()
    pdata = pairs_data(detector, SHAPES)
    print(f"deepface: {len(pdata[1])} photos, masked faces refound by the detector: "
          f"{', '.join(f'{s} {n}/{len(pdata[1])}' for s, n in pdata[4].items())} ({time.time() - t0:.0f} s)",
          file=sys.stderr)
    vdata = None
    if not args.skip_video:
        vdata = video_data(detector, SHAPES)
        print(f"Video_2: {len(vdata[0])} of {vdata[3]} labelled faces found; masked refound: "
              f"{', '.join(f'{s} {n}/{len(vdata[0])}' for s, n in vdata[2].items())}", file=sys.stderr)
    cols = ["unmasked", *SHAPES]
    lines = ["| encoder | method | " + " | ".join(f"AUC {c}" for c in cols) + " | AUC masked mean | "
             + ("" if vdata is None else " | ".join(f"Video_2 {c}" for c in cols) + " | Video_2 masked |"),
             "|---|---|" + "---|" * (len(cols) + 1) + ("" if vdata is None else "---|" * (len(cols) + 1))]
    with tempfile.TemporaryDirectory() as tmp:
        refs = refs_dir(Path(tmp)) if vdata is not None else None
        for name in args.encoders.split(","):
            t = time.time()
            encoder = models.get(name, "cpu")
            auc = pairs_auc(encoder, pdata, SHAPES)
            acc = video_accuracy(encoder, detector, vdata, SHAPES, refs) if vdata is not None else None
            for m in METHODS:
                cells = [f"{auc[(m, c)]:.4f}" for c in cols] + [f"{np.mean([auc[(m, s)] for s in SHAPES]):.4f}"]
                if acc is not None:
                    cells += [f"{acc[(m, c)][0]}/{acc[(m, c)][1]}" for c in cols]
                    cells.append(f"{sum(acc[(m, s)][0] for s in SHAPES)}/{sum(acc[(m, s)][1] for s in SHAPES)}")
                lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
            print("\n".join(lines), flush=True)  # the table so far: each encoder's rows as they come
            lines = lines[:2]
            print(f"{name}: {time.time() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
