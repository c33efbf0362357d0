"""The YOLOv3 box codec (Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement", section 2.1;
darknet `src/yolo_layer.c` get_yolo_box): per cell and anchor, centre = (cell + sigmoid(t_xy)) *
stride, size = exp(t_wh) * anchor (anchors in input pixels), score = sigmoid(objectness) *
sigmoid(class logit).

A level's head map (B, A*(5+C), h, w) is read with ops.priors.flatten_head, so predictions come
level by level, then row, column, anchor: the order of ops.distance.grid_points, whose cell
corners (col*s, row*s) are the `cell * stride` part of the centre.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .distance import grid_points
from .priors import flatten_head


def yolo_priors(image_h: int, image_w: int, strides: Sequence[int],
                anchors: Sequence[Sequence[tuple[float, float]]], device=None,
                dtype=torch.float32) -> Tensor:
    """(P, 5) per prediction: cell corner x, y, stride, anchor width, height; level k has a
    ceil(H/s) x ceil(W/s) grid of len(anchors[k]) anchors."""
    levels = []
    for s, level in zip(strides, anchors):
        pts = grid_points(image_h, image_w, (s,), len(level), device=device, dtype=dtype)
        wh = torch.tensor(level, device=device, dtype=dtype).repeat(len(pts) // len(level), 1)
        levels.append(torch.cat([pts, wh], 1))
    return torch.cat(levels)


def flatten_yolo_maps(maps: Sequence[Tensor], num_anchors: int) -> Tensor:
    """Head maps, one per level (B, A*(5+C), h, w) -> (B, P, 5+C) raw predictions."""
    per_anchor = maps[0].shape[1] // num_anchors
    return torch.cat([flatten_head(m, per_anchor) for m in maps], 1)


def decode_yolo(pred: Tensor, priors: Tensor) -> tuple[Tensor, Tensor]:
    """Raw predictions (..., 5+C) and their priors (..., 5) -> boxes (..., 4) xyxy in input
    pixels and scores (..., C) = objectness * class probability."""
    centre = priors[..., :2] + pred[..., :2].sigmoid() * priors[..., 2:3]
    half = pred[..., 2:4].exp() * priors[..., 3:5] / 2
    scores = pred[..., 4:5].sigmoid() * pred[..., 5:].sigmoid()
    return torch.cat([centre - half, centre + half], -1), scores
