"""Attribute and mask groups of parsed faces, with face-crop-plus's semantics.

An attribute group (`--attr-groups "glasses=6;hat_no_glasses=18,-6"`) holds the faces on which
every positive class covers at least `share` of the crop and no negative class does; a face may
belong to several groups. A mask group (`--mask-groups "nose=10;eyes_and_brows=2,3,4,5"`) writes
each crop whose chosen classes cover at least `share` of it, with the 0/255 mask of those classes.
face-crop-plus counts pixels (more than 5 for an attribute, more than 10 for a mask, at 512 px);
a share of the crop does not change meaning with --output-size.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import UsageError
from ..options import GROUP_SHARE

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ClassGroup:
    """A named set of parser classes: `present` must all cover the share, `absent` none."""

    name: str
    present: tuple[int, ...]
    absent: tuple[int, ...] = ()


def _class_index(token: str, class_names: Sequence[str], flag: str, group: str) -> int:
    token = token.strip()
    sign = -1 if token.startswith("-") else 1
    body = token.lstrip("+-").strip()
    if body.isdigit():
        idx = int(body)
    elif body in class_names:
        idx = class_names.index(body)
    else:
        raise UsageError(f"{flag}: group {group!r}: {token!r} is neither a class index 0-"
                         f"{len(class_names) - 1} nor a class name ({', '.join(class_names)})")
    if not 0 <= idx < len(class_names):
        raise UsageError(f"{flag}: group {group!r}: class {idx} is outside 0-{len(class_names) - 1}")
    if sign < 0 and idx == 0:
        raise UsageError(f"{flag}: group {group!r}: write a negative index as -K with K >= 1")
    return sign * idx


def _as_mapping(value, flag: str) -> Mapping[str, Sequence]:
    """A dict, a JSON object (text or .json file), or "name=i,j;name2=k" text."""
    if isinstance(value, Mapping):
        return value
    text = str(value).strip()
    if text.endswith(".json") and not text.startswith("{"):
        path = Path(text)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"{flag}: cannot read {path} ({e.strerror or e})") from None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag}: not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{flag}: the JSON must be an object of name: [class, ...]")
        return obj
    out: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, eq, classes = part.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"{flag}: {part!r} is not name=classes (e.g. \"glasses=6;hat_no_glasses=18,-6\")")
        out[name.strip()] = [c for c in re.split(r"[,\s]+", classes.strip().strip("[]")) if c]
    return out


def read_groups(value, flag: str, class_names: Sequence[str], negatives: bool = True
                ) -> tuple[ClassGroup, ...]:
    """The groups of a flag value (see _as_mapping); names must be usable as folder names.
    Mask groups (negatives=False) refuse negative indices: a mask is made of present classes."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    groups = []
    for name, classes in _as_mapping(value, flag).items():
        name = str(name)
        if not _NAME.match(name) or name.endswith("_mask"):
            raise UsageError(f"{flag}: group name {name!r} must be letters, digits, _ . - and not "
                             "end in _mask (mask folders are named <group>_mask)")
        tokens = [classes] if isinstance(classes, (str, int)) else list(classes)
        idx = [_class_index(str(t), class_names, flag, name) for t in tokens]
        if not idx:
            raise UsageError(f"{flag}: group {name!r} lists no classes")
        if not negatives and any(i < 0 for i in idx):
            raise UsageError(f"{flag}: group {name!r}: a mask group takes classes to include only "
                             "(no negative indices)")
        present = tuple(i for i in idx if i >= 0)
        if not present and not negatives:
            raise UsageError(f"{flag}: group {name!r} lists no classes")
        groups.append(ClassGroup(name, present, tuple(-i for i in idx if i < 0)))
    return tuple(groups)


def check_share(share: float, flag: str = "--group-share") -> float:
    share = float(share)
    if not 0 < share < 1:
        raise UsageError(f"{flag} must be a share of the crop's pixels in (0, 1), got {share}")
    return share


def class_shares(masks: Tensor, num_classes: int) -> Tensor:
    """(N,C) share of each crop's pixels that carries each class, from (N,h,w) class maps."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1).long()
    counts = torch.zeros(n, num_classes, device=masks.device).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts / max(flat.shape[1], 1)


def attribute_members(shares: Tensor, groups: Sequence[ClassGroup], share: float) -> Tensor:
    """(N,G) bool: face n is in group g (every present class >= share, no absent class >= share)."""
    cols = []
    for g in groups:
        ok = torch.ones(shares.shape[0], dtype=torch.bool, device=shares.device)
        if g.present:
            ok &= (shares[:, list(g.present)] >= share).all(1)
        if g.absent:
            ok &= ~(shares[:, list(g.absent)] >= share).any(1)
        cols.append(ok)
    return torch.stack(cols, 1) if cols else torch.zeros(shares.shape[0], 0, dtype=torch.bool)


def group_masks(masks: Tensor, group: ClassGroup) -> Tensor:
    """(N,h,w) bool: the pixels of a mask group's classes."""
    return torch.isin(masks, torch.tensor(group.present, dtype=masks.dtype, device=masks.device))


@dataclass(frozen=True)
class Routing:
    """Where each parsed crop goes: attribute folders first, then mask folders inside each
    (face-crop-plus's layout). routes(masks) -> per face a list of (folder, mask or None)."""

    attr: tuple[ClassGroup, ...] = ()
    mask: tuple[ClassGroup, ...] = ()
    share: float = GROUP_SHARE
    num_classes: int = 19

    @property
    def active(self) -> bool:
        return bool(self.attr or self.mask)

    def routes(self, masks: Tensor) -> list[list[tuple[str, Tensor | None]]]:
        n = masks.shape[0]
        shares = class_shares(masks, self.num_classes)
        attr_in = attribute_members(shares, self.attr, self.share).cpu() if self.attr else None
        per_mask = [group_masks(masks, g) for g in self.mask]
        mask_ok = [(m.flatten(1).float().mean(1) >= self.share).cpu() for m in per_mask]
        out = []
        for k in range(n):
            bases = [g.name for j, g in enumerate(self.attr) if attr_in[k, j]] if self.attr else [""]
            if not self.mask:
                out.append([(b, None) for b in bases])
                continue
            out.append([(f"{b}/{g.name}" if b else g.name, per_mask[j][k])
                        for b in bases for j, g in enumerate(self.mask) if mask_ok[j][k]])
        return out
