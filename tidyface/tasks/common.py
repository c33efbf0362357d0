"""Shared plumbing of the tasks: device choice, a per-process model cache, decode-ahead reading."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..ops.image import ImageReadError, read_image


def resolve_device(device: str | None = None):
    """`None`/"auto" -> CUDA when present, else CPU."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cached_model(name: str, device, weights_dir=None):
    """A model ready for inference, loaded once per process: weights loaded by name (strict),
    then BatchNorm folded into the convolutions. device and weights_dir: str, torch.device or
    Path, as given."""
    # one cache key however the arguments are spelled (lru_cache keys f(a, b) and f(a, b, None) apart)
    return _load_for_inference(name, str(device), None if weights_dir is None else str(weights_dir))


@lru_cache(maxsize=8)
def _load_for_inference(name: str, device: str, weights_dir: str | None):
    import torch

    from ..ops.fuse import fuse_conv_bn
    from ..weights import load_model

    model = fuse_conv_bn(load_model(name, device=device, weights_dir=weights_dir))
    # oneDNN's depthwise and small convolutions are faster on channels-last weights (CPU)
    return model.to(memory_format=torch.channels_last) if model_device(model).type == "cpu" else model


def model_device(model):
    return next(model.parameters()).device


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
