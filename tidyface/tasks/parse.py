"""Face parsing: per face, the class map of the parser on the face's own aligned crop, and with
--in-image the classes of every face moved back into the original image's pixels.

detect -> align (pipeline.parser_geometry: the crops the parser was trained on) -> parse ->
write class maps (PNG of class ids), optionally their colour pictures, and parse.json (each map's
source, face index, box and image -> crop matrix, as crops.json does).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..cache import ModelCache, resolve_device
from ..errors import UsageError
from ..ops.align import invert, warp_labels
from ..ops.image import as_rgb_uint8, atomic_write_bytes, image_list, write_image
from ..options import ParseOptions
from ..types import Faces
from . import pipeline as pl
from .common import load_models, progress, readable
from .outdir import OutputFolder

MANIFEST = "parse.json"
# One colour per CelebAMask-HQ class (0 background black), distinct on skin and hair.
PALETTE = np.array([
    (0, 0, 0), (204, 153, 102), (255, 85, 0), (255, 170, 0), (0, 255, 0), (0, 170, 0), (0, 255, 255),
    (255, 0, 170), (170, 0, 255), (255, 255, 0), (0, 85, 255), (255, 0, 0), (255, 0, 85), (170, 0, 51),
    (102, 153, 51), (0, 255, 170), (0, 51, 153), (85, 51, 0), (255, 255, 170)], np.uint8)


def colour(labels: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """A class map as a colour picture (RGB), blended half over `image` when given."""
    pic = PALETTE[np.minimum(labels, len(PALETTE) - 1)]
    if image is None:
        return pic
    return ((image.astype(np.uint16) + pic) // 2).astype(np.uint8)


def in_image(faces: Faces, image_index: int, size: tuple[int, int]) -> Tensor:
    """(H,W) uint8: the class maps of one image's faces moved into its pixels (size (W, H));
    where faces overlap the smaller face, usually the nearer one's edge, is taken on top."""
    rows = (faces.image_index == image_index).nonzero().flatten()
    if len(rows) == 0:
        return torch.zeros(size[1], size[0], dtype=torch.uint8)
    boxes = faces.detections.boxes[rows]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    rows = rows[area.argsort()]  # smallest first: the first face labelling a pixel wins
    maps = warp_labels(faces.masks[rows], invert(faces.crop_mat[rows].to(torch.float64)), size)
    first = (maps > 0).to(torch.uint8).argmax(0)
    return maps.gather(0, first[None])[0]


def _parsing_cropper(parser, det_model: str, det_threshold, device, models, batch_size: int = 8,
                     weights_dir=None, precision: str = "float32"):
    """A Cropper that cuts the parser's own crops (parser_geometry: FFHQ framing at its input
    size) and parses each batch of them (Faces.masks)."""
    from .crop import Cropper

    return Cropper(pl.parser_geometry(parser).size, template="ffhq", det_model=det_model,
                   det_threshold=det_threshold, device=device, precision=precision, batch_size=batch_size,
                   weights_dir=weights_dir,
                   padding="replicate", post=[lambda f: pl.parse(parser, f)], models=models)


def parse(images, det_model: str = "retinaface_mnet025", parse_model: str = "bisenet_celebamask",
          device=None, det_threshold: float | None = None, models: ModelCache | None = None,
          precision: str = "float32") -> Faces:
    """Parse the faces of in-memory images (a path, numpy RGB array, PIL image or tensor, or a
    list): Faces whose crops are the parser's aligned crops and whose masks are their (N,h,w)
    uint8 class maps (ids: the parser's spec.meta.class_names); image_index indexes `images`."""
    items, single = image_list(images)
    dev = resolve_device(device)
    (parser,) = load_models(models, dev, None, parse_model, precision=precision)
    cropper = _parsing_cropper(parser, det_model, det_threshold, dev, models, precision=precision)
    return cropper.crop([as_rgb_uint8(im, "image" if single else f"images[{i}]") for i, im in enumerate(items)])


def run_parse(paths: Sequence[str], o: ParseOptions, models: ModelCache | None = None) -> int:
    """The `tidyface parse` command; returns the exit code (1: some images unreadable)."""
    from .crop import output_stems, plan_inputs

    if not paths:
        raise UsageError("give at least one image, folder or .txt list")
    folder = OutputFolder(o.out, "parse", paths)
    folder.check()
    files, root = plan_inputs(paths, exclude=Path(o.out))
    if not files:
        raise UsageError("no images found in " + ", ".join(map(str, paths)))
    dev = resolve_device(o.device)
    (parser,) = load_models(models, dev, o.weights_dir, o.parse_model, precision=o.precision)
    load_models(models, dev, o.weights_dir, o.det_model, precision=o.precision)
    cropper = _parsing_cropper(parser, o.det_model, o.det_threshold, dev, models, o.batch_size, o.weights_dir,
                               o.precision)
    stems, failed, records = output_stems(files, root), [], {}
    with folder, progress(len(files), "img", "parse") as bar:
        folder.claim(o.overwrite, resume=False)
        folder.record([MANIFEST])
        images = {}

        def frames():
            for path, image in readable(files, failed):
                images[path] = image
                yield path, image

        for batch in cropper.batches(cropper.detected(frames())):
            _write_batch(batch, stems, images, o, folder, records)
            for key in batch.keys:
                images.pop(key, None)
            bar.update(len(batch.keys))
        atomic_write_bytes(folder.path / MANIFEST, json.dumps(records, indent=1).encode())
    print(f"tidyface: {len(records)} faces parsed from {len(files) - len(failed)} images into {o.out}"
          + (f"; {len(failed)} unreadable" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _write_batch(batch, stems: dict, images: dict, o: ParseOptions, folder: OutputFolder, records: dict) -> None:
    from .crop import _records

    f = batch.faces
    maps = f.masks.cpu().numpy()
    crops = pl.to_uint8(f.crops).permute(0, 2, 3, 1).cpu().numpy() if o.color else None
    for k, rec in enumerate(_records(batch, folder.path)):
        key = batch.keys[int(f.image_index[k])]
        name = f"{stems[key]}_{rec['face_index']}.png"
        _write(folder, name, maps[k])
        if o.color:
            _write(folder, name.replace(".png", "_color.png"), colour(maps[k], crops[k]))
        records[name] = rec
    if o.in_image:
        for i, key in enumerate(batch.keys):
            w, h = batch.image_sizes[i]
            labels = in_image(f, i, (w, h)).cpu().numpy()
            _write(folder, f"{stems[key]}_classes.png", labels)
            if o.color:
                _write(folder, f"{stems[key]}_classes_color.png", colour(labels, images.get(key)))


def _write(folder: OutputFolder, name: str, pixels: np.ndarray) -> None:
    path = folder.path / name
    top = Path(name).parts[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    folder.record([top])
    write_image(path, pixels)
