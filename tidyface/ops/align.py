"""Face alignment core: least-squares similarity/affine fits, 5-point templates, batched warps.

Conventions used throughout (the same as OpenCV's):
- Points are (x, y) in pixel-centre coordinates: pixel (i, j) of an image has its centre at
  x=j, y=i, and the image covers [-0.5, W-0.5] x [-0.5, H-0.5].
- A transform is a (N,3,3) matrix mapping image coordinates to crop coordinates; `warp` fills
  output pixel (x, y) with the bilinear sample of the source at inverse(M) @ (x, y, 1), exactly
  what ``cv2.warpAffine(src, M[:2], (w, h), flags=cv2.INTER_LINEAR)`` does.
- 5-point landmark order: left eye, right eye, nose, left mouth corner, right mouth corner, as
  seen in the image (the left eye is the one with the smaller x in an upright face).

Facts: Umeyama, "Least-squares estimation of transformation parameters between two point
patterns", TPAMI 1991; ArcFace template from insightface (python-package/insightface/utils/
face_align.py); FFHQ crop rule from NVlabs/ffhq-dataset download_ffhq.py (recreate_aligned_images).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# insightface's ArcFace template for 112x112 crops (pixel-centre coordinates).
ARCFACE_112 = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                            [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)

PADDING_MODES = ("constant", "replicate", "reflect", "wrap")


def _ffhq_template(face: Tensor, output_size: int = 1024) -> Tensor:
    """Where the FFHQ alignment rule puts the 5 points of `face` in its output square.

    FFHQ (download_ffhq.py, recreate_aligned_images) crops an oriented square built from the eye
    centres and the mouth-corner midpoint only:
        eye_avg = (eye_l + eye_r)/2, eye_to_eye = eye_r - eye_l, eye_to_mouth = mouth_avg - eye_avg
        x = eye_to_eye - rot90(eye_to_mouth), rescaled to length
            max(2.0 * |eye_to_eye|, 1.8 * |eye_to_mouth|);  y = x turned 90 degrees (down)
        centre c = eye_avg + 0.1 * eye_to_mouth;  quad = c -/+ x -/+ y
    and maps the square quad onto the whole output (PIL QUAD transform of quad + 0.5, i.e. pixel
    edges), so c lands on the output centre and c + x on the right edge. Nose and mouth corners
    are not used by the rule, so a 5-point template needs a face shape: we push the ArcFace mean
    face through the rule. For a face of exactly that shape, a similarity fit onto the result
    reproduces FFHQ's crop exactly; for real faces it is the usual 5-point approximation of it.
    """
    eye_l, eye_r, mouth_l, mouth_r = face[0], face[1], face[3], face[4]
    eye_avg = (eye_l + eye_r) / 2
    eye_to_eye = eye_r - eye_l
    eye_to_mouth = (mouth_l + mouth_r) / 2 - eye_avg
    x = eye_to_eye + torch.stack([eye_to_mouth[1], -eye_to_mouth[0]])
    half_side = torch.maximum(eye_to_eye.norm() * 2.0, eye_to_mouth.norm() * 1.8)
    x_axis = x / x.norm()
    y_axis = torch.stack([-x_axis[1], x_axis[0]])
    rel = face - (eye_avg + 0.1 * eye_to_mouth)
    local = torch.stack([rel @ x_axis, rel @ y_axis], dim=1) / half_side  # in [-1, 1] inside quad
    return local * (output_size / 2) + (output_size - 1) / 2


# FFHQ-style template for 1024x1024 (derivation in _ffhq_template), about [[388.3, 483.1],
# [634.7, 483.1], [511.5, 623.8], [409.5, 767.5], [613.5, 767.5]]. The ArcFace face is in FFHQ's
# mouth-limited case (1.8|eye_to_mouth| > 2|eye_to_eye|), so eyes-to-mouth spans 1024/3.6 px.
# facexlib's empirical FFHQ means (used by GFPGAN at 512 px) differ by < 0.025 of the side.
FFHQ_1024 = _ffhq_template(ARCFACE_112)

# kind -> (points, side of the square frame they are given in)
TEMPLATES: dict[str, tuple[Tensor, int]] = {"arcface": (ARCFACE_112, 112), "ffhq": (FFHQ_1024, 1024)}


# The face, for --face-factor, is a square FACE_SPAN times the larger side of the five points'
# bounding box (about brow to chin): face factor 1 fills the output with it, the ArcFace 112
# crop is 0.73, and the mouth leaves a square crop only above ~1.1.
FACE_SPAN = 2.0


def _extent(points: Tensor) -> Tensor:
    span = points.amax(0) - points.amin(0)
    return span.max() * FACE_SPAN


def natural_face_factor(kind: str = "arcface") -> float:
    """The face factor (see `template_for`) of a template in its own frame; arcface: 0.7298."""
    points, side = _template(kind)
    return float(_extent(points) / side)


def _template(kind: str) -> tuple[Tensor, int]:
    if kind not in TEMPLATES:
        raise ValueError(f"unknown template kind {kind!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[kind]


def template_for(size: int | Sequence[int], kind: str = "arcface",
                 face_factor: float | None = None) -> Tensor:
    """The 5 template points (5,2) float64 for an output of `size` = (w, h) (or an int side).

    face_factor: the share of the output's shorter side min(w, h) taken by the face, the face
    being a square FACE_SPAN (2) times the larger side of the template points' bounding box. The template is scaled uniformly (its shape never changes)
    about the frame centre, so each point keeps its offset from the centre in proportion: with
    s = face_factor / natural_face_factor(kind) * min(w, h) / base_side,
        p_out = (p_base - (base_side - 1)/2) * s + ((w - 1)/2, (h - 1)/2)
    (centres in pixel-centre coordinates). face_factor=None keeps the template's own factor
    (arcface: 0.7298, ffhq: 0.5556), i.e. plain rescaling; template_for(112) == ARCFACE_112
    exactly, as does template_for(112, face_factor=natural_face_factor()).
    Scaling about pixel-area centres means template_for(224) is 2 * ARCFACE_112 + 0.5, where
    insightface's estimate_norm uses 2 * ARCFACE_112 (a 0.5 px shift of the whole crop).
    """
    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if w <= 0 or h <= 0:
        raise ValueError(f"output size must be positive, got {(w, h)}")
    points, side = _template(kind)
    scale = min(w, h) / side
    if face_factor is not None:
        if not face_factor > 0:
            raise ValueError(f"face_factor must be > 0, got {face_factor}")
        scale *= face_factor / natural_face_factor(kind)
    # points*scale + offset (not (points - c)*scale + c) so the identity case is bit-exact.
    offset = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64) - (side - 1) / 2 * scale
    return points * scale + offset


def umeyama(src: Tensor, dst: Tensor, allow_skew: bool = False) -> Tensor:
    """Least-squares transform (N,3,3) mapping src points (N,K,2) onto dst (K,2) or (N,K,2).

    Similarity (rotation, uniform scale, translation; never a reflection: Umeyama's sign fix) for
    K >= 2, or with allow_skew=True a general affine for K >= 3 non-collinear points. Solved in
    float64; returned in src's dtype when it is floating, else float32. Raises ValueError when a
    set of src points has no spread (all equal; or collinear, for the affine), since no
    transform is then defined, naming the offending indices rather than returning NaN.
    """
    if src.ndim != 3 or src.shape[-1] != 2:
        raise ValueError(f"src must be (N,K,2), got {tuple(src.shape)}")
    n, k = src.shape[:2]
    need = 3 if allow_skew else 2
    if k < need:
        raise ValueError(f"{'an affine' if allow_skew else 'a similarity'} needs >= {need} points, got {k}")
    out_dtype = src.dtype if src.is_floating_point() else torch.float32
    s = src.to(torch.float64)
    d = dst.to(device=src.device, dtype=torch.float64).expand(n, k, 2)

    mu_s, mu_d = s.mean(1, keepdim=True), d.mean(1, keepdim=True)
    sc, dc = s - mu_s, d - mu_d
    var_s = sc.square().sum((1, 2)) / k
    # Tolerance far above float64 rounding of centred coordinates, far below any real spread.
    tiny = 1e-20 * (1 + s.square().sum((1, 2)) / k)
    bad = var_s <= tiny
    if bool(bad.any()):
        raise ValueError(f"umeyama: src points of item(s) {bad.nonzero().flatten().tolist()} "
                         "all coincide; no transform is defined")
    cov = dc.transpose(1, 2) @ sc / k  # (N,2,2), dst x src

    mat = torch.zeros(n, 3, 3, dtype=torch.float64, device=src.device)
    mat[:, 2, 2] = 1
    if allow_skew:
        cov_ss = sc.transpose(1, 2) @ sc / k
        bad = torch.linalg.det(cov_ss) <= 1e-12 * var_s.square()
        if bool(bad.any()):
            raise ValueError(f"umeyama: src points of item(s) {bad.nonzero().flatten().tolist()} "
                             "are collinear; an affine transform is not defined")
        lin = cov @ torch.linalg.inv(cov_ss)
    else:
        u, sv, vh = torch.linalg.svd(cov)
        # d = det(U)det(V) = +-1: flips the last axis when the best orthogonal map is a
        # reflection, so R stays a rotation (also right for rank-1 cov, e.g. two points).
        sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
        diag = torch.stack([torch.ones_like(sign), sign], dim=1)
        rot = u @ (diag[:, :, None] * vh)
        scale = (sv * diag).sum(1) / var_s
        lin = scale[:, None, None] * rot
    mat[:, :2, :2] = lin
    mat[:, :2, 2] = (mu_d - mu_s @ lin.transpose(1, 2))[:, 0]
    return mat.to(out_dtype)


def invert(mats: Tensor) -> Tensor:
    """Inverse of (N,3,3) transforms (crop -> image from image -> crop), solved in float64."""
    return torch.linalg.inv(mats.to(torch.float64)).to(mats.dtype)


def scale_matrix(k: float) -> Tensor:
    """Pixel coordinates of an image -> the same image resized k times (pixel centres)."""
    return torch.tensor([[k, 0, (k - 1) / 2], [0, k, (k - 1) / 2], [0, 0, 1]], dtype=torch.float64)


def transform_points(points: Tensor, mats: Tensor) -> Tensor:
    """Apply (N,3,3) transforms to (N,K,2) points (homogeneous divide, so projective works too)."""
    m = mats.to(torch.float64)
    p = points.to(torch.float64)
    out = p @ m[:, :2, :2].transpose(1, 2) + m[:, None, :2, 2]
    w = p @ m[:, 2:, :2].transpose(1, 2) + m[:, None, 2:, 2]
    return (out / w).to(points.dtype if points.is_floating_point() else torch.float32)


def _source_coords(mats: Tensor, out_size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """(N,h,w,2) pixel coordinates sampled for each output pixel; mats map output -> source."""
    w, h = out_size
    m = mats[:, :2, :].to(dtype)
    xs = torch.arange(w, dtype=dtype, device=mats.device)[None, None, :, None]
    ys = torch.arange(h, dtype=dtype, device=mats.device)[None, :, None, None]
    # (N,1,1,2) rows of the 2x3 affine broadcast over the (h,w) lattice.
    return xs * m[:, None, None, :, 0] + ys * m[:, None, None, :, 1] + m[:, None, None, :, 2]


def _inside_weight(p: Tensor, size: int) -> Tensor:
    """Share of the two bilinear taps around p that fall inside [0, size-1] (1D)."""
    p0 = torch.floor(p)
    frac = p - p0
    return (1 - frac) * ((p0 >= 0) & (p0 <= size - 1)) + frac * ((p0 >= -1) & (p0 <= size - 2))


def _reflect101(p: Tensor, size: int) -> Tensor:
    # The bilinear interpolant of a BORDER_REFLECT_101 extension is mirror-symmetric about the
    # first and last pixel centres, so folding the coordinate is exact.
    if size == 1:
        return torch.zeros_like(p)
    period = 2 * (size - 1)
    t = torch.remainder(p, period)
    return torch.where(t > size - 1, period - t, t)


def _sample(images: Tensor, coords: Tensor, image_index: Tensor, padding: str, fill) -> Tensor:
    """Bilinear samples (N,C,h,w) of images[image_index[n]] at pixel coords (N,h,w,2)."""
    b, c, height, width = images.shape
    n, h, w, _ = coords.shape
    x, y = coords[..., 0], coords[..., 1]
    if padding == "reflect":
        x, y = _reflect101(x, width), _reflect101(y, height)
    elif padding == "wrap":
        # Periodic interpolant: fold into [0, size), and append the first column/row so the tap
        # right of the last pixel (index size) reads pixel 0, as BORDER_WRAP does.
        x, y = torch.remainder(x, width), torch.remainder(y, height)
        images = torch.cat([images, images[:, :, :, :1]], dim=3)
        images = torch.cat([images, images[:, :, :1, :]], dim=2)
        height, width = height + 1, width + 1
    # grid_sample, align_corners=False: normalised g = (2p + 1)/size - 1 for pixel-centre p.
    grid = torch.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)
    out = _grid_sample(images, grid, image_index, "zeros" if padding == "constant" else "border")
    if padding == "constant":
        fill_t = torch.as_tensor(fill, dtype=out.dtype, device=out.device).reshape(-1, 1, 1)
        if bool((fill_t != 0).any()):
            # zeros padding gives out-of-image taps weight 0; they should carry the fill value.
            cover = (_inside_weight(coords[..., 0], images.shape[3])
                     * _inside_weight(coords[..., 1], images.shape[2])).to(out.dtype)
            out = out + fill_t * (1 - cover[:, None])
    return out


def _grid_sample(images: Tensor, grid: Tensor, image_index: Tensor, mode: str) -> Tensor:
    """Bilinear samples (N,C,h,w) of images[image_index[n]] at normalised grid (N,h,w,2)."""
    b, c = images.shape[:2]
    n, h, w, _ = grid.shape
    if b == n and bool((image_index == torch.arange(n, device=image_index.device)).all()):
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode=mode, align_corners=False)
    else:
        # One grid_sample for all crops without copying any image: the crops of image i are
        # stacked along the grid's height, slot j = rank of the crop among its image's crops.
        counts = torch.bincount(image_index, minlength=b)
        slots = int(counts.max())
        order = torch.argsort(image_index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(image_index)
        slot[order] = torch.arange(n, device=image_index.device) - starts[image_index[order]]
        stacked = grid.new_zeros(b, slots, h, w, 2)
        stacked[image_index, slot] = grid
        out = F.grid_sample(images, stacked.view(b, slots * h, w, 2), mode="bilinear",
                            padding_mode=mode, align_corners=False)
        out = out.view(b, c, slots, h, w).transpose(1, 2)[image_index, slot]
    return out


def _normalised_theta(mats: Tensor, out_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """(N,2,3) for F.affine_grid: image->crop pixel mats turned into crop->image maps between
    grid_sample's normalised coordinates (align_corners=False), composed in float64."""
    (w, h), (width, height) = out_size, image_size
    f64 = dict(dtype=torch.float64, device=mats.device)
    denorm = torch.tensor([[w / 2, 0, (w - 1) / 2], [0, h / 2, (h - 1) / 2], [0, 0, 1]], **f64)
    norm = torch.tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]], **f64)
    return (norm @ invert(mats.to(torch.float64)) @ denorm)[:, :2]


def _footprint(image: Tensor, mats: Tensor, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The part of a (1,C,H,W) image that crops through mats (N,3,3) sample, and the mats
    re-based onto it (image -> crop becomes region -> crop)."""
    w, h = int(out_size[0]), int(out_size[1])
    corners = torch.tensor([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=torch.float64,
                           device=mats.device)
    src = transform_points(corners.expand(len(mats), 4, 2), invert(mats)).reshape(-1, 2)
    height, width = image.shape[2:]
    lo = (src.amin(0).floor() - 1).clamp(min=0)
    hi = (src.amax(0).floor() + 3)
    x0, y0 = int(lo[0]), int(lo[1])
    x1, y1 = int(hi[0].clamp(max=width)), int(hi[1].clamp(max=height))
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) > 0.6 * width * height:
        return image, mats  # nothing to gain (or every crop lies outside the image)
    shift = torch.eye(3, dtype=torch.float64, device=mats.device)
    shift[0, 2], shift[1, 2] = x0, y0
    return image[:, :, y0:y1, x0:x1], mats @ shift


def _check_padding(padding: str) -> None:
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")


def warp(images: Tensor, mats: Tensor, image_index: Tensor | None, out_size: Sequence[int],
         padding: str = "constant", fill: float | Sequence[float] = 0) -> Tensor:
    """Crops (N,C,h,w) of full-resolution images (B,C,H,W) through image->crop mats (N,3,3).

    image_index (N,): which image each crop comes from (None: crop n from image n, or every
    crop from the only image). out_size = (w, h). Bilinear, matching cv2.warpAffine with
    INTER_LINEAR and, per padding: "constant" = BORDER_CONSTANT (fill: scalar or per channel),
    "replicate" = BORDER_REPLICATE, "reflect" = BORDER_REFLECT_101 (OpenCV's default: the
    edge pixel is not repeated, ...cb|abc|ba...), "wrap" = BORDER_WRAP. Returns float32 for
    integer images, else the images' dtype (float16/bfloat16 are sampled in float32).
    Differentiable in images (not in mats).
    """
    _check_padding(padding)
    if images.ndim != 4:
        raise ValueError(f"images must be (B,C,H,W), got {tuple(images.shape)}")
    if mats.ndim != 3 or mats.shape[1:] != (3, 3):
        raise ValueError(f"mats must be (N,3,3), got {tuple(mats.shape)}")
    out_dtype = images.dtype if images.is_floating_point() else torch.float32
    if not images.is_floating_point() and images.shape[0] == 1 and padding in ("constant", "replicate") \
            and mats.shape[0]:
        # An 8-bit frame: convert only the region the crops read (their footprint plus the
        # bilinear taps) to float, not the whole frame. Where that region meets the image edge it
        # is the image edge, so padding behaves exactly as on the full image.
        images, mats = _footprint(images, mats.to(images.device, torch.float64), out_size)
    if images.dtype != torch.float64:
        # float16 grids cannot address large images to a fraction of a pixel: sample in float32.
        images = images.float()
    b, n = images.shape[0], mats.shape[0]
    if image_index is None:
        if b not in (n, 1):
            raise ValueError(f"image_index is required for {n} crops from {b} images")
        image_index = torch.arange(n) if b == n else torch.zeros(n, dtype=torch.long)
    image_index = torch.as_tensor(image_index, dtype=torch.long).to(images.device)
    if image_index.shape != (n,):
        raise ValueError(f"image_index must be ({n},), got {tuple(image_index.shape)}")
    if n and (int(image_index.min()) < 0 or int(image_index.max()) >= b):
        raise IndexError(f"image_index out of range for {b} images")
    w, h = int(out_size[0]), int(out_size[1])
    coord_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    if n == 0:
        return images.new_zeros(0, images.shape[1], h, w, dtype=out_dtype)
    fill_zero = not bool((torch.as_tensor(fill) != 0).any())
    if padding == "replicate" or (padding == "constant" and fill_zero):
        # Fast path: one affine_grid (a batched matmul) instead of building pixel coordinates.
        theta = _normalised_theta(mats.to(images.device), (w, h), (images.shape[3], images.shape[2]))
        grid = F.affine_grid(theta.to(coord_dtype), [n, images.shape[1], h, w], align_corners=False)
        out = _grid_sample(images, grid, image_index, "zeros" if padding == "constant" else "border")
        return out.to(out_dtype)
    coords = _source_coords(invert(mats.to(images.device, torch.float64)), (w, h), coord_dtype)
    return _sample(images, coords, image_index, padding, fill).to(out_dtype)


def unwarp(crops: Tensor, mats: Tensor, image_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Crops (N,C,h,w) back into image space (W, H) = image_size through their image->crop mats.

    Returns (images (N,C,H,W), mask (N,1,H,W) bool): mask is True where the image pixel maps
    inside the crop's area [-0.5, w-0.5] x [-0.5, h-0.5]; there the value is the bilinear sample
    of the crop (edge pixels replicated over the outer half pixel), elsewhere 0.
    """
    out_dtype = crops.dtype if crops.is_floating_point() else torch.float32
    if crops.dtype != torch.float64:
        crops = crops.float()
    n, c, h, w = crops.shape
    width, height = int(image_size[0]), int(image_size[1])
    coord_dtype = torch.float64 if crops.dtype == torch.float64 else torch.float32
    coords = _source_coords(mats.to(crops.device, torch.float64), (width, height), coord_dtype)
    out = _sample(crops, coords, torch.arange(n, device=crops.device), "replicate", 0)
    x, y = coords[..., 0], coords[..., 1]
    mask = ((x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5))[:, None]
    return (out * mask).to(out_dtype), mask


def warp_labels(labels: Tensor, mats: Tensor, out_size: Sequence[int]) -> Tensor:
    """Class maps (N,h,w) of integer ids moved through (N,3,3) mats (their frame -> the output
    frame, pixel centres) into (N,H,W) = out_size (W, H): nearest sampling, so ids stay ids; 0
    (background) where the output pixel maps outside the map."""
    n, h, w = labels.shape
    if n == 0:
        return labels.new_zeros(0, int(out_size[1]), int(out_size[0]))
    theta = _normalised_theta(mats.to(labels.device, torch.float64), tuple(int(v) for v in out_size), (w, h))
    grid = F.affine_grid(theta.float(), [n, 1, int(out_size[1]), int(out_size[0])], align_corners=False)
    out = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out[:, 0].round().to(labels.dtype)
