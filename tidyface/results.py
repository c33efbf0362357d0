"""Reading results back: every command that writes faces writes the same FaceTable."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError
from .types import FaceTable


def read_faces(path: str | os.PathLike) -> FaceTable:
    """The faces of a result: an `embed` .npz, or a `group` or `video2faces` output folder (all
    its finished videos, in order). One row per face: source, frame, face index, box, score,
    landmarks, crop matrix (image -> saved picture), embedding, hash, quality (types.FaceTable)."""
    p = Path(path)
    if p.is_file():
        return FaceTable.load(p)
    state = p / ".tidyface"
    if (state / "faces.npz").is_file():
        return FaceTable.load(state / "faces.npz")
    manifest = state / "manifest.json"
    if manifest.is_file():
        videos = json.loads(manifest.read_text())["videos"]
        tables = [FaceTable.load(state / f"video_{k}.npz") for k, v in sorted(videos.items())
                  if v.get("status") == "done" and (state / f"video_{k}.npz").is_file()]
        return FaceTable.cat(tables) if tables else FaceTable.empty()
    raise InputError(f"{p}: not a tidyface result (an embed .npz, or a group or video2faces output folder)")
