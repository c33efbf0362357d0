"""SSD-style anchors ("priors") and the box / landmark codec shared by anchor-based detectors.

Conventions from biubug6/Pytorch_Retinaface `layers/functions/prior_box.py` and
`utils/box_utils.py` (decode, decode_landm): priors are (cx, cy, w, h) as fractions of the
network input, ordered level by level, then row, column, anchor size; that is the order in which
a head's (B, A*C, h, w) output is flattened by permuting to (B, h, w, A*C).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def prior_boxes(image_h: int, image_w: int, min_sizes: Sequence[Sequence[float]],
                steps: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
    """(P,4) priors (cx, cy, w, h), normalised by the input size, for one input size.

    Level k has a ceil(H/step) x ceil(W/step) grid (what stride-2 convs with padding produce);
    each cell gets one square anchor per entry of min_sizes[k], centred on the cell.
    """
    levels = []
    for sizes, step in zip(min_sizes, steps):
        fh, fw = math.ceil(image_h / step), math.ceil(image_w / step)
        # float64 arithmetic, rounded once, to reproduce upstream's Python-float priors exactly.
        cy = (torch.arange(fh, dtype=torch.float64, device=device) + 0.5) * step / image_h
        cx = (torch.arange(fw, dtype=torch.float64, device=device) + 0.5) * step / image_w
        a = len(sizes)
        s = torch.as_tensor(sizes, dtype=torch.float64, device=device)
        grid = torch.stack([
            cx[None, :, None].expand(fh, fw, a),
            cy[:, None, None].expand(fh, fw, a),
            (s / image_w)[None, None, :].expand(fh, fw, a),
            (s / image_h)[None, None, :].expand(fh, fw, a),
        ], dim=-1)
        levels.append(grid.reshape(-1, 4))
    return torch.cat(levels).to(dtype)


def decode_boxes(loc: Tensor, priors: Tensor, variances: Sequence[float]) -> Tensor:
    """Regression (..., P, 4) (dx, dy, dw, dh) -> boxes (..., P, 4) xyxy, in the priors' units."""
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=-1)


def encode_boxes(boxes: Tensor, priors: Tensor, variances: Sequence[float]) -> Tensor:
    """Inverse of decode_boxes (xyxy -> regression targets), for round-trip checks and training."""
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    size = boxes[..., 2:] - boxes[..., :2]
    d_centre = (centre - priors[:, :2]) / (variances[0] * priors[:, 2:])
    d_size = torch.log(size / priors[:, 2:]) / variances[1]
    return torch.cat([d_centre, d_size], dim=-1)


def decode_landmarks(pred: Tensor, priors: Tensor, variances: Sequence[float]) -> Tensor:
    """Regression (..., P, 2K) as (x1, y1, x2, y2, ...) -> points (..., P, K, 2), priors' units."""
    pts = pred.unflatten(-1, (-1, 2))
    return priors[:, None, :2] + pts * variances[0] * priors[:, None, 2:]


def flatten_head(t: Tensor, per_anchor: int) -> Tensor:
    """A head's (B, A*C, h, w) output -> (B, h*w*A, C): the row, column, anchor order of the
    priors here and of ops.distance.grid_points."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, per_anchor)
