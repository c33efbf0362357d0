"""Landmark markups: 5, 68 (iBUG 300-W), 98 (WFLW) and 106 (insightface 2d106det) points per
face, and their reduction to the 5 alignment points.

Facts: iBUG 300-W 68-point markup (Sagonas et al., 300 Faces in-the-Wild, 2013); WFLW 98-point
markup (Wu et al., "Look at Boundary", CVPR 2018); insightface 2d106det markup
(deepinsight/insightface alignment/coordinate_reg README, image 2d106markup.jpg in
nttstar/insightface-resources), cross-checked with iperov/DeepFaceLive's reordering of 2d106det output.
"""
from __future__ import annotations

import numpy as np

# Output order: left eye, right eye, nose tip, left mouth corner, right mouth corner, as seen in
# the image (left = smaller x). Each entry lists the source points averaged into that point.
REDUCTIONS: dict[int, tuple[tuple[int, ...], ...]] = {
    5: ((0,), (1,), (2,), (3,), (4,)),
    # iBUG 300-W: eye contours 36-41 / 42-47 (no pupil points), nose tip 30, mouth corners 48, 54.
    68: (tuple(range(36, 42)), tuple(range(42, 48)), (30,), (48,), (54,)),
    # WFLW: pupils 96 / 97, nose tip 54, mouth corners 76, 82.
    98: ((96,), (97,), (54,), (76,), (82,)),
    # insightface 2d106det: eye rings 33-42 / 87-96 each with two points drawn on the pupil
    # (34 and 38; 88 and 92), nose tip 86, outer mouth corners 52, 61.
    106: ((34, 38), (88, 92), (86,), (52,), (61,)),
}
SUPPORTED_COUNTS = tuple(REDUCTIONS)


def reduction_matrix(num_points: int) -> np.ndarray:
    """(5, K) averaging weights: five_points = W @ points."""
    if num_points not in REDUCTIONS:
        raise ValueError(f"{num_points} landmarks per face is not a supported markup "
                         f"(supported: {', '.join(map(str, SUPPORTED_COUNTS))})")
    w = np.zeros((5, num_points))
    for row, idx in enumerate(REDUCTIONS[num_points]):
        w[row, list(idx)] = 1.0 / len(idx)
    return w


def reduce_to_five(points):
    """(..., K, 2) points of a supported markup -> (..., 5, 2); numpy arrays or torch tensors."""
    k = points.shape[-2]
    w = reduction_matrix(k)
    if isinstance(points, np.ndarray):
        return np.einsum("fk,...kc->...fc", w, points.astype(np.float64))
    import torch

    wt = torch.as_tensor(w, dtype=points.dtype if points.is_floating_point() else torch.float64,
                         device=points.device)
    return torch.einsum("fk,...kc->...fc", wt, points.to(wt.dtype))
