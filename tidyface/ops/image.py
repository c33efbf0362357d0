"""Image io: decode once to RGB uint8, expand path arguments, batch same-size frames."""
from __future__ import annotations

import os
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
    """Atomic write (temp file + rename) of an RGB uint8 image; format from the extension."""
    import cv2

    path = Path(path)
    ext = path.suffix.lower() or ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
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


def to_tensor_batch(images: list[np.ndarray], device="cpu", dtype=None):
    """Stack same-size RGB uint8 images into a (B,3,H,W) tensor on device, 0..255: float32, or
    with dtype=torch.uint8 the 8-bit pixels themselves (4x less memory; the detectors take both)."""
    import torch

    arr = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2)
    return arr.to(torch.float32 if dtype is None else dtype)
