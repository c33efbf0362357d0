"""Result containers shared by every task: tasks pass these, not dicts of loose arrays."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Detections:
    """Faces found in a batch of images, in input-image pixels.

    boxes (N,4) xyxy float32; scores (N,); landmarks (N,K,2) or None (K=5: left eye, right eye,
    nose, left mouth corner, right mouth corner, as seen in the image); image_index (N,) int64:
    which image of the batch each face belongs to.
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

    def shift_images(self, offset: int) -> "Detections":
        return replace(self, image_index=self.image_index + offset)

    @staticmethod
    def cat(parts: Sequence["Detections"]) -> "Detections":
        if not parts:
            return Detections.empty()
        lms = [p.landmarks for p in parts]
        return Detections(torch.cat([p.boxes for p in parts]), torch.cat([p.scores for p in parts]),
                          None if any(lm is None for lm in lms) else torch.cat(lms),
                          torch.cat([p.image_index for p in parts]))

    def to_records(self, num_images: int) -> list[list[dict]]:
        """Per image, a list of {"box", "score", "landmarks"} with plain Python floats."""
        out: list[list[dict]] = [[] for _ in range(num_images)]
        boxes, scores = self.boxes.tolist(), self.scores.tolist()
        lms = None if self.landmarks is None else self.landmarks.tolist()
        for k, i in enumerate(self.image_index.tolist()):
            rec = {"box": [round(v, 2) for v in boxes[k]], "score": round(scores[k], 5)}
            if lms is not None:
                rec["landmarks"] = [[round(x, 2), round(y, 2)] for x, y in lms[k]]
            out[i].append(rec)
        return out


@dataclass
class Faces:
    """Face crops cut from a batch of images, one per detection, with the geometry to go back.

    crops (N,C,h,w) float32 RGB 0..255; crop_mat (N,3,3) image -> crop (pixel-centre
    coordinates, as cv2.warpAffine uses); detections: the faces they were cut for (boxes,
    scores, landmarks in image pixels, image_index), row n of each belonging to crop n.
    """

    crops: Tensor
    crop_mat: Tensor
    detections: Detections

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    @property
    def image_index(self) -> Tensor:
        return self.detections.image_index

    def select(self, index: Tensor) -> "Faces":
        return Faces(self.crops[index], self.crop_mat[index], self.detections.select(index))

    def to(self, device) -> "Faces":
        return Faces(self.crops.to(device), self.crop_mat.to(device), self.detections.to(device))

    def landmarks_in_crop(self) -> Tensor | None:
        """The detection landmarks moved into crop coordinates (N,K,2)."""
        lm = self.detections.landmarks
        if lm is None:
            return None
        m = self.crop_mat.to(lm)
        return lm @ m[:, :2, :2].transpose(1, 2) + m[:, None, :2, 2]

    @staticmethod
    def cat(parts: Sequence["Faces"]) -> "Faces":
        return Faces(torch.cat([p.crops for p in parts]), torch.cat([p.crop_mat for p in parts]),
                     Detections.cat([p.detections for p in parts]))
