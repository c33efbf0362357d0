"""Folding BatchNorm into convolutions changes no model's outputs."""
import pytest
import torch

from conftest import MEDIA, need
from tidyface.ops.fuse import fuse_conv_bn
from tidyface.ops.image import read_image, to_tensor_batch
from tidyface.weights import load_model


@pytest.mark.parametrize("name", ["mobilefacenet", "retinaface_mnet025", "facenet_casia_tf", "mtcnn"])
def test_fused_model_gives_the_same_outputs(name):
    torch.manual_seed(0)
    plain, fused = load_model(name), fuse_conv_bn(load_model(name))
    if name.startswith("retinaface"):
        x = to_tensor_batch([read_image(need(MEDIA / "insightface_wheel/t1.jpg"))])
        a, b = plain.detect(x), fused.detect(x)
        assert len(a) == len(b) and (a.boxes - b.boxes).abs().max() < 1e-2
        assert (a.scores - b.scores).abs().max() < 1e-4
        raw_a, raw_b = plain(x[:, :, :320, :320] - 100), fused(x[:, :, :320, :320] - 100)
        assert max((p - q).abs().max().item() for p, q in zip(raw_a, raw_b)) < 1e-4
    elif name == "mtcnn":
        x = to_tensor_batch([read_image(need(MEDIA / "skimage/astronaut.png"))])
        assert torch.allclose(plain.detect(x).boxes, fused.detect(x).boxes)
    else:
        s = plain.spec.preprocess["input_size"]
        crops = torch.rand(4, 3, s, s) * 255
        assert (plain.embed(crops) - fused.embed(crops)).abs().max() < 1e-5
    if name in ("mobilefacenet", "retinaface_mnet025"):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
