"""`tidyface group`: faces of a photo collection (or a folder of face crops) sorted by person.

source (photos, or crops) -> detect -> align -> embed -> describe -> dedup -> group -> sink
(the face pictures in one folder per group, groups.csv, and the face table in .tidyface/).
Each face's picture goes to a staging folder as it is found, so memory stays flat, and is moved
into its group's folder after grouping.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..cache import ModelCache
from ..errors import InputError
from ..models.base import model_device
from ..ops.align import template_for
from ..ops.image import IMAGE_EXTS, atomic_write_bytes, expand_paths, write_image
from ..options import GroupCommandOptions
from ..types import Detections, Faces, FaceTable
from . import dedup as dd
from . import grouping as gp
from . import pipeline as pl
from .common import load_models, readable
from .embed import embed_images
from .outdir import OutputFolder

VIEW_SIZE = 256  # side of the aligned face pictures written into the group folders
VIEW_FACE_FACTOR = 0.5  # a little hair and chin around the face (see ops.align.template_for)
MANIFEST = "groups.csv"
LOG = "group_log.csv"
DUPES = "_duplicates"
TABLE = Path(".tidyface") / "faces.npz"
VIEW = pl.Alignment((VIEW_SIZE, VIEW_SIZE), template_for(VIEW_SIZE, "arcface", VIEW_FACE_FACTOR))


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    """Atomic CSV write (temp + rename) so a crash never leaves half a manifest."""
    buf = io.StringIO()
    fields = list(fields or (rows[0].keys() if rows else []))
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def flat_names(files: Sequence[Path], root: Path) -> dict[Path, str]:
    """A picture name per input, unique within the collection: sub/dir/a.jpg -> sub__dir__a
    (a.jpg and a.png in one folder keep their extension: a.jpg, a.png)."""
    from .crop import output_stems

    return {f: stem.replace("/", "__") for f, stem in output_stems(files, root).items()}


def _write_views(views: Faces, stage: Path, stem: str) -> list[str]:
    pixels = pl.to_uint8(views.crops).permute(0, 2, 3, 1).cpu().numpy()
    names = [f"{stem}_{k}.jpg" for k in range(len(views))]
    for name, p in zip(names, pixels):
        write_image(stage / name, p)
    return names


def collect_photo_faces(files: list[Path], names: dict[Path, str], stage: Path, encoder, detector,
                        o: GroupCommandOptions) -> tuple[FaceTable, int]:
    """detect -> align -> embed every face; an upright picture of each (VIEW) goes to `stage`
    and is what dedup measures. -> the face table, the number of unreadable files."""
    from tqdm import tqdm

    parts, failed = [], []
    bar = tqdm(total=len(files), unit="img", desc="faces", file=sys.stderr, disable=None)
    for path, img, faces in embed_images(readable(files, failed), encoder, detector, min_score=o.det_min_score,
                                         batch_size=o.batch_size, area=o.enc_area, region=o.enc_region):
        bar.update(1)
        if len(faces) == 0:
            continue
        views = pl.describe(pl.align([pl.as_chw(img)], faces.detections.to("cpu"), VIEW))
        pictures = _write_views(views, stage, names[path])
        views = replace(views, embeddings=faces.embeddings.cpu())
        parts.append(FaceTable.from_faces(views, name=pictures, source=[str(path)] * len(views)))
        bar.set_postfix(faces=sum(map(len, parts)))
    bar.close()
    return FaceTable.cat(parts) if parts else FaceTable.empty(encoder.spec.meta.embedding_dim), len(failed)


def collect_crops(files: list[Path], names: dict[Path, str], stage: Path, encoder, o: GroupCommandOptions
                  ) -> tuple[FaceTable, int]:
    """Face crops as given: each file is one face (its whole image the face box), copied as it is."""
    parts, failed, crops = [], [], []
    dev = model_device(encoder)
    geometry = pl.BoxArea(tuple(encoder.spec.meta.input_size), o.enc_area or (0.0, 0.0, 1.0, 1.0))
    for path, im in readable(files, failed):
        name = names[path] + path.suffix.lower()
        shutil.copyfile(path, stage / name)
        h, w = im.shape[:2]
        whole = Detections(torch.tensor([[0.0, 0.0, w, h]]), torch.ones(1), None, torch.zeros(1, dtype=torch.long))
        face = pl.describe(Faces(pl.as_chw(im)[None], torch.eye(3, dtype=torch.float64)[None], whole))
        crops.append(pl.align([pl.as_chw(im, dev)], whole, geometry).crops)
        parts.append(FaceTable.from_faces(face, name=[name], source=[str(path)]))
    dim = encoder.spec.meta.embedding_dim
    if not parts:
        return FaceTable.empty(dim), len(failed)
    table = FaceTable.cat(parts)
    table.embeddings = pl.encode(encoder, torch.cat(crops), o.batch_size).cpu().numpy()
    return table, len(failed)


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
    table: FaceTable  # every face; name: its picture under out
    grouping: gp.Grouping | None
    dropped: int
    failed: int
    images: int = 0


def _group_kept(table: FaceTable, kept: np.ndarray, o: GroupCommandOptions, encoder, detector) -> gp.Grouping:
    def references():
        return pl.reference_embeddings(Path(o.ref_dir), encoder, detector, min_score=o.det_min_score,
                                       area=o.enc_area, region=o.enc_region, masked=o.masked)

    grouping = pl.group(torch.from_numpy(table.embeddings[kept]), o.grouping(o.mode), encoder.spec, references)
    if grouping.note:
        print(f"tidyface: {grouping.note}", file=sys.stderr)
    return grouping


def _sink(out: Path, stage: Path, table: FaceTable, keep: np.ndarray, grouping, o) -> list[dict]:
    """Move every picture into its group's folder (duplicates into _duplicates/); the rows of
    groups.csv. table.name becomes each picture's path under out."""
    kept, rows = np.flatnonzero(keep), []
    labels = dict(zip(kept.tolist(), grouping.labels)) if grouping else {}
    if grouping is not None and o.clusters_save_all and o.mode == "cluster":
        for k, per_k in grouping.details.get("labels_per_k", {}).items():
            for j, i in enumerate(kept):
                place(stage, out / f"G{k}", table.name[i], per_k[j], move=False)
    for i in range(len(table)):
        group = labels.get(i, DUPES)
        place(stage, out, table.name[i], group, move=True)
        table.name[i] = f"{group}/{table.name[i]}"
        if i in labels:
            j = int(np.searchsorted(kept, i))
            rows.append({"file": table.name[i], "source": table.source[i], "face_index": int(table.face_index[i]),
                         "group": group, "distance": f"{grouping.distance[j]:.4f}"})
    return rows


def run_group(path: str | None = None, out: str | None = None, *, options: GroupCommandOptions | None = None,
              models: ModelCache | None = None, **flags) -> GroupResult:
    """Group the faces under `path` by person into `out` (flags: the fields of
    GroupCommandOptions, or `options` whole; see `tidyface group --help`)."""
    o = options or GroupCommandOptions(path=path, out=out, **flags)
    src = Path(o.path)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    with OutputFolder(o.out, "group", [src]) as folder:
        files = [p for p in expand_paths([src]) if p.suffix.lower() in IMAGE_EXTS]
        names = (o.enc_model,) if o.cropped and o.mode != "classify" else (o.enc_model, o.det_model)
        encoder, *rest = load_models(models, o.device, o.weights_dir, *names, precision=o.precision)
        folder.claim(o.overwrite, others_files=False)
        return _group_into(folder, files, src, o, encoder, rest[0] if rest else None)


def _group_into(folder: OutputFolder, files: list[Path], src: Path, o: GroupCommandOptions, encoder,
                detector) -> GroupResult:
    t0, out = time.time(), folder.path
    stage = out / ".staging"
    folder.record([stage.name])  # an interrupted run leaves it: --overwrite removes it
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    names = flat_names(files, src.resolve() if src.is_dir() else src.resolve().parent)
    if o.cropped:
        table, failed = collect_crops(files, names, stage, encoder, o)
    else:
        table, failed = collect_photo_faces(files, names, stage, encoder, detector, o)
    outcome = pl.dedup(table, o.hash_thr, o.enc_dup_thr, confirm_thr=dd.hash_confirm_threshold(encoder.spec))
    kept = np.flatnonzero(outcome.keep)
    grouping = _group_kept(table, kept, o, encoder, detector) if len(kept) else None
    if grouping is None:
        print(f"tidyface: no faces found in {src}; {out} holds an empty {MANIFEST}", file=sys.stderr)
    log_names = [table.name[i] for i in kept]
    folder.record({str(Path(n).parts[0]) for n in _destinations(table, outcome.keep, grouping, o)}
                  | {MANIFEST, LOG, "dedup_log.csv"})
    rows = _sink(out, stage, table, outcome.keep, grouping, o)
    shutil.rmtree(stage)
    _write_records(out, table, outcome, rows, grouping, log_names, o.group_log)
    sizes = {} if grouping is None else {g: len(v) for g, v in grouping.groups().items()}
    print(f"tidyface: {len(files)} images, {len(table)} faces ({len(table) - len(kept)} duplicates), "
          f"{failed} unreadable; groups: " + (", ".join(f"{g}={n}" for g, n in sizes.items()) or "none")
          + f"; {time.time() - t0:.1f} s -> {out}", file=sys.stderr)
    return GroupResult(out, table, grouping, int((~outcome.keep).sum()), failed, len(files))


def _destinations(table: FaceTable, keep: np.ndarray, grouping, o) -> list[str]:
    """The top-level folders the pictures go to (recorded before they are moved there)."""
    groups = set(grouping.labels) if grouping is not None else set()
    if grouping is not None and o.clusters_save_all and o.mode == "cluster":
        groups |= {f"G{k}" for k in grouping.details.get("labels_per_k", {})}
    return sorted(groups | ({DUPES} if (~keep).any() else set()))


def _write_records(out: Path, table: FaceTable, outcome: pl.DedupOutcome, rows: list[dict], grouping,
                   log_names: list[str], group_log: bool) -> None:
    """groups.csv (duplicates listed with their distance to the face kept), the face table, logs."""
    dupe_rows = [r for p in sorted(outcome.logs) for r in outcome.logs[p]]
    distance = {f"{DUPES}/{r['name']}": r["distance"] for r in dupe_rows}
    for i in np.flatnonzero(~outcome.keep):
        d = distance.get(table.name[i])
        rows.append({"file": table.name[i], "source": table.source[i], "face_index": int(table.face_index[i]),
                     "group": "duplicate", "distance": "" if d is None else f"{d:.4f}"})
    write_csv(out / MANIFEST, rows, ["file", "source", "face_index", "group", "distance"])
    table.save(out / TABLE)
    if group_log and grouping is not None:
        write_csv(out / LOG, gp.grouping_log_rows(grouping, log_names))
    if group_log and dupe_rows:
        write_csv(out / "dedup_log.csv", dupe_rows)
