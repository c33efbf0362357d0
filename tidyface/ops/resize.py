"""Network input sizes and the resize that several detectors share (RetinaFace, SCRFD, YuNet,
CenterFace): each picks its own policy (cap, letterbox, padding) from these."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def network_size(hw, max_size: int | None) -> tuple[int, int]:
    """(h, w) of the network input: the longer side at most max_size, aspect kept, never upscaled."""
    h, w = int(hw[0]), int(hw[1])
    if max_size is None or max(h, w) <= max_size:
        return h, w
    s = max_size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n (padding to a network's coarsest stride)."""
    return -(-int(n) // multiple) * multiple


def resize_bilinear(images: Tensor, size: Sequence[int]) -> Tensor:
    """RGB 0..255 (B,3,H,W) -> float pixels (B,3,h,w), bilinear with half-pixel centres (what
    cv2.resize's INTER_LINEAR computes, which the upstream pipelines call). uint8 input comes
    back rounded to whole values, as cv2 returns uint8 pixels; float input is not rounded."""
    x = images.float()
    if tuple(size) == tuple(images.shape[-2:]):
        return x
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    if not images.is_floating_point():
        x = x.round().clamp_(0, 255)
    return x


def resize_antialiased(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of float pixels to size (h, w), averaging when shrinking as PIL's BILINEAR
    does (torch's antialias mode follows PIL's filter); identity at the same size."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
