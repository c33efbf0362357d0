"""Image io: decode once to RGB uint8, expand path arguments, batch same-size frames."""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import InputError

RESULT_RECORD = Path(".tidyface") / "owner.json"  # what tasks/outdir.py writes into every result folder
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pgm", ".ppm"}


class ImageReadError(InputError):
    """An input that is not a readable image; the message names the file."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H,W,3). EXIF orientation applied; grey and alpha images become RGB."""
    import cv2

    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, FIFO or device would hang or mislead
        raise ImageReadError(f"{path}: not a regular file")
    try:
        data = np.fromfile(path, dtype=np.uint8)  # works for non-ASCII paths, unlike cv2.imread
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror})") from None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ImageReadError(f"{path}: not a readable image (empty, truncated or not an image format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    """Atomic write (temp file + rename) of an RGB (h,w,3) or grey (h,w) uint8 image; format from
    the extension."""
    import cv2

    path = Path(path)
    ext = path.suffix.lower() or ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode {ext} images")
    atomic_write_bytes(path, buf.tobytes())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to: renamed onto `path` when the block succeeds,
    removed when it fails, so nobody ever sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def expand_paths(paths: Iterable[str | os.PathLike], exts=IMAGE_EXTS) -> Iterator[Path]:
    """Images named directly, found recursively in folders (sorted), or listed in .txt files
    (one path per line, relative to the list's folder; blank lines and # comments skipped).
    Folders that hold a tidyface result (`.tidyface/owner.json`) are not searched: a run never
    reads an earlier run's output as its input."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(_images_under(p, exts))
        elif p.suffix.lower() == ".txt" and p.is_file():
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    yield q if q.is_absolute() else p.parent / q
        else:
            yield p


def _images_under(folder: Path, exts) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if (here / RESULT_RECORD).is_file():
            dirs.clear()
            continue
        dirs[:] = [d for d in dirs if d != RESULT_RECORD.parts[0]]
        for name in files:
            q = here / name
            if q.suffix.lower() in exts and q.is_file():  # is_file: regular files (no FIFOs)
                yield q


def check_crops(images, size: int, what: str):
    """A model's fixed-size input: RGB (B,3,size,size) crops, else a ValueError naming the model
    (`what`: "MobileFaceNet takes RGB", ...) and the shape it got."""
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"{what} (B,3,{size},{size}) crops, got {tuple(images.shape)}")
    return images


def normalise(x, mean, std):
    """(x / 255 - mean) / std per channel of a (B,3,H,W) float tensor, mean and std on 0..1
    (the torchvision ToTensor + Normalize that ImageNet-trained networks were fed)."""
    import torch

    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - m) / s


def to_tensor_batch(images: list[np.ndarray], device="cpu", dtype=None):
    """Stack same-size RGB uint8 images into a (B,3,H,W) tensor on device, 0..255: float32, or
    with dtype=torch.uint8 the 8-bit pixels themselves (4x less memory; the detectors take both)."""
    import torch

    arr = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2)
    return arr.to(torch.float32 if dtype is None else dtype)


# ----------------------------------------------------------------------------- in-memory inputs

ACCEPTED_IMAGE = ("a path, a PIL image, a numpy array HxWx3 (or HxW grey, HxWx4 with alpha) or a "
                  "tensor CxHxW / HxWx3, RGB, uint8 or float in 0..255")
ACCEPTED_BATCH = "a tensor (B,3,H,W) or (3,H,W), RGB, uint8 or float in 0..255"


def _describe(x) -> str:
    """One phrase naming what was given: its type, shape and dtype."""
    if isinstance(x, np.ndarray):
        return f"numpy array of shape {x.shape}, dtype {x.dtype}"
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:  # a torch tensor (or another array type)
        return f"{type(x).__name__} of shape {tuple(shape)}, dtype {str(dtype).replace('torch.', '')}"
    return f"{type(x).__module__}.{type(x).__qualname__}".replace("builtins.", "")


def as_rgb_uint8(image, what: str = "image") -> np.ndarray:
    """Any image the Python API accepts -> (H,W,3) RGB uint8 numpy, C-contiguous.

    Accepted: a path (str or PathLike, decoded by read_image); a PIL image (converted to RGB); a
    numpy array HxWx3 RGB, HxW or HxWx1 grey (-> 3 equal channels) or HxWx4 (alpha dropped); a
    torch tensor CxHxW (torch's layout, C = 1, 3 or 4) or HxWxC, on any device. Pixels are uint8,
    or float (any precision) or another integer type holding 0..255; floats are rounded. A
    uint8 HxWx3 C-contiguous array is returned as it is (no copy). Anything else raises
    InputError, one line naming what was given (shape, dtype) and what is accepted.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    arr, given = _as_array(image, what), _describe(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        hint = ""
        if arr.ndim == 4:
            hint = " (a batch: pass a list of images, or the batch to tidyface.detect / Cropper.crop)"
        elif arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and isinstance(image, np.ndarray):
            hint = " (a CxHxW numpy array: pass x.transpose(1, 2, 0))"
        raise InputError(f"{what} must be {ACCEPTED_IMAGE}; got {given}{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{what} is empty: {given}")
    if arr.dtype.kind not in "uif":  # bool, complex, object, strings, records
        raise InputError(f"{what} must be {ACCEPTED_IMAGE}; got {given}")
    if arr.dtype != np.uint8:
        arr = _pixels_to_uint8(arr, what, given)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)  # no copy when it already is (torch.from_numpy needs positive strides)


def _as_array(image, what: str) -> np.ndarray:
    """A PIL image, tensor (CxHxW read as HxWxC) or numpy array as a numpy array."""
    pil = sys.modules.get("PIL.Image")  # not imported: the object cannot be a PIL image
    if pil is not None and isinstance(image, pil.Image):
        arr = np.asarray(image.convert("RGB"))
        return arr if arr.flags.writeable else arr.copy()  # torch.from_numpy warns on read-only arrays
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # CxHxW, torch's layout
            t = t.permute(1, 2, 0)
        if t.dtype == torch.bool or t.is_complex():
            raise InputError(f"{what} must be {ACCEPTED_IMAGE}; got {_describe(image)}")
        try:
            return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()  # numpy has no bfloat16
        except TypeError:  # a dtype numpy lacks (float8, ...)
            raise InputError(f"{what} must be {ACCEPTED_IMAGE}; got {_describe(image)}") from None
    if isinstance(image, np.ndarray):
        return image
    raise InputError(f"{what} must be {ACCEPTED_IMAGE}; got {_describe(image)}")


def _pixels_to_uint8(arr: np.ndarray, what: str, given: str) -> np.ndarray:
    lo, hi = (float(v) for v in (arr.min(), arr.max()))  # NaN propagates into both
    floats = arr.dtype.kind == "f"
    if floats and not np.isfinite([lo, hi]).all():
        raise InputError(f"{what} holds NaN or infinite values: {given}")
    # Refused rather than accepted with a warning: a 0..1 float image scaled as 0..255 is a
    # near-black frame in which every detector silently finds no faces, and a warning is easily
    # lost in a batch job. A real 0..255 image whose brightest pixel is <= 1 is black in all but
    # name, so the rule rejects nothing the detectors could use.
    if floats and 0 < hi <= 1.0 and lo >= -0.5:
        raise InputError(f"{what} holds floats in 0..1 (max {hi:.3g}), but images must be RGB "
                         f"0..255: pass (x * 255) instead; got {given}")
    if lo < -0.5 or hi > 255.5:  # half a level either side rounds into range
        raise InputError(f"{what} must hold RGB values in 0..255, found {lo:.4g}..{hi:.4g}: {given}")
    return (np.clip(arr, 0, 255) + 0.5 if floats else arr).astype(np.uint8)  # round half up, as to_uint8


def image_list(images, what: str = "images") -> tuple[Iterable, bool]:
    """The images of an API call and whether one image was given alone: a single image of any
    kind as_rgb_uint8 accepts becomes [image]; a 4-D numpy array or tensor is a batch (split on
    its first axis); a list or tuple is copied into a list, another iterable returned as it is
    (lazy). Nothing is converted yet; anything that is neither raises InputError."""
    torch = sys.modules.get("torch")
    pil = sys.modules.get("PIL.Image")
    if isinstance(images, (str, os.PathLike)) or (pil is not None and isinstance(images, pil.Image)):
        return [images], True
    if isinstance(images, np.ndarray) or (torch is not None and isinstance(images, torch.Tensor)):
        return (list(images), False) if images.ndim == 4 else ([images], True)
    if isinstance(images, (list, tuple)):
        return list(images), False
    try:
        iter(images)
    except TypeError:
        raise InputError(f"{what} must be an image ({ACCEPTED_IMAGE}) or a list of them; "
                         f"got {_describe(images)}") from None
    return images, False  # an iterator stays lazy: its images are read one at a time


def as_rgb_batch(images, what: str = "images"):
    """A detector's batch -> a (B,3,H,W) tensor the network can use, RGB 0..255: uint8 and
    float32 as they are (no copy; the usual input costs nothing), float64/float16/bfloat16 cast
    to float32, (3,H,W) given a batch axis (a view). Anything else raises InputError, one line
    naming the shape and dtype.

    A float batch is checked on a sparse grid of about 16k of its values (no copy, and below
    torch's threading grain, so no wake-up of the thread pool: ~0.1 ms for 8 1080p frames): one
    in 0..1, or holding NaN there, is refused; the full batch is read only to confirm a refusal."""
    import torch

    if not isinstance(images, torch.Tensor):
        raise InputError(f"{what} must be {ACCEPTED_BATCH}; got {_describe(images)}")
    t = images[None] if images.ndim == 3 else images
    if t.ndim != 4 or t.shape[1] != 3 or t.shape[2] == 0 or t.shape[3] == 0:
        hint = " (channels last: pass x.permute(0, 3, 1, 2))" if t.ndim == 4 and t.shape[3] == 3 else ""
        raise InputError(f"{what} must be {ACCEPTED_BATCH}; got {_describe(images)}{hint}")
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise InputError(f"{what} must be {ACCEPTED_BATCH}; got {_describe(images)}")
    if t.dtype != torch.float32:
        t = t.float()
    if t.shape[0]:
        step = max(1, math.isqrt(t.numel() // 16384))
        hi = float(t[:, :, ::step, ::step].amax())
        if not hi <= 1.0:  # the usual case: some pixel above 1 (NaN also lands here)
            if hi != hi:
                raise InputError(f"{what} holds NaN values: {_describe(images)}")
            return t
        hi = float(t.amax())
        if 0 < hi <= 1.0 and float(t.amin()) >= -0.5:
            raise InputError(f"{what} holds floats in 0..1 (max {hi:.3g}), but images must be RGB "
                             f"0..255: pass (x * 255) instead; got {_describe(images)}")
    return t
