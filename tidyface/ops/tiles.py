"""Tiled inference for any enhancer: an image of any size through a model in fixed-size windows,
so that the model's working memory is bounded by the window, not the image.

Each window overlaps its neighbours by `overlap` input pixels on every inner side; of each
window's output only its centre (the window less those margins, scaled) is written. A
convolutional network's output pixel depends only on input pixels within its receptive radius r,
and zero padding only changes outputs within r of a window's edge, so with overlap >= r the
written centres are exactly what the whole image would give (to float rounding) and no seam can
show. Windows at the image's border keep the border's own padding, which is the image's. For
networks whose r is larger than any practical overlap (RRDBNet: ~350 input pixels) the result is
an approximation whose quality the overlap trades against time, as upstream's `tile_pad` does.

All windows have one size (min(tile, H) x min(tile, W)), so they are stacked into batches.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .image import as_rgb_batch


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """Windows along one axis: (window start, kept start, kept end), the kept spans partitioning
    0..length. A window is min(tile, length) long; inner kept edges lie >= overlap inside it."""
    size = min(tile, length)
    if size == length:
        return [(0, 0, length)]
    core = size - 2 * overlap
    if core <= 0:
        raise ValueError(f"tile {tile} leaves no centre after an overlap of {overlap} on each side")
    n = math.ceil(length / core)
    edges = [round(i * length / n) for i in range(n + 1)]
    # kept spans are <= core long, so a window reaching `overlap` past each inner edge fits in `size`
    return [(min(max(a - overlap, 0), length - size), a, b) for a, b in zip(edges, edges[1:])]


def enhance_tiled(model, images: Tensor, tile: int = 256, overlap: int = 24, batch: int = 4) -> Tensor:
    """model.enhance over (N,3,H,W) RGB 0..255 images in tile x tile windows (input pixels) with
    `overlap` pixels of context on each inner side; `batch` windows per call. Returns
    (N,3,sH,sW), s = model.spec.meta.scale, in the input's dtype (uint8: rounded), allocated once
    on the images' device; only one batch of windows is in the model at a time."""
    images = as_rgb_batch(images, "images")
    if tile < 1 or overlap < 0 or batch < 1:
        raise ValueError(f"tile ({tile}) and batch ({batch}) must be >= 1, overlap ({overlap}) >= 0")
    s = model.spec.meta.scale
    n, _, h, w = images.shape
    out = torch.empty((n, 3, h * s, w * s), dtype=images.dtype, device=images.device)
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    jobs = [(i, r, c) for i in range(n) for r in rows for c in cols]
    for k in range(0, len(jobs), batch):
        chunk = jobs[k:k + batch]
        windows = torch.stack([images[i, :, r[0]:r[0] + th, c[0]:c[0] + tw] for i, r, c in chunk])
        result = model.enhance(windows)
        for (i, (y0, ya, yb), (x0, xa, xb)), res in zip(chunk, result):
            part = res[:, (ya - y0) * s:(yb - y0) * s, (xa - x0) * s:(xb - x0) * s]
            if out.dtype == torch.uint8:
                part = part.round().clamp(0, 255)
            out[i, :, ya * s:yb * s, xa * s:xb * s] = part
    return out
