"""Attribute and mask groups for face pictures already saved (video2faces' grouping stage).

Each saved picture is parsed on the parser's own crop (its template, from the face's 5 points
moved into the picture), so group membership is measured on the face the parser was trained
for, not on the picture's margins (video2faces' pictures are 1.5-2.2x the box). Class maps are
kept in the state folder, one PNG per face and parser, so regrouping with other groups parses
nothing again. Masks go back into the picture's pixels through the crop matrices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import InputError
from ..models.base import model_device
from ..ops.align import invert, transform_points, warp_labels
from ..ops.image import atomic_write_bytes, read_image
from ..types import Detections, FaceTable
from . import pipeline as pl
from .attributes import Routing

# (folder, mask 0/255 uint8 in the picture's pixels, or None) for each place a face goes
Routes = list[tuple[str, "np.ndarray | None"]]


def picture_detections(table: FaceTable, rows: np.ndarray) -> Detections:
    """The rows' boxes and points moved into their saved pictures (crop_mat: image -> picture)."""
    mats = torch.from_numpy(table.crop_mat[rows])
    lm = torch.from_numpy(table.landmarks[rows]).double()
    if lm.shape[1] == 0 or not torch.isfinite(lm).all():
        raise InputError("attribute and mask groups need each face's 5 points to parse it; the faces "
                         "were found by a detector that gives none (choose one that does, e.g. "
                         "--det-model retinaface_mnet025)")
    b = torch.from_numpy(table.boxes[rows]).double().reshape(-1, 2, 2)
    boxes = transform_points(b, mats).reshape(-1, 4)
    return Detections(boxes.float(), torch.from_numpy(table.scores[rows]),
                      transform_points(lm, mats).float(), torch.arange(len(rows)))


class PartSorter:
    """Routes saved face pictures into attribute / mask folders. `faces_dir` holds the
    pictures named by table.name; `cache_dir` the class maps of this parser."""

    def __init__(self, parser, routing: Routing, faces_dir: Path, cache_dir: Path, batch_size: int = 4):
        self.parser, self.routing, self.batch_size = parser, routing, batch_size
        self.faces_dir, self.cache_dir = faces_dir, cache_dir
        self.geometry = pl.parser_geometry(parser)

    def _cached(self, name: str) -> Path:
        return self.cache_dir / (Path(name).stem + ".png")

    def _class_maps(self, table: FaceTable, rows: np.ndarray, pictures: list[torch.Tensor],
                    dets: Detections) -> torch.Tensor:
        """(N,S,S) class maps on the parser's crops: read from the cache, or parsed and cached."""
        import cv2

        maps = [None] * len(rows)
        for k, i in enumerate(rows.tolist()):
            p = self._cached(str(table.name[i]))
            if p.is_file():
                maps[k] = torch.from_numpy(cv2.imread(str(p), cv2.IMREAD_UNCHANGED))
        todo = [k for k, m in enumerate(maps) if m is None]
        if todo:
            sel = torch.tensor(todo)
            faces = pl.align(pictures, dets.select(sel), self.geometry)
            parsed = pl.parse(self.parser, faces, self.batch_size).masks.cpu()
            for k, m in zip(todo, parsed):
                maps[k] = m
                ok, png = cv2.imencode(".png", m.numpy())
                atomic_write_bytes(self._cached(str(table.name[rows[k]])), png.tobytes())
        return torch.stack(maps)

    def routes(self, table: FaceTable, rows: np.ndarray) -> list[Routes]:
        """Per row, the folders it goes to and each mask group's mask in its picture."""
        if not len(rows):
            return []
        dev = model_device(self.parser)
        pictures = [pl.as_chw(read_image(self.faces_dir / str(table.name[i])), dev) for i in rows.tolist()]
        dets = picture_detections(table, rows).to(dev)
        maps = self._class_maps(table, rows, pictures, dets)
        to_picture = invert(self.geometry.matrices(dets)).cpu()
        out = []
        for k, face_routes in enumerate(self.routing.routes(maps)):
            h, w = pictures[k].shape[1:]
            placed = []
            for folder, mask in face_routes:
                if mask is not None:
                    mask = warp_labels(mask[None].to(torch.uint8), to_picture[k:k + 1], (w, h))[0]
                    mask = mask.numpy() * 255
                placed.append((folder, mask))
            out.append(placed)
        return out

    def chunks(self, table: FaceTable, rows: np.ndarray, size: int = 32) -> Iterator[tuple[np.ndarray, list[Routes]]]:
        """routes() over rows in chunks, so memory stays bounded on long runs."""
        for s in range(0, len(rows), size):
            part = rows[s:s + size]
            yield part, self.routes(table, part)
