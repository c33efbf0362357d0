"""Landmarks as a step and a command: `tidyface landmarks` (JSON Lines with K points per face),
`tidyface.landmarks`, and crop with `--landmarks-model` in both modes; DECA's bbox crop (Medusa's
BboxCropModel: the square around the 68 points) from detected points, end to end with crop_mat.
"""
import json

import numpy as np
import pytest
import torch

from conftest import MEDIA, WEIGHTS, need, pypi_upstream
from tidyface import registry
from tidyface.errors import UsageError

PHOTO = MEDIA / "deepface_pairs" / "couple.jpg"


@pytest.fixture(scope="module")
def dlib68_weights():
    need(WEIGHTS / "mobilenet0.25_Final.pth")
    return pypi_upstream(registry.get("dlib68").spec)


def test_landmarks_command_prints_68_points(dlib68_weights, capsys, tmp_path):
    from tidyface.cli import main

    main(["landmarks", str(need(PHOTO)), "--out", str(tmp_path / "drawn")])
    (line,) = capsys.readouterr().out.splitlines()
    rec = json.loads(line)
    assert len(rec["faces"]) == 2
    for face in rec["faces"]:
        pts = np.array(face["landmarks"])
        x1, y1, x2, y2 = face["box"]
        assert pts.shape == (68, 2)
        inside = (pts[:, 0] >= x1 - 0.1 * (x2 - x1)) & (pts[:, 0] <= x2 + 0.1 * (x2 - x1))
        assert inside.all()  # the points belong to their own face's box
    assert (tmp_path / "drawn" / "couple.jpg").is_file()


def test_bbox_crop_from_detected_points_is_decas_square(dlib68_weights, tmp_path):
    """crop --landmarks-model dlib68 --crop-mode bbox == crop from a landmark file holding the
    same points (the procedure already checked against DECA's formula in test_crop)."""
    import tidyface
    from tidyface.tasks.crop import Cropper, run_crop

    det = tidyface.landmarks(str(need(PHOTO)))
    points = [det.landmarks[k].numpy().astype(np.float64) for k in range(len(det))]
    given = Cropper(224, crop_mode="bbox").crop(str(PHOTO), landmarks=points)
    out = tmp_path / "out"
    assert run_crop([str(PHOTO)], out, landmarks_model="dlib68", crop_mode="bbox", output_size="224") == 0
    records = json.loads((out / "crops.json").read_text())
    mats = torch.tensor([records[f"couple_{k}.jpg"]["matrix"] for k in range(len(det))], dtype=torch.float64)
    assert torch.allclose(mats, given.crop_mat.cpu(), atol=1e-6)
    # DECA's square: side 1.25 * 1.1 * mean extent of the points, centred on their box
    lo, hi = det.landmarks.double().amin(1), det.landmarks.double().amax(1)
    side = 1.25 * 1.1 * (hi - lo).sum(1) / 2
    assert torch.allclose(mats[:, 0, 0], 223 / side, rtol=1e-6)


def test_align_crop_uses_the_landmark_models_points(dlib68_weights, tmp_path):
    from tidyface.tasks.crop import run_crop

    out = tmp_path / "out"
    assert run_crop([str(need(PHOTO))], out, landmarks_model="dlib68", output_size="112") == 0
    rec = json.loads((out / "crops.json").read_text())["couple_0.jpg"]
    assert len(rec["landmarks"]) == 68
    with pytest.raises(UsageError, match="use one"):
        run_crop([str(PHOTO)], tmp_path / "o2", landmarks_model="dlib68", landmarks=str(tmp_path / "x.json"))
    with pytest.raises(UsageError, match="landmarks-model"):
        run_crop([str(PHOTO)], tmp_path / "o3", landmarks_model="retinaface_mnet025")
