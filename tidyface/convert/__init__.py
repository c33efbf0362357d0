"""Converters from upstream formats to tidyface state dicts, used by the weights store once."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable


def load_torch_file(path: Path) -> dict:
    """An upstream torch checkpoint, loaded with weights_only=True so a pickle cannot run code."""
    import torch

    from ..weights import WeightsError

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a loadable tensor checkpoint ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0][:160]}); replace it with the upstream file") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return dict(obj)


def rename_keys(state: dict, rules: Iterable[tuple[str, str]]) -> dict:
    """Apply regex (pattern, replacement) rules to every key, in order; auditable key maps."""
    rules = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in state.items():
        for pat, rep in rules:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def check_complete(state: dict, builder: Callable, source: str) -> dict:
    """The converted state dict (contiguous tensors, order kept) once it has exactly the model's
    keys and shapes; otherwise a ValueError naming the source file and the first differences."""
    import torch

    with torch.device("meta"):  # shapes only: no memory and no init cost
        want = {k: v.shape for k, v in builder().state_dict().items()}
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = [k for k in want if k in state and state[k].shape != want[k]]
    if missing or extra or wrong:
        raise ValueError(f"{source}: conversion does not match {builder.__name__}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")
    return {k: v.contiguous() for k, v in state.items()}
