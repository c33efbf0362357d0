"""Test-only stand-in for the few torchvision pieces the reference packages import.

facenet-pytorch and facexlib import torchvision, and no CPU build of torchvision exists for the
torch wheel these machines use (PyPI's wheel fails to load its C ops). The references only need
greedy NMS, to_tensor and IntermediateLayerGetter; they are written here from their definitions,
written separately from tidyface.ops (no shared code), so parity stays independent.
"""
from __future__ import annotations

import sys
import types
from collections import OrderedDict

import numpy as np
import torch
from torch import nn


def _nms(boxes, scores, iou_threshold):
    # Girshick's classic numpy loop: best box first, drop what overlaps it, repeat.
    b = boxes.detach().double().cpu().numpy()
    order = np.argsort(-scores.detach().double().cpu().numpy(), kind="stable")
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(b[i, 0], b[order[1:], 0])
        yy1 = np.maximum(b[i, 1], b[order[1:], 1])
        xx2 = np.minimum(b[i, 2], b[order[1:], 2])
        yy2 = np.minimum(b[i, 3], b[order[1:], 3])
        inter = np.maximum(0.0, xx2 - xx1) * np.maximum(0.0, yy2 - yy1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= iou_threshold]
    return torch.as_tensor(np.array(keep, dtype=np.int64), device=boxes.device)


def _batched_nms(boxes, scores, idxs, iou_threshold):
    keep = []
    for g in torch.unique(idxs).tolist():
        sel = torch.nonzero(idxs == g).flatten()
        keep.append(sel[_nms(boxes[sel], scores[sel], iou_threshold)])
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    keep = torch.cat(keep)
    return keep[torch.argsort(scores[keep], descending=True)]


def _to_tensor(pic):
    arr = np.asarray(pic)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return t.float().div(255) if arr.dtype == np.uint8 else t


class _IntermediateLayerGetter(nn.ModuleDict):
    def __init__(self, model, return_layers):
        wanted = dict(return_layers)
        layers = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            wanted.pop(name, None)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def install() -> None:
    """Register the stand-in as `torchvision` unless a working torchvision is importable."""
    try:
        import torchvision  # noqa: F401
        from torchvision.ops import nms  # noqa: F401
        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        return
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    models = types.ModuleType("torchvision.models")
    utils = types.ModuleType("torchvision.models._utils")
    ops.nms, ops.batched_nms, boxes.batched_nms = _nms, _batched_nms, _batched_nms
    ops.boxes = boxes
    functional.to_tensor = _to_tensor
    transforms.functional = functional
    utils.IntermediateLayerGetter = _IntermediateLayerGetter
    models._utils = utils
    tv.ops, tv.transforms, tv.models = ops, transforms, models
    for name, mod in [("torchvision", tv), ("torchvision.ops", ops), ("torchvision.ops.boxes", boxes),
                      ("torchvision.transforms", transforms),
                      ("torchvision.transforms.functional", functional),
                      ("torchvision.models", models), ("torchvision.models._utils", utils)]:
        sys.modules[name] = mod
