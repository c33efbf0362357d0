"""`tidyface enhance`: images through a super-resolution model, whole (in overlapping tiles, so
memory is bounded by the tile), or only their faces: each face aligned to the model's template,
enhanced, and pasted back with a feathered edge through its crop matrix over the rest of the
image, which is upscaled by plain resizing or by another model.

Both are arrangements of the steps: detect -> align -> enhance -> paste back.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..cache import ModelCache, resolve_device
from ..errors import UsageError
from ..models.base import model_device
from ..ops.align import scale_matrix, template_for
from ..ops.image import as_rgb_uint8, image_list, write_image
from ..ops.tiles import enhance_tiled
from ..options import EnhanceOptions
from ..types import Detections
from . import pipeline as pl
from .common import load_models, progress, readable
from .outdir import OutputFolder

FACE_CROP = 512  # output side of a face enhanced by a model with no input size of its own


def resize(image: np.ndarray, scale: float) -> np.ndarray:
    """Plain resizing by `scale` (bicubic up, area down)."""
    import cv2

    if scale == 1:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)


def enhance_whole(model, image: np.ndarray, tile: int = 256, overlap: int = 24, batch: int = 4) -> np.ndarray:
    """An RGB uint8 image (h,w,3) through `model` in tile x tile windows (0: whole) -> (sh,sw,3)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(model_device(model))
    h, w = image.shape[:2]
    out = enhance_tiled(model, x, tile or max(h, w), overlap, batch)
    return out[0].permute(1, 2, 0).cpu().numpy()


def face_geometry(model) -> pl.Alignment:
    """The crops a face model enhances: its own input size and template (a restorer such as
    GFPGAN: FFHQ 512), or for a super-resolution model crops that come out FACE_CROP wide."""
    meta = model.spec.meta
    side = tuple(meta.input_size) if meta.input_size else (max(1, FACE_CROP // (meta.scale or 1)),) * 2
    return pl.Alignment(side, template_for(side, meta.template or "ffhq", meta.face_factor))


@torch.inference_mode()
def enhance_faces(model, image: np.ndarray, dets: Detections, background: np.ndarray,
                  feather: float = 0.1, batch_size: int = 4) -> np.ndarray:
    """Each face of `image` (RGB uint8) aligned to the model's crops, enhanced in batches, and
    pasted over `background` (the image already upscaled to its output size) with a feathered
    edge. The paste matrix is output pixels -> enhanced crop pixels."""
    from .crop import paste_back

    if not len(dets):
        return background
    dev = model_device(model)
    geometry = face_geometry(model)
    faces = pl.align([pl.as_chw(image, dev)], dets.to(dev), geometry)
    crops = pl.to_uint8(faces.crops)
    done = torch.cat([model.enhance(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)])
    s = done.shape[-1] / crops.shape[-1]  # the model's scale
    u = background.shape[1] / image.shape[1]  # the output's
    mats = scale_matrix(s) @ faces.crop_mat.cpu().to(torch.float64) @ scale_matrix(1 / u)
    return paste_back(background, done.round().clamp(0, 255).to(torch.uint8).cpu(), mats, feather)


class ImageEnhancer:
    """The models of one enhance run, and the arrangement of steps per image."""

    def __init__(self, o: EnhanceOptions, models: ModelCache | None = None):
        self.o = o
        dev = resolve_device(o.device)
        (self.model,) = load_models(models, dev, o.weights_dir, o.model, precision=o.precision)
        self.background = None
        self.detector = None
        if o.faces_only:
            self.detector, = load_models(models, dev, o.weights_dir, o.det_model, precision=o.precision)
            if o.background != "resize":
                (self.background,) = load_models(models, dev, o.weights_dir, o.background, precision=o.precision)
        elif (self.model.spec.meta.scale or 1) == 1:
            raise UsageError(f"--model {o.model} does not enlarge images (scale 1: a face restorer); "
                             f"use it with --faces-only")

    def upscaled(self, image: np.ndarray, model) -> np.ndarray:
        """The whole image through `model` (tiled), then resized to --upscale if that differs."""
        o = self.o
        out = enhance_whole(model, image, o.tile, o.overlap, o.batch_size)
        target = o.upscale or model.spec.meta.scale
        return resize(out, target / model.spec.meta.scale)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        """-> (the enhanced image, faces enhanced)."""
        o = self.o
        if not o.faces_only:
            return self.upscaled(image, self.model), 0
        scale = o.upscale or self.model.spec.meta.scale or 1
        if self.background is None:
            bg = resize(image, scale)
        else:
            bg = self.upscaled(image, self.background)
            bg = resize(bg, scale * image.shape[1] / bg.shape[1])
        dets = self.detector.detect(pl.as_chw(image, model_device(self.detector)), min_score=o.det_threshold)
        return enhance_faces(self.model, image, dets, bg, o.feather, o.batch_size), len(dets)


def enhance(images, model: str = "realesrgan_x4plus_ncnn", faces_only: bool = False,
            models: ModelCache | None = None, **flags) -> list[np.ndarray]:
    """Enhance in-memory images (a path, numpy RGB array, PIL image or tensor, or a list) with the
    flags of `tidyface enhance` as keywords; -> one RGB uint8 array per image."""
    items, single = image_list(images)
    run = ImageEnhancer(EnhanceOptions(out="-", model=model, faces_only=faces_only, **flags), models)
    out = [run(as_rgb_uint8(im, "image" if single else f"images[{i}]"))[0] for i, im in enumerate(items)]
    return out


def run_enhance(paths: Sequence[str], o: EnhanceOptions, models: ModelCache | None = None) -> int:
    """The `tidyface enhance` command: each image of `paths` enhanced into o.out (the inputs'
    tree, same names). Returns the exit code (1: some images unreadable)."""
    from .crop import output_stems, plan_inputs

    if not paths:
        raise UsageError("give at least one image, folder or .txt list")
    folder = OutputFolder(o.out, "enhance", paths)
    folder.check()
    files, root = plan_inputs(paths, exclude=Path(o.out))
    if not files:
        raise UsageError("no images found in " + ", ".join(map(str, paths)))
    run = ImageEnhancer(o, models)  # weights before the output folder is touched
    stems, failed, faces, t0 = output_stems(files, root), [], 0, time.perf_counter()
    with folder, progress(len(files), "img", "enhance") as bar:
        folder.claim(o.overwrite, resume=False)
        for path, image in readable(files, failed):
            result, n = run(image)
            name = f"{stems[path]}.{o.ext or path.suffix.lower().lstrip('.')}"
            folder.record([Path(name).parts[0]])
            write_image(folder.path / name, result)
            faces += n
            bar.update(1)
    done = len(files) - len(failed)
    print(f"tidyface: {done} images enhanced ({o.model}{f', {faces} faces' if o.faces_only else ''}) into "
          f"{o.out} in {time.perf_counter() - t0:.1f} s" + (f"; {len(failed)} unreadable" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0
