"""Result containers shared by every task: tasks pass these, not dicts of loose arrays."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass
class Detections:
    """Faces found in a batch of images, in input-image pixels.

    boxes (N,4) xyxy float32; scores (N,); landmarks (N,K,2) or None: K points per face in the
    markup of the model that gave them (K=5: left eye, right eye, nose, left mouth corner, right
    mouth corner, as seen in the image; 68, 98, 106: ops.markup), NaN rows for faces without
    points when parts are joined; image_index (N,) int64: which image of the batch each face
    belongs to.
    """

    boxes: Tensor
    scores: Tensor
    landmarks: Tensor | None
    image_index: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, device="cpu", num_landmarks: int | None = 5) -> "Detections":
        lm = None if num_landmarks is None else torch.zeros(0, num_landmarks, 2, device=device)
        return cls(torch.zeros(0, 4, device=device), torch.zeros(0, device=device), lm,
                   torch.zeros(0, dtype=torch.long, device=device))

    def select(self, index: Tensor) -> "Detections":
        """Subset by a boolean mask or an index tensor."""
        return Detections(self.boxes[index], self.scores[index],
                          None if self.landmarks is None else self.landmarks[index],
                          self.image_index[index])

    def for_image(self, i: int) -> "Detections":
        return self.select(self.image_index == i)

    def to(self, device) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device),
                          None if self.landmarks is None else self.landmarks.to(device),
                          self.image_index.to(device))

    def moved(self, offsets: Tensor) -> "Detections":
        """Boxes and points moved by (x, y) pixels: offsets (N,2), one per face, or (2,) for all
        (from an area's or a canvas's pixels into the image's)."""
        off = offsets.reshape(-1, 2)
        lm = None if self.landmarks is None else self.landmarks + off[:, None].to(self.landmarks)
        return Detections(self.boxes + off.repeat(1, 2).to(self.boxes), self.scores, lm, self.image_index)

    def shift_images(self, offset: int) -> "Detections":
        return replace(self, image_index=self.image_index + offset)

    @staticmethod
    def cat(parts: Sequence["Detections"]) -> "Detections":
        """Join detections; landmarks are kept when any part has them (NaN rows for the parts
        without), and parts with different point counts are refused."""
        if not parts:
            return Detections.empty()
        counts = {p.landmarks.shape[1] for p in parts if p.landmarks is not None}
        if len(counts) > 1:
            raise ValueError(f"cannot join detections with {sorted(counts)} landmarks per face")
        lm = None
        if counts:
            k = counts.pop()
            lm = torch.cat([p.landmarks if p.landmarks is not None
                            else p.boxes.new_full((len(p), k, 2), float("nan")) for p in parts])
        return Detections(torch.cat([p.boxes for p in parts]), torch.cat([p.scores for p in parts]),
                          lm, torch.cat([p.image_index for p in parts]))

    def five_points(self) -> Tensor | None:
        """(N,5,2) alignment points (the markup reduced to 5, ops.markup), NaN for faces without
        points; None when no face has any."""
        if self.landmarks is None or self.landmarks.shape[1] == 0:
            return None
        from .ops.markup import reduce_to_five

        lm = self.landmarks
        return lm if lm.shape[1] == 5 else reduce_to_five(lm).to(lm.dtype)

    def to_records(self, num_images: int) -> list[list[dict]]:
        """Per image, a list of {"box", "score", "landmarks"} with plain Python floats."""
        out: list[list[dict]] = [[] for _ in range(num_images)]
        boxes, scores = self.boxes.tolist(), self.scores.tolist()
        lms = None if self.landmarks is None else self.landmarks.tolist()
        for k, i in enumerate(self.image_index.tolist()):
            rec = {"box": [round(v, 2) for v in boxes[k]], "score": round(scores[k], 5)}
            if lms is not None and all(x == x for x, _ in lms[k]):  # NaN: no points
                rec["landmarks"] = [[round(x, 2), round(y, 2)] for x, y in lms[k]]
            out[i].append(rec)
        return out


@dataclass
class Faces:
    """Face crops cut from a batch of images, one per detection, with the geometry to go back,
    and what the steps after cropping add (models/base.py protocols, tasks/pipeline.py).

    crops (N,C,h,w) float32 RGB 0..255; crop_mat (N,3,3) image -> crop (pixel-centre
    coordinates, as cv2.warpAffine uses); detections: the faces they were cut for (boxes,
    scores, landmarks in image pixels, image_index), row n of each belonging to crop n.
    Added by later steps (None until then): embeddings (N,D) L2-normalised; hashes (N,) int64
    64-bit average hashes; quality (N,) float64 (face area x sharpness: which face of a
    duplicate set is kept); masks (N,h,w) uint8 class maps of a parser, in the crop's frame
    (ids index the parser's spec.meta.class_names).
    """

    crops: Tensor
    crop_mat: Tensor
    detections: Detections
    embeddings: Tensor | None = None
    hashes: Tensor | None = None
    quality: Tensor | None = None
    masks: Tensor | None = None

    _ROWS = ("crops", "crop_mat", "embeddings", "hashes", "quality", "masks")

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    @property
    def image_index(self) -> Tensor:
        return self.detections.image_index

    def _map(self, fn, dets: Detections) -> "Faces":
        cols = {k: (None if getattr(self, k) is None else fn(getattr(self, k))) for k in self._ROWS}
        return Faces(detections=dets, **cols)

    def select(self, index: Tensor) -> "Faces":
        return self._map(lambda t: t[index.to(t.device)], self.detections.select(index))

    def to(self, device) -> "Faces":
        return self._map(lambda t: t.to(device), self.detections.to(device))

    def landmarks_in_crop(self) -> Tensor | None:
        """The detection landmarks moved into crop coordinates (N,K,2)."""
        lm = self.detections.landmarks
        if lm is None:
            return None
        m = self.crop_mat.to(lm)
        return lm @ m[:, :2, :2].transpose(1, 2) + m[:, None, :2, 2]

    @staticmethod
    def empty(size: tuple[int, int], device="cpu") -> "Faces":
        """No faces, with crops of `size` (w, h)."""
        return Faces(torch.zeros(0, 3, size[1], size[0], device=device),
                     torch.zeros(0, 3, 3, dtype=torch.float64, device=device), Detections.empty(device))

    @staticmethod
    def cat(parts: Sequence["Faces"]) -> "Faces":
        cols = {}
        for k in Faces._ROWS:
            vals = [getattr(p, k) for p in parts]
            cols[k] = None if any(v is None for v in vals) else torch.cat(vals)
        return Faces(detections=Detections.cat([p.detections for p in parts]), **cols)


_TABLE_TEXT = ("name", "source")


@dataclass
class FaceTable:
    """One row per face, columns as numpy arrays on the CPU: the per-face results that `embed`,
    `group` and `video2faces` write (an .npz each) and `tidyface.read_faces` reads.

    name: the saved face picture, relative to its output folder ("" when none); source: the
    image or video the face is in; frame: its frame index in a video (-1 for photos);
    face_index: its position among the faces of that image or frame; boxes (N,4), scores (N,),
    landmarks (N,K,2) (NaN rows where a detector gave none; K=0 when none did), crop_mat (N,3,3)
    image -> saved picture; embeddings (N,D) (NaN rows: deferred, see video2faces); hash (N,)
    int64; quality (N,) float64; crop_index (N,): row in a video's deferred-crop file, or -1.
    """

    name: np.ndarray
    source: np.ndarray
    frame: np.ndarray
    face_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    crop_mat: np.ndarray
    embeddings: np.ndarray
    hash: np.ndarray
    quality: np.ndarray
    crop_index: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, dim: int = 0, num_landmarks: int = 5) -> "FaceTable":
        return cls.build(0, dim=dim, num_landmarks=num_landmarks)

    @classmethod
    def build(cls, n: int, *, dim: int = 0, num_landmarks: int = 5, **cols) -> "FaceTable":
        """A table of n rows from the given columns, the others filled with their 'absent'
        value ("" / -1 / NaN / identity crop matrix)."""
        base = {"name": np.full(n, "", dtype=object), "source": np.full(n, "", dtype=object),
                "frame": np.full(n, -1, np.int64), "face_index": np.arange(n, dtype=np.int64),
                "boxes": np.zeros((n, 4), np.float32), "scores": np.zeros(n, np.float32),
                "landmarks": np.full((n, num_landmarks, 2), np.nan, np.float32),
                "crop_mat": np.tile(np.eye(3), (n, 1, 1)), "embeddings": np.full((n, dim), np.nan, np.float32),
                "hash": np.zeros(n, np.int64), "quality": np.zeros(n, np.float64),
                "crop_index": np.full(n, -1, np.int64)}
        for k, v in cols.items():
            if k not in base:
                raise TypeError(f"FaceTable has no column {k!r}")
            base[k] = np.asarray(v, dtype=base[k].dtype if k not in _TABLE_TEXT else object)
        return cls(**base)

    @classmethod
    def from_faces(cls, faces: Faces, **cols) -> "FaceTable":
        """The rows of a batch of Faces (tensors moved to the CPU once); `cols` give the rest
        (name, source, frame, face_index, ...)."""
        d = faces.detections.to("cpu")
        lm = d.landmarks.float().numpy() if d.landmarks is not None else np.zeros((len(d), 0, 2), np.float32)
        own = {"boxes": d.boxes.float().numpy(), "scores": d.scores.float().numpy(), "landmarks": lm,
               "crop_mat": faces.crop_mat.to("cpu", torch.float64).numpy()}
        for k, col in (("embeddings", faces.embeddings), ("hash", faces.hashes), ("quality", faces.quality)):
            if col is not None:
                own[k] = col.cpu().numpy()
        dim = own["embeddings"].shape[1] if "embeddings" in own else 0
        return cls.build(len(d), dim=dim, num_landmarks=lm.shape[1], **own, **cols)

    def select(self, index) -> "FaceTable":
        return FaceTable(**{k: v[index] for k, v in self._columns().items()})

    def _columns(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @staticmethod
    def cat(parts: Sequence["FaceTable"]) -> "FaceTable":
        parts = [p for p in parts if len(p)] or list(parts[:1])
        if not parts:
            return FaceTable.empty()
        ks = {p.landmarks.shape[1] for p in parts}
        k = max(ks)
        if len(ks) > 1 and min(ks) != 0:
            raise ValueError(f"cannot join face tables with {sorted(ks)} landmarks per face")
        cols = {}
        for name in parts[0].__dataclass_fields__:
            vals = [getattr(p, name) for p in parts]
            if name == "landmarks":
                vals = [v if v.shape[1] == k else np.full((len(v), k, 2), np.nan, np.float32) for v in vals]
            cols[name] = np.concatenate(vals)
        return FaceTable(**cols)

    def save(self, path) -> None:
        """An .npz (written atomically; text columns as unicode arrays, no pickles)."""
        from .ops.image import atomic_path

        cols = {k: (v.astype(str) if k in _TABLE_TEXT else v) for k, v in self._columns().items()}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object keeps the name as given
            np.savez(fh, **cols)

    @classmethod
    def load(cls, path) -> "FaceTable":
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in cls.__dataclass_fields__ if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a tidyface face table (no {', '.join(missing)})")
            cols = {k: z[k] for k in cls.__dataclass_fields__}
        for k in _TABLE_TEXT:
            cols[k] = cols[k].astype(object)
        return cls(**cols)
