"""`tidyface embed`: detect -> align onto the encoder's template -> embed, one table row per face."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..cache import ModelCache
from ..errors import OutputError, UsageError
from ..models.base import model_device
from ..ops.image import expand_paths
from ..options import EmbedOptions, parse_area
from ..types import Faces, FaceTable
from . import pipeline as pl
from .common import load_models, progress, readable, warn
from .outdir import OutputFolder

DEFAULT_ENCODER = "facenet_casia_tf"


def embed_images(items: Iterable[tuple[object, np.ndarray]], encoder, detector, *, min_score=None,
                 batch_size: int = 32, det_batch_size: int = 8, area=None, region: str = "full"
                 ) -> Iterator[tuple[object, np.ndarray, Faces]]:
    """detect -> align -> embed over (key, RGB image) items (region: pl.encoder_geometry's).
    Yields (key, image, Faces with embeddings, on the encoder's device) per image, in input order."""
    geometry = pl.encoder_geometry(encoder, area, region)
    dev = model_device(encoder)
    for key, img, dets in pl.detect_stream(items, detector, min_score=min_score, batch_size=det_batch_size):
        faces = pl.align([pl.as_chw(img, dev)], dets, geometry)  # 8-bit: the warp reads only the faces
        yield key, img, pl.embed(encoder, faces, batch_size)


def embed(paths: Sequence[str | os.PathLike], model: str = DEFAULT_ENCODER, det_model: str = "retinaface_mnet025",
          min_score=None, device=None, batch_size: int = 32, enc_area=None, weights_dir=None,
          models: ModelCache | None = None, failed: list | None = None, enc_region: str = "full",
          precision: str = "float32") -> FaceTable:
    """Embed every face in images, folders (recursive) and .txt lists; unreadable files are
    warned about, skipped (and appended to `failed`). Returns the FaceTable (one row per face)."""
    encoder, detector = load_models(models, device, weights_dir, model, det_model, precision=precision)
    files = list(expand_paths(paths))
    parts = []
    with progress(len(files), "img", "embed") as bar:
        for path, _, faces in embed_images(readable(files, failed), encoder, detector, min_score=min_score,
                                           batch_size=batch_size, area=parse_area(enc_area),
                                           region=enc_region):
            parts.append(FaceTable.from_faces(faces, source=[str(path)] * len(faces)))
            bar.update(1)
    dim = encoder.spec.meta.embedding_dim
    return FaceTable.cat(parts) if parts else FaceTable.empty(dim)


def run_embed(paths: Sequence[str], o: EmbedOptions, models: ModelCache | None = None) -> int:
    """The `tidyface embed` command: the table goes to o.out (.npz, written atomically). Exit
    code 1 when some images were unreadable or none were found."""
    if not paths:
        raise UsageError("usage: tidyface embed PATH... --out FILE.npz")
    out = Path(o.out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; name the .npz file to write, e.g. {out / 'faces.npz'}")
    OutputFolder(out.parent, "embed", [], "--out").check()  # writable, before any work
    if not list(expand_paths(paths)):
        warn("no images found in " + ", ".join(map(str, paths)))
        return 1
    failed: list[Path] = []
    table = embed(paths, o.model, o.det_model, o.min_score, o.device, o.batch_size, o.enc_area,
                  o.weights_dir, models, failed, o.enc_region, o.precision)
    table.save(out)
    print(f"tidyface: {len(table)} faces from {len(set(table.source.tolist()))} images -> {out}"
          + (f"; {len(failed)} unreadable" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
