"""Shared plumbing of the tasks: the model cache they use, warnings, decode-ahead reading."""
from __future__ import annotations

import functools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..cache import ModelCache, default_cache
from ..ops.image import ImageReadError, read_image


def cache_or_default(models: ModelCache | None) -> ModelCache:
    return default_cache() if models is None else models


def load_models(models: ModelCache | None, device, weights_dir, *names: str, precision: str = "float32") -> list:
    """Each named model from the cache (its network in `precision`: ModelCache.get), before any
    output is written (a run that cannot get its weights must not leave a half-made folder);
    WeightsError names the file and the fix."""
    from ..models.base import model_device
    from ..weights import WeightsError

    cache = cache_or_default(models)
    loaded, missing = [], []
    for name in names:  # every missing file is named at once, not one per run
        try:
            loaded.append(cache.get(name, device, weights_dir, precision))
        except WeightsError as e:
            missing.append(str(e))
    if missing:
        raise WeightsError(" | ".join(dict.fromkeys(missing)))
    if precision != "float32" and any(model_device(m).type == "cpu" for m in loaded):
        _warn_if_emulated_on_cpu(precision)
    return loaded


@functools.cache
def _warn_if_emulated_on_cpu(precision: str) -> None:
    from ..cache import cpu_has_bfloat16

    if precision == "float16":  # autocast runs it, but few CPUs have float16 arithmetic
        warn("--precision float16 on the CPU: about 10x slower than float32 (RetinaFace, measured); "
             "use --precision bfloat16 or float32 there")
    elif not cpu_has_bfloat16():
        warn("--precision bfloat16: this CPU has neither AVX512-BF16 nor AMX, so bfloat16 is "
             "emulated and slower than float32; use --precision float32 here")


def progress(total: int | None, unit: str, desc: str):
    """A progress bar on stderr (counts and rates), off when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=None, leave=False)


def warn(msg: str) -> None:
    print(f"tidyface: warning: {msg}", file=sys.stderr, flush=True)


def read_ahead(paths: Iterable[Path], workers: int = 2) -> Iterator[tuple[Path, np.ndarray | Exception]]:
    """Decode images on background threads (OpenCV releases the GIL) while the model runs;
    yields (path, image) or (path, error) in input order."""
    def load(p):
        try:
            return read_image(p)
        except ImageReadError as e:
            return e

    paths = list(paths)
    with ThreadPoolExecutor(workers) as pool:
        futures = []
        for p in paths:
            futures.append((p, pool.submit(load, p)))
            if len(futures) > 4 * workers:
                q, f = futures.pop(0)
                yield q, f.result()
        for q, f in futures:
            yield q, f.result()


def readable(paths: Iterable[Path], failed: list | None = None) -> Iterator[tuple[Path, np.ndarray]]:
    """The images of `paths` that decode, read ahead; each unreadable one is warned about by
    name (and appended to `failed`)."""
    for p, im in read_ahead(paths):
        if isinstance(im, Exception):
            warn(str(im))
            if failed is not None:
                failed.append(p)
        else:
            yield p, im


def background(items: Iterable, depth: int = 8) -> Iterator:
    """`items` produced on a thread (decoding releases the GIL) up to `depth` ahead; an error
    of the producer is raised here, after the items before it."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
