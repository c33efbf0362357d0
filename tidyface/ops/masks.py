"""Synthetic face masks drawn from landmarks, and the face above the nose tip: batched, pure torch,
on the images' own device and dtype.

Facts from MaskTheFace (aqeelanwar/MaskTheFace, `mask_utils`): a worn mask is anchored on the
dlib-68 jaw points 1..15 (chin 8) and the nose bridge (27-30); masks come in surgical, cloth and
N95/KN95 cuts, in plain colours (white, black, light blue among them). The outlines are our own;
for 5 points they are placed in units of each face's eye distance (across) and eyes-to-mouth
distance (down), measured (below) from dlib68's points on real photos.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

SHAPES = ("surgical", "cloth", "n95")
COLOURS = {"light_blue": (150.0, 190.0, 222.0), "white": (236.0, 236.0, 232.0), "black": (32.0, 32.0, 36.0)}
# the colour each shape is drawn in when none is asked for (what --masked references wear)
SHAPE_COLOURS = {"surgical": "light_blue", "cloth": "black", "n95": "white"}

# Half outlines (x >= 0, top to bottom) in face units: x in eye distances from the centre line,
# y in eyes-to-mouth distances below the eye line (nose tip ~0.55, mouth 1); mirrored for the left.
# They are the dlib-68 outlines below at the median dlib68 points of 40 deepface photos in the
# detector's 5-point frame (jaw point 15 at (1.06, 0.35), chin 8 at (0, 1.78), bridge 28 at
# (0, 0.19)), so 5 and 68 points draw the same masks on an average face.
_HALF = {
    "surgical": ((0.0, 0.19), (1.13, 0.31), (1.09, 0.6), (1.04, 0.91), (0.95, 1.21), (0.77, 1.43),
                 (0.56, 1.63), (0.3, 1.79), (0.0, 1.83)),
    "cloth": ((0.0, 0.11), (1.19, 0.27), (1.15, 0.57), (1.1, 0.9), (1.0, 1.21), (0.82, 1.45),
              (0.59, 1.66), (0.32, 1.83), (0.0, 1.87)),
    "n95": ((0.0, 0.28), (0.98, 0.92), (0.9, 1.2), (0.73, 1.41), (0.53, 1.6), (0.28, 1.74), (0.0, 1.78)),
}
# dlib-68 outlines: jaw points (pushed out from the mouth by `grow`, so the mask passes below the
# chin and over the jaw line) closed over a nose-bridge point (27 top .. 30 tip, fractional).
# surgical: bridge to below the chin, out to the jaw; cloth: higher and wider; n95: a cup from
# lower on the bridge to the jaw below the mouth corners, leaving the cheeks.
_JAW68 = {"surgical": (range(1, 16), 28.0, 0.06), "cloth": (range(1, 16), 27.6, 0.12),
          "n95": (range(3, 14), 28.5, 0.0)}


def face_axes(points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each face's frame from its points (B,K,2) (5, or any markup ops.markup reduces to 5):
    eye centre (B,2), `across` (B,2) = right eye - left eye, `down` (B,2) = mouth centre - eye
    centre. Face units (x, y) sit at eyes + x * across + y * down."""
    five = points if points.shape[1] == 5 else _five(points)
    eyes = (five[:, 0] + five[:, 1]) / 2
    return eyes, five[:, 1] - five[:, 0], (five[:, 3] + five[:, 4]) / 2 - eyes


def _five(points: Tensor) -> Tensor:
    from .markup import reduce_to_five

    return reduce_to_five(points).to(points.dtype)


def mask_polygons(points: Tensor, shape: str = "surgical") -> Tensor:
    """(B,P,2) polygon of each face's mask of `shape` (SHAPES), in the points' pixels: from the
    jaw line and nose bridge for 68 points, else from the 5 points."""
    if shape not in SHAPES:
        raise ValueError(f"mask shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    pts = points.to(torch.float64)
    if pts.shape[1] == 68:
        jaw, bridge, grow = _JAW68[shape]
        ring = pts[:, list(jaw)]
        mouth = pts[:, 48:68].mean(1, keepdim=True)
        ring = mouth + (ring - mouth) * (1 + grow)
        lo = int(bridge)
        top = pts[:, lo] + (bridge - lo) * (pts[:, min(lo + 1, 30)] - pts[:, lo])
        return torch.cat([ring, top[:, None]], 1)
    half = torch.tensor(_HALF[shape], dtype=torch.float64, device=pts.device)
    # right side top to bottom, then the left side bottom to top (the centre points once)
    right = half
    left = torch.flip(half[1:-1], [0]) * torch.tensor([-1.0, 1.0], dtype=torch.float64, device=pts.device)
    outline = torch.cat([right, left])  # (P,2) in face units, a closed ring
    eyes, across, down = face_axes(pts)
    return eyes[:, None] + outline[None, :, :1] * across[:, None] + outline[None, :, 1:] * down[:, None]


def inside_polygons(polygons: Tensor, size: Sequence[int]) -> Tensor:
    """(B,h,w) bool: pixel centres (x, y integers, the library's pixel-centre convention) inside
    each face's polygon (B,P,2), by the even-odd crossing rule, for all pixels and edges at once
    within the polygons' joint bounding box (a face on a large photo tests only its own pixels).
    A polygon with a NaN point covers nothing."""
    w, h = int(size[0]), int(size[1])
    poly = polygons.to(torch.float64)
    out = torch.zeros(len(poly), h, w, dtype=torch.bool, device=poly.device)
    valid = torch.isfinite(poly).flatten(1).all(1)
    if not bool(valid.any()):
        return out
    poly = torch.where(valid[:, None, None], poly, torch.zeros_like(poly))
    lo, hi = poly[valid].flatten(0, 1).amin(0), poly[valid].flatten(0, 1).amax(0)
    x0, y0 = max(0, int(lo[0].floor())), max(0, int(lo[1].floor()))
    x1, y1 = min(w, int(hi[0].ceil()) + 1), min(h, int(hi[1].ceil()) + 1)
    if x1 <= x0 or y1 <= y0:
        return out
    a, b = poly, poly.roll(-1, 1)  # edges a -> b
    ys = torch.arange(y0, y1, dtype=torch.float64, device=poly.device)
    xs = torch.arange(x0, x1, dtype=torch.float64, device=poly.device)
    ay, by = a[..., 1, None], b[..., 1, None]  # (B,P,1)
    spans = (ay > ys) != (by > ys)  # (B,P,h): the edge crosses the row
    t = (ys - ay) / torch.where(by == ay, torch.ones_like(by), by - ay)
    cross_x = a[..., 0, None] + t * (b[..., 0, None] - a[..., 0, None])  # (B,P,h)
    cross_x = torch.where(spans, cross_x, torch.full_like(cross_x, -torch.inf))
    # a pixel is inside when an odd number of its row's crossings lie to its right
    right = cross_x[..., None] > xs  # (B,P,h,w)
    out[:, y0:y1, x0:x1] = (right.sum(1) % 2) == 1
    return out


def draw_masks(images: Tensor, points: Tensor, shape: str = "surgical",
               colour: str | Sequence[float] | None = None) -> Tensor:
    """Images (B,3,H,W) (float or uint8, any device) with one mask of `shape` drawn on face b of
    image b (points (B,K,2) in the image's pixels), filled with `colour` (a COLOURS name or RGB
    0..255; default the shape's own, SHAPE_COLOURS). A new tensor; the input is left as it is."""
    if shape not in SHAPES:
        raise ValueError(f"mask shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    name = SHAPE_COLOURS[shape] if colour is None else colour
    rgb = COLOURS[name] if isinstance(name, str) else tuple(float(c) for c in name)
    if len(rgb) != 3:
        raise ValueError(f"a mask colour is 3 numbers (R,G,B 0..255) or one of {', '.join(COLOURS)}")
    h, w = images.shape[2:]
    inside = inside_polygons(mask_polygons(points.to(images.device), shape), (w, h))
    fill = torch.tensor(rgb, device=images.device).to(images.dtype).view(1, 3, 1, 1)
    return torch.where(inside[:, None], fill, images)


def draw_all_masks(images: Tensor, points: Tensor, shapes: Sequence[str] = SHAPES) -> Tensor:
    """(S*B,3,H,W): every image with each shape in `shapes` drawn in its own colour, shape-major
    (rows s*B .. s*B+B-1 wear shapes[s])."""
    return torch.cat([draw_masks(images, points, s) for s in shapes])


def upper_face_area(points: Tensor, size: Sequence[int]) -> Tensor:
    """(B,h,w) bool: the pixels above each face's nose tip, i.e. on the eyes' side of the line
    through the nose tip parallel to the eye line (points (B,K,2); 5 points or a markup that
    reduces to 5)."""
    pts = points.to(torch.float64)
    five = pts if pts.shape[1] == 5 else _five(pts)
    across = five[:, 1] - five[:, 0]
    normal = torch.stack([-across[:, 1], across[:, 0]], 1)  # perpendicular to the eye line
    down = (five[:, 3] + five[:, 4]) / 2 - (five[:, 0] + five[:, 1]) / 2
    normal = torch.where((normal * down).sum(1, keepdim=True) < 0, -normal, normal)  # towards the mouth
    w, h = int(size[0]), int(size[1])
    ys = torch.arange(h, dtype=torch.float64, device=pts.device)[:, None]
    xs = torch.arange(w, dtype=torch.float64, device=pts.device)[None]
    nose = five[:, 2]
    depth = (xs[None] - nose[:, 0, None, None]) * normal[:, 0, None, None] + \
        (ys[None] - nose[:, 1, None, None]) * normal[:, 1, None, None]
    return depth < 0


def keep_upper_face(images: Tensor, points: Tensor, fill: str = "mean") -> Tensor:
    """Images (B,3,H,W) with everything below each face's nose tip (upper_face_area) filled: with
    the mean colour of the part kept ("mean"), or 0 ("zero"). Same dtype and device."""
    if fill not in ("mean", "zero"):
        raise ValueError(f"fill must be mean or zero, got {fill!r}")
    h, w = images.shape[2:]
    keep = upper_face_area(points.to(images.device), (w, h))[:, None]
    if fill == "zero":
        return torch.where(keep, images, torch.zeros((), dtype=images.dtype, device=images.device))
    x = images.to(torch.float32)
    mean = (x * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp(min=1)
    return torch.where(keep, images, mean.round().to(images.dtype) if not images.is_floating_point()
                       else mean.to(images.dtype))
