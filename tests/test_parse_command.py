"""`tidyface parse` and tidyface.parse: class maps per face on the parser's crop, colour pictures,
the classes moved back into the image, and parse.json's matrices that tie them together."""
import json

import numpy as np
import pytest
import torch

from conftest import MEDIA, WEIGHTS, need, pypi_upstream
from tidyface import registry
from tidyface.models.bisenet import CLASS_NAMES
from tidyface.ops.image import read_image

CLS = {n: i for i, n in enumerate(CLASS_NAMES)}


@pytest.fixture(scope="module")
def parser_weights():
    need(WEIGHTS / "mobilenet0.25_Final.pth")
    return pypi_upstream(registry.get("bisenet_celebamask").spec)


def test_parse_command_writes_maps_colours_and_image_classes(tmp_path, parser_weights):
    from tidyface.cli import main

    src = tmp_path / "in"
    src.mkdir()
    (src / "two.jpg").write_bytes(need(MEDIA / "face_recognition/two_people.jpg").read_bytes())
    out = tmp_path / "out"
    main(["parse", str(src), "--out", str(out), "--color", "--in-image"])
    records = json.loads((out / "parse.json").read_text())
    assert sorted(records) == ["two_0.png", "two_1.png"]
    image = read_image(src / "two.jpg")
    classes = read_image(out / "two_classes.png")[..., 0]
    assert classes.shape == image.shape[:2] and classes.max() <= 18
    for name, rec in records.items():
        labels = read_image(out / name)[..., 0]
        assert labels.shape == (512, 512)
        assert read_image(out / name.replace(".png", "_color.png")).shape == (512, 512, 3)
        # the nose tip (landmark 2) carries the nose class on the crop and in the image
        m = np.array(rec["matrix"])
        x, y = rec["landmarks"][2]
        cx, cy = (m @ [x, y, 1])[:2]
        assert labels[int(round(cy)), int(round(cx))] == CLS["nose"]
        assert classes[int(round(y)), int(round(x))] == CLS["nose"]
    assert read_image(out / "two_classes_color.png").shape == image.shape


def test_parse_api_returns_class_maps(parser_weights):
    import tidyface

    faces = tidyface.parse(str(need(MEDIA / "skimage/astronaut.png")))
    assert len(faces) == 1 and faces.masks.shape == (1, 512, 512) and faces.masks.dtype == torch.uint8
    share = torch.bincount(faces.masks.flatten().long(), minlength=19).float() / faces.masks.numel()
    assert share[CLS["skin"]] > 0.15 and share[CLS["hair"]] > 0.02
