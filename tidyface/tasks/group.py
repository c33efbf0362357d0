"""`tidyface group`: faces of a photo collection (or a folder of face crops) sorted by person.

Faces are detected, aligned and embedded once; each face's picture goes to a staging folder as
it is found, so memory stays flat, and is moved into its group's folder after grouping.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..ops.align import template_for, umeyama, warp
from ..ops.image import IMAGE_EXTS, atomic_write_bytes, expand_paths, read_image, write_image
from . import dedup as dd
from . import grouping as gp
from .common import read_ahead, warn
from .detect import DEFAULT_DETECTOR
from .embed import DEFAULT_ENCODER, embed_crops, embed_images

VIEW_SIZE = 256  # side of the aligned face pictures written into the group folders
VIEW_FACE_FACTOR = 0.5  # a little hair and chin around the face (see ops.align.template_for)
MANIFEST = "groups.csv"
LOG = "group_log.csv"
DUPES = "_duplicates"


class OutputExistsError(RuntimeError):
    pass


@dataclass
class FaceRecord:
    file: str  # the picture's name inside its group folder
    source: str
    face_index: int
    quality: float  # face area x sharpness: which face of a duplicate set is kept
    ahash: int  # 64-bit average hash of the picture, for the first dedup pass


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    """Atomic CSV write (temp + rename) so a crash never leaves half a manifest."""
    buf = io.StringIO()
    fields = list(fields or (rows[0].keys() if rows else []))
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def prepare_out(out: Path, overwrite: bool) -> None:
    """An empty output folder, or a refusal: results of two runs are never mixed."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} already holds files; choose another --out or pass "
                                    f"--overwrite to replace an earlier tidyface group result there")
        if not (out / MANIFEST).is_file():
            raise OutputExistsError(f"{out} holds files that are not a tidyface group result; "
                                    f"--overwrite only replaces a folder with a {MANIFEST}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def flat_name(path: Path, root: Path) -> str:
    """A file name unique within the collection: sub/dir/a.jpg -> sub__dir__a."""
    rel = path.resolve().relative_to(root) if root in path.resolve().parents else Path(path.name)
    return "__".join(rel.with_suffix("").parts)


def view_crops(images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Upright pictures of faces for people to look at (aligned, VIEW_SIZE square)."""
    dst = template_for(VIEW_SIZE, "arcface", VIEW_FACE_FACTOR).to(images.device)
    mats = umeyama(landmarks.to(images.device, torch.float64), dst)
    return warp(images, mats, None, (VIEW_SIZE, VIEW_SIZE), padding="replicate")


def collect_photo_faces(files: list[Path], root: Path, stage: Path, model, det_model, min_score,
                        device, batch_size, enc_area, weights_dir):
    """Detect + embed every face; write each face's picture into `stage`. -> records, embeddings."""
    from tqdm import tqdm

    records, embs, failed = [], [], 0

    def readable():
        nonlocal failed
        for p, im in read_ahead(files):
            if isinstance(im, Exception):
                failed += 1
                warn(str(im))
            else:
                yield p, im

    bar = tqdm(total=len(files), unit="img", desc="faces", file=sys.stderr, disable=None)
    for p, img, faces, e in embed_images(readable(), model, det_model, min_score, device, batch_size,
                                         enc_area=enc_area, weights_dir=weights_dir):
        bar.update(1)
        if faces is None:
            continue
        t = torch.from_numpy(img).permute(2, 0, 1)[None]  # uint8: warp reads only the faces
        views = view_crops(t, faces.detections.landmarks.cpu()).round().clamp(0, 255).to(torch.uint8)
        boxes = faces.detections.boxes.cpu()
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1)
        quality = area * (dd.sharpness(views) + 1)
        hashes = dd.average_hash(views).tolist()
        stem = flat_name(p, root)
        for k in range(len(faces)):
            name = f"{stem}_{k}.jpg"
            write_image(stage / name, views[k].permute(1, 2, 0).numpy())
            records.append(FaceRecord(name, str(p), k, float(quality[k]), hashes[k]))
        embs.append(e)
        bar.set_postfix(faces=len(records))
    bar.close()
    return records, (torch.cat(embs) if embs else torch.zeros(0, 1)), failed


def collect_crops(files: list[Path], root: Path, stage: Path, model, device, batch_size, enc_area,
                  weights_dir):
    """Face crops as given: each file is one face, copied as it is."""
    records, images, failed = [], [], 0
    for p, im in read_ahead(files):
        if isinstance(im, Exception):
            failed += 1
            warn(str(im))
            continue
        name = flat_name(p, root) + p.suffix.lower()
        shutil.copyfile(p, stage / name)
        g = torch.from_numpy(im).permute(2, 0, 1)[None]
        quality = im.shape[0] * im.shape[1] * (float(dd.sharpness(g)[0]) + 1)
        records.append(FaceRecord(name, str(p), 0, quality, int(dd.average_hash(g)[0])))
        images.append(im)
    emb = embed_crops(images, model, device, batch_size, enc_area, weights_dir)
    return records, emb, failed


def reference_embeddings(ref_dir: Path, model, det_model, min_score, device, enc_area, weights_dir):
    """One embedding per reference image (its largest face; the whole image if no face is
    found, i.e. the reference is already a crop), labelled by its subfolder."""
    classes = sorted(d for d in ref_dir.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{ref_dir}: no class subfolders; --ref-dir needs one folder per person "
                         f"holding one or more reference images")
    items = [(c.name, p) for c in classes for p in expand_paths([c])]
    labels, embs, crops = [], [], []
    images = []
    for label, p in items:
        try:
            images.append((label, p, read_image(p)))
        except Exception as e:
            warn(str(e))
    for (label, p), img, faces, e in embed_images((((lb, p), im) for lb, p, im in images), model, det_model,
                                                  min_score, device, weights_dir=weights_dir, enc_area=enc_area):
        if faces is None:
            crops.append((label, img))
            continue
        b = faces.detections.boxes
        labels.append(label)
        embs.append(e[int(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax())][None])
    if crops:
        labels += [lb for lb, _ in crops]
        embs.append(embed_crops([im for _, im in crops], model, device, enc_area=enc_area,
                                weights_dir=weights_dir))
    missing = {c.name for c in classes} - set(labels)
    if missing:
        raise ValueError(f"{ref_dir}: no readable reference image in {', '.join(sorted(missing))}")
    return torch.cat(embs), labels


def place(stage: Path, out: Path, name: str, group: str, move: bool) -> None:
    (out / group).mkdir(parents=True, exist_ok=True)
    if move:
        os.replace(stage / name, out / group / name)
    else:
        try:
            os.link(stage / name, out / group / name)  # cheap extra copies for every k
        except OSError:
            shutil.copyfile(stage / name, out / group / name)


@dataclass
class GroupResult:
    out: Path
    records: list[FaceRecord]
    grouping: gp.Grouping | None
    dropped: int
    failed: int


def run_group(path: str, out: str, mode: str = "auto", clusters="2-9", clusters_save_all: bool = False,
              random_state: int = 0, ref_dir: str | None = None, enc_oth_thr: float = -1,
              auto_thr: float | None = None, cropped: bool = False, model: str = DEFAULT_ENCODER,
              det_model: str = DEFAULT_DETECTOR, min_score=None, hash_thr: int = -1,
              enc_dup_thr: float = -1, enc_area=None, group_log: bool = False, device=None,
              batch_size: int = 32, overwrite: bool = False, weights_dir=None) -> GroupResult:
    """Group the faces under `path` by person into `out`; see `tidyface group --help`."""
    t0 = time.time()
    if mode not in ("cluster", "auto", "classify"):
        raise ValueError(f"--mode must be cluster, auto or classify, got {mode!r}")
    if mode == "classify" and not ref_dir:
        raise ValueError("--mode classify needs --ref-dir (one subfolder of reference images per person)")
    if mode == "cluster":
        gp.parse_clusters(clusters)  # fail on a bad spec before any work
    src, out = Path(path), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    files = [p for p in expand_paths([src]) if p.suffix.lower() in IMAGE_EXTS]
    root = src.resolve() if src.is_dir() else src.resolve().parent
    # weights first: a run that cannot get them must not leave a half-made output folder
    from .common import cached_model, resolve_device

    dev = resolve_device(device)
    for name in (model,) if cropped else (model, det_model):
        cached_model(name, dev, weights_dir)
    prepare_out(out, overwrite)
    stage = out / ".staging"
    stage.mkdir()
    if cropped:
        records, emb, failed = collect_crops(files, root, stage, model, device, batch_size, enc_area, weights_dir)
    else:
        records, emb, failed = collect_photo_faces(files, root, stage, model, det_model, min_score, device,
                                                   batch_size, enc_area, weights_dir)
    # Dedup: the cheap hash pass first, then embeddings over what survived it.
    keep = np.ones(len(records), bool)
    rows_dupes = []
    quality = np.array([r.quality for r in records])
    names = [r.file for r in records]
    if len(records) and hash_thr != -1:
        res = dd.hash_duplicates(torch.tensor([r.ahash for r in records]), quality, hash_thr)
        keep &= res.keep
        rows_dupes += dd.dedup_log_rows(res, names)
    if keep.any() and enc_dup_thr != -1:
        idx = np.flatnonzero(keep)
        res = dd.embedding_duplicates(emb[idx], quality[idx], enc_dup_thr)
        keep[idx[~res.keep]] = False
        rows_dupes += dd.dedup_log_rows(res, [names[i] for i in idx])
    kept = np.flatnonzero(keep)
    for i in np.flatnonzero(~keep):
        place(stage, out, records[i].file, DUPES, move=True)

    grouping = None
    if len(kept) == 0:
        print(f"tidyface: no faces found in {src}; {out} holds an empty {MANIFEST}", file=sys.stderr)
    else:
        e = emb[kept]
        if mode == "cluster":
            grouping = gp.cluster(e, clusters, random_state=random_state, save_all=clusters_save_all)
        elif mode == "auto":
            if auto_thr is None:
                auto_thr = cached_model(model, dev, weights_dir).spec.preprocess.get("auto_threshold", gp.AUTO_THRESHOLD)
            grouping = gp.auto(e, auto_thr)
        else:
            ref_emb, ref_labels = reference_embeddings(Path(ref_dir), model, det_model, min_score, device,
                                                       enc_area, weights_dir)
            grouping = gp.classify(e, ref_emb, ref_labels, enc_oth_thr)
        if grouping.note:
            print(f"tidyface: {grouping.note}", file=sys.stderr)
        if clusters_save_all and mode == "cluster":
            for k, labels in grouping.details.get("labels_per_k", {}).items():
                for j, i in enumerate(kept):
                    place(stage, out / f"G{k}", records[i].file, labels[j], move=False)
        for j, i in enumerate(kept):
            place(stage, out, records[i].file, grouping.labels[j], move=True)
    shutil.rmtree(stage)

    rows = [{"file": f"{grouping.labels[j]}/{records[i].file}", "source": records[i].source,
             "face_index": records[i].face_index, "group": grouping.labels[j],
             "distance": f"{grouping.distance[j]:.4f}"} for j, i in enumerate(kept)] if grouping else []
    by_file = {d["name"]: d for d in rows_dupes}
    rows += [{"file": f"{DUPES}/{records[i].file}", "source": records[i].source,
              "face_index": records[i].face_index, "group": "duplicate",
              "distance": f"{by_file[records[i].file]['distance']:.4f}" if records[i].file in by_file else ""}
             for i in np.flatnonzero(~keep)]
    write_csv(out / MANIFEST, rows, ["file", "source", "face_index", "group", "distance"])
    if group_log and grouping is not None:
        write_csv(out / LOG, gp.grouping_log_rows(grouping, [records[i].file for i in kept]))
    if group_log and rows_dupes:
        write_csv(out / "dedup_log.csv", rows_dupes)
    sizes = {} if grouping is None else {g: len(v) for g, v in grouping.groups().items()}
    print(f"tidyface: {len(files)} images, {len(records)} faces ({len(records) - len(kept)} duplicates), "
          f"{failed} unreadable; groups: " + (", ".join(f"{g}={n}" for g, n in sizes.items()) or "none")
          + f"; {time.time() - t0:.1f} s -> {out}", file=sys.stderr)
    return GroupResult(out, records, grouping, int((~keep).sum()), failed)
