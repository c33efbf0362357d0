"""Making face pixels unrecognisable: region masks in a face's own frame, softened, and composited
into the image through each face's image -> mask matrix.

Every region is a mask (N,h,w) in 0..1 plus the (N,3,3) matrix from image pixels to mask pixels:
a parser's class map on its aligned crop, or an ellipse / rectangle on a square frame around the
detector box. Only the window of the image each mask covers is touched, so a small face in a
large frame costs little; OpenCV does the per-window blurs and warps (on the CPU, where decoded
frames and the encoder are anyway).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("blur", "pixelate", "fill", "mask")
# Side of the square frame an ellipse or box region is drawn in: its resolution only sets how
# smooth the outline is after warping.
SHAPE_SIDE = 128


def box_frames(boxes: Tensor, scale: float, side: int = SHAPE_SIDE) -> Tensor:
    """(N,3,3) image -> frame matrices that map each box, grown `scale` times about its centre,
    onto a side x side frame (x and y scaled apart, so the frame's ellipse is the box's)."""
    b = boxes.to(torch.float64)
    centre = (b[:, :2] + b[:, 2:]) / 2
    half = ((b[:, 2:] - b[:, :2]).clamp(min=1) * scale) / 2
    k = side / (2 * half)  # (N,2) pixels of frame per image pixel
    mats = torch.zeros(len(b), 3, 3, dtype=torch.float64, device=b.device)
    mats[:, 0, 0], mats[:, 1, 1], mats[:, 2, 2] = k[:, 0], k[:, 1], 1
    # pixel centres: frame pixel (side-1)/2 is the box centre
    mats[:, :2, 2] = (side - 1) / 2 - k * centre
    return mats


def shape_masks(n: int, shape: str, side: int = SHAPE_SIDE, device=None) -> Tensor:
    """(n,side,side) masks of the frame's inscribed ellipse, or the whole frame ("box")."""
    if shape == "box":
        return torch.ones(n, side, side, device=device)
    r = (torch.arange(side, dtype=torch.float32, device=device) - (side - 1) / 2) / (side / 2)
    inside = (r[None, :] ** 2 + r[:, None] ** 2) <= 1
    return inside.float().expand(n, side, side)


def soften(masks: Tensor, grow: float, feather: float) -> Tensor:
    """Masks (N,h,w) grown by `grow` and given a soft edge `feather` wide (both shares of the
    side): dilated by grow + feather, then a Gaussian of radius feather, so every pixel of the
    mask grown by `grow` keeps alpha ~1 (recall first) and the edge fades over `feather`."""
    side = min(masks.shape[-2:])
    g, e = int(round(grow * side)), int(round(feather * side))
    m = masks.float()[:, None]
    if g + e > 0:  # a square dilation, as a row pass then a column pass (2k, not k^2, per pixel)
        r = g + e
        m = F.max_pool2d(m, (1, 2 * r + 1), stride=1, padding=(0, r))
        m = F.max_pool2d(m, (2 * r + 1, 1), stride=1, padding=(r, 0))
    if e > 0:
        x = torch.arange(-e, e + 1, dtype=torch.float32, device=m.device)
        k = torch.exp(-0.5 * (x / (e / 2)) ** 2)
        k = (k / k.sum()).to(m)
        m = F.conv2d(F.pad(m, (e, e, 0, 0)), k.view(1, 1, 1, -1))
        m = F.conv2d(F.pad(m, (0, 0, e, e)), k.view(1, 1, -1, 1))
    return m[:, 0].clamp(0, 1)


def edge_taper(side: int, feather: float, device=None) -> Tensor:
    """(side,side) weights rising from 0 at a square frame's border to 1 `feather` x side inside
    it: a mask cut by its frame's border fades out instead of ending in a straight edge."""
    e = max(1.0, feather * side)
    r = torch.arange(side, dtype=torch.float32, device=device)
    ramp = (torch.minimum(r, side - 1 - r) / e).clamp(max=1)
    return ramp[None, :] * ramp[:, None]


def _window(mat: np.ndarray, h: int, w: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The image rectangle (x0, y0, x1, y1) a mask of h x w through image -> mask `mat` covers."""
    inv = np.linalg.inv(mat)
    corners = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [-0.5, h - 0.5, 1], [w - 0.5, h - 0.5, 1]])
    pts = corners @ inv.T
    pts = pts[:, :2] / pts[:, 2:]
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    return None if x0 >= x1 or y0 >= y1 else (x0, y0, x1, y1)


def _obscured(window: np.ndarray, method: str, face_px: float, strength: float,
              colour: Sequence[int]) -> np.ndarray:
    import cv2

    if method == "blur":
        sigma = max(2.0, strength * face_px)
        # A wide Gaussian is as well taken at lower resolution: shrink so sigma is ~3 pixels,
        # blur, enlarge (the loss of detail is the point), at a fraction of the cost.
        shrink = max(1.0, sigma / 3)
        h, w = window.shape[:2]
        small = window if shrink == 1 else cv2.resize(
            window, (max(1, round(w / shrink)), max(1, round(h / shrink))), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma / shrink, borderType=cv2.BORDER_REFLECT)
        return small if shrink == 1 else cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if method == "pixelate":
        block = max(2.0, strength * face_px)
        h, w = window.shape[:2]
        small = cv2.resize(window, (max(1, int(w / block)), max(1, int(h / block))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.broadcast_to(np.asarray(colour, np.uint8), window.shape)


def composite(image: np.ndarray, masks: Sequence[Tensor], mats: Tensor, face_px: Tensor, method: str = "blur",
              strength: float = 0.3, colour: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """A new image (H,W,3) uint8 with each face's mask region obscured (blur: Gaussian of sigma
    strength x face size; pixelate: blocks of that size; fill: `colour`), blended by the mask's
    alpha. masks: one (h,w) 0..1 map per face (sizes may differ), mats (N,3,3) image -> mask.
    method "mask": the (H,W) uint8 alpha of all faces (0..255) instead. face_px (N,): each
    face's size in image pixels (the larger box side). `image` is never modified."""
    import cv2

    height, width = image.shape[:2]
    out = np.zeros((height, width), np.float32) if method == "mask" else image.copy()
    alphas = [m.detach().to("cpu", torch.float32).numpy() for m in masks]
    m64 = mats.detach().to("cpu", torch.float64).numpy()
    sizes = face_px.detach().to("cpu", torch.float64).numpy()
    for k in range(len(alphas)):  # each face's window in turn: later faces see earlier ones obscured
        h, w = alphas[k].shape
        win = _window(m64[k], h, w, width, height)
        if win is None:
            continue
        x0, y0, x1, y1 = win
        shift = np.array([[1, 0, x0], [0, 1, y0], [0, 0, 1]], np.float64)
        to_mask = (m64[k] @ shift)[:2]
        alpha = cv2.warpAffine(alphas[k], to_mask, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if method == "mask":
            np.maximum(out[y0:y1, x0:x1], alpha, out=out[y0:y1, x0:x1])
            continue
        region = out[y0:y1, x0:x1]
        hidden = _obscured(region, method, float(sizes[k]), strength, colour)
        a = alpha[..., None]
        region[:] = (region * (1 - a) + hidden * a + 0.5).astype(np.uint8)
    return (out * 255 + 0.5).astype(np.uint8) if method == "mask" else out
