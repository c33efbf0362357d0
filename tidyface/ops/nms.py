"""Greedy non-maximum suppression in pure torch (no torchvision), batched per image."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def box_area(boxes: Tensor, offset: float = 0.0) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0] + offset).clamp(min=0) * (boxes[:, 3] - boxes[:, 1] + offset).clamp(min=0)


def box_iou(a: Tensor, b: Tensor, offset: float = 0.0, mode: str = "union") -> Tensor:
    """Pairwise overlap (len(a), len(b)); mode "min" divides by the smaller area (MTCNN's O-Net)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + offset).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a, area_b = box_area(a, offset)[:, None], box_area(b, offset)[None, :]
    denom = torch.minimum(area_a, area_b) if mode == "min" else area_a + area_b - inter
    return inter / denom.clamp(min=1e-12)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: float = 0.0,
        mode: str = "union") -> Tensor:
    """Indices of kept boxes, by decreasing score; a box is dropped when its overlap with a kept,
    higher-scoring box is > iou_threshold. offset=1 counts pixels inclusively (legacy MTCNN code).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # Box lists are small; float64 numpy on the host is exact and has ~1 us per-op overhead,
    # where per-op torch dispatch would dominate this inherently sequential loop.
    order = np.argsort(-scores.detach().double().cpu().numpy(), kind="stable")
    b = boxes.detach().double().cpu().numpy()[order]
    x1, y1, x2, y2 = b.T
    area = np.clip(x2 - x1 + offset, 0, None) * np.clip(y2 - y1 + offset, 0, None)
    keep = []
    remaining = np.arange(len(order))
    # One pass per *kept* box, each vectorised over the boxes still standing.
    while remaining.size:
        i, rest = remaining[0], remaining[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + offset, 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + offset, 0, None)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        remaining = rest[inter <= iou_threshold * np.maximum(denom, 1e-12)]
    return torch.as_tensor(order[np.asarray(keep, dtype=np.int64)], device=boxes.device)


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float,
                offset: float = 0.0, mode: str = "union") -> Tensor:
    """NMS independently within each group (image index); kept indices by decreasing score.

    Each group runs on its own: one shared loop over all groups (the coordinate-offset trick)
    would compare every kept box with the boxes of every image, quadratic in the batch size.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    g = groups.detach().cpu().numpy()
    order = np.argsort(g, kind="stable")
    starts = np.flatnonzero(np.r_[True, g[order][1:] != g[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    keep = []
    for a, b in zip(starts, ends):
        idx = torch.as_tensor(order[a:b], device=boxes.device)
        keep.append(idx[nms(boxes[idx], scores[idx], iou_threshold, offset, mode)])
    keep = torch.cat(keep)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]
