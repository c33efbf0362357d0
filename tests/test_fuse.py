"""Folding BatchNorm into convolutions changes no model's outputs, and leaves no BatchNorm."""
import pytest
import torch

from conftest import MEDIA, need
from tidyface.ops.fuse import fuse_conv_bn
from tidyface.ops.image import read_image, to_tensor_batch
from tidyface.weights import load_model


def _batchnorms(model) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


# The registered models that carry BatchNorm at inference (facenet's converter folds its own,
# MTCNN has none): on the others fusing is the identity, and a test there could not fail.
@pytest.mark.parametrize("name", ["mobilefacenet", "retinaface_mnet025"])
def test_fused_model_gives_the_same_outputs(name):
    torch.manual_seed(0)
    plain, fused = load_model(name), fuse_conv_bn(load_model(name))
    assert _batchnorms(plain) > 0 and _batchnorms(fused) == 0
    if name.startswith("retinaface"):
        x = to_tensor_batch([read_image(need(MEDIA / "insightface_wheel/t1.jpg"))])
        a, b = plain.detect(x), fused.detect(x)
        assert len(a) == len(b) > 0 and (a.boxes - b.boxes).abs().max() < 1e-2
        assert (a.scores - b.scores).abs().max() < 1e-4
        raw_a, raw_b = plain(x[:, :, :320, :320] - 100), fused(x[:, :, :320, :320] - 100)
        assert max((p - q).abs().max().item() for p, q in zip(raw_a, raw_b)) < 1e-4
    else:
        w, h = plain.spec.meta.input_size
        crops = torch.rand(4, 3, h, w) * 255
        assert (plain.embed(crops) - fused.embed(crops)).abs().max() < 1e-5

