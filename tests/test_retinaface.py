"""RetinaFace: priors/codec vs upstream, converter, parity with facexlib (real MobileNet-0.25
weights on real photos; ResNet-50 on seeded random weights), landmark order, batching, resizing."""
import sys

import numpy as np
import pytest
import torch

import refshim
from conftest import MEDIA, WEIGHTS, need
from tidyface.models.retinaface import (MIN_SIZES, STEPS, VARIANCES, ResNet50Body, RetinaFace,
                                        convert_state_dict, postprocess, preprocess)
from tidyface.ops.image import read_image, to_tensor_batch
from tidyface.ops.nms import box_iou
from tidyface.ops.priors import decode_boxes, decode_landmarks, encode_boxes, prior_boxes
from tidyface.weights import load_model

refshim.install()
from facexlib.detection import retinaface as fx  # noqa: E402
from facexlib.detection import retinaface_utils as fxu  # noqa: E402

CFG = fx.generate_config("mobile0.25")


def _rgb(path):
    return read_image(need(path))


def _reference_mnet():
    sd = torch.load(need(WEIGHTS / "mobilenet0.25_Final.pth"), map_location="cpu", weights_only=True)
    ref = fx.RetinaFace(network_name="mobile0.25", half=False, phase="test", device="cpu")
    ref.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()}, strict=True)
    return ref.eval()


def _reference_detect(ref, rgb, threshold):
    """facexlib's single-image pipeline at full resolution: (N,15) = box, score, 10 landmark coords."""
    with torch.no_grad():
        return ref.detect_faces(np.ascontiguousarray(rgb[..., ::-1]), conf_threshold=threshold,
                                nms_threshold=0.4, use_origin_size=True)


@pytest.fixture(scope="module")
def mnet():
    return load_model("retinaface_mnet025")


@pytest.fixture(scope="module")
def ref_mnet():
    return _reference_mnet()


def test_priors_and_codec_match_upstream():
    for h, w in [(333, 500), (720, 1280), (17, 9)]:
        ours = prior_boxes(h, w, MIN_SIZES, STEPS)
        theirs = fxu.PriorBox(CFG, image_size=(h, w)).forward()
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    g = torch.Generator().manual_seed(0)
    priors = prior_boxes(96, 160, MIN_SIZES, STEPS)
    loc, lm = torch.randn(2, len(priors), 4, generator=g), torch.randn(2, len(priors), 10, generator=g)
    for b in range(2):
        assert torch.allclose(decode_boxes(loc[b], priors, VARIANCES),
                              fxu.decode(loc[b], priors, VARIANCES), atol=1e-6)
        assert torch.allclose(decode_landmarks(lm[b], priors, VARIANCES).flatten(-2),
                              fxu.decode_landm(lm[b], priors, VARIANCES), atol=1e-6)
    round_trip = encode_boxes(decode_boxes(loc, priors, VARIANCES), priors, VARIANCES)
    assert torch.allclose(round_trip, loc, atol=1e-4)


def test_preprocess_colour_order_mean_and_resize():
    img = torch.zeros(2, 3, 720, 1280)
    img[:, 0], img[:, 1], img[:, 2] = 10.0, 20.0, 30.0  # R, G, B
    x = preprocess(img)
    assert x.shape == img.shape
    assert x[0, :, 0, 0].tolist() == [30 - 104, 20 - 117, 10 - 123]  # B, G, R minus the BGR mean
    assert preprocess(img, max_size=640).shape == (2, 3, 360, 640)
    assert preprocess(img, max_size=2000).shape == img.shape  # never upscaled
    with pytest.raises(ValueError):
        preprocess(img[0])


def test_converter_maps_every_upstream_key(mnet):
    sd = torch.load(need(WEIGHTS / "mobilenet0.25_Final.pth"), map_location="cpu", weights_only=True)
    prefixed = {"module." + k: v for k, v in sd.items()}  # as saved from nn.DataParallel
    ours = convert_state_dict(prefixed)
    assert sorted(ours) == sorted(RetinaFace("mobilenet0.25").state_dict())
    assert all(torch.equal(ours[k], v) for k, v in mnet.state_dict().items())
    for k in ours:
        assert not any(s in k for s in ("ClassHead", "conv1x1", "output", "X")), k


@pytest.mark.parametrize("photo", ["insightface_wheel/t1.jpg", "dlib_faces_landmarks/2008_002470.jpg"])
def test_mnet025_parity_with_facexlib_real_photos(mnet, ref_mnet, photo):
    rgb = _rgb(MEDIA / photo)
    images = to_tensor_batch([rgb])
    with torch.no_grad():
        x = preprocess(images)
        loc, logits, lm = mnet(x)
        r_loc, r_prob, r_lm = ref_mnet(x)  # facexlib's test phase: softmax probabilities
        ref_mnet.phase = "train"
        r_logits = ref_mnet(x)[1]
        ref_mnet.phase = "test"
    for ours, theirs in [(loc, r_loc), (logits.softmax(-1), r_prob), (logits, r_logits), (lm, r_lm)]:
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-4

    det = mnet.detect(images, min_score=0.5, max_size=None)
    ref = _reference_detect(ref_mnet, rgb, 0.5)
    assert len(det) == len(ref) >= 6
    assert np.abs(det.boxes.numpy() - ref[:, :4]).max() <= 0.5
    assert np.abs(det.scores.numpy() - ref[:, 4]).max() <= 1e-4
    assert np.abs(det.landmarks.flatten(1).numpy() - ref[:, 5:]).max() <= 0.5


def test_landmark_order_on_real_photo(mnet):
    """Upstream's order, checked on upright faces: the eye and mouth corner on the image's left
    come first, then the ones on its right; the nose lies below the eyes and above the mouth."""
    det = mnet.detect(to_tensor_batch([_rgb(MEDIA / "insightface_wheel/t1.jpg")]))
    assert len(det) == 6
    lm = det.landmarks
    assert (lm[:, 0, 0] < lm[:, 1, 0]).all() and (lm[:, 3, 0] < lm[:, 4, 0]).all()
    eyes_y, mouth_y = lm[:, :2, 1].mean(1), lm[:, 3:, 1].mean(1)
    assert ((eyes_y < lm[:, 2, 1]) & (lm[:, 2, 1] < mouth_y)).all()
    inside = ((lm[..., 0] >= det.boxes[:, None, 0]) & (lm[..., 0] <= det.boxes[:, None, 2])
              & (lm[..., 1] >= det.boxes[:, None, 1]) & (lm[..., 1] <= det.boxes[:, None, 3]))
    assert inside.all()


def test_dogs_match_facexlib(mnet, ref_mnet):
    rgb = _rgb(MEDIA / "dlib_faces_landmarks/dogs.jpg")
    det = mnet.detect(to_tensor_batch([rgb]), max_size=None)  # facexlib runs at full resolution
    ref = _reference_detect(ref_mnet, rgb, 0.5)
    assert len(det) == len(ref)
    assert np.abs(det.boxes.numpy() - ref[:, :4]).max() <= 0.5
    assert np.abs(det.scores.numpy() - ref[:, 4]).max() <= 1e-4
    assert int((det.scores > 0.95).sum()) == int((ref[:, 4] > 0.95).sum()) == 2


def test_batched_detect_equals_single_images(mnet):
    a = _rgb(MEDIA / "dlib_faces_landmarks/2008_002470.jpg")[:332, :500]
    b = _rgb(MEDIA / "dlib_faces_landmarks/2008_007676.jpg")[:332, :500]
    both = mnet.detect(to_tensor_batch([a, b]))
    assert both.image_index.tolist() == sorted(both.image_index.tolist())
    for i, img in enumerate([a, b]):
        single, part = mnet.detect(to_tensor_batch([img])), both.for_image(i)
        assert len(single) == len(part) > 0
        assert torch.allclose(single.boxes, part.boxes, atol=1e-3)
        assert torch.allclose(single.landmarks, part.landmarks, atol=1e-3)


def test_resized_detection_returns_input_pixels(mnet):
    images = to_tensor_batch([_rgb(MEDIA / "insightface_wheel/t1.jpg")])  # 1280 x 886
    full = mnet.detect(images, max_size=None)
    small = mnet.detect(images, max_size=640)
    assert len(small) == len(full) == 6
    iou = box_iou(full.boxes, small.boxes)
    assert (iou.max(1).values > 0.75).all()


def test_postprocess_top_k_and_per_image_cap():
    h, w = 64, 96
    p = len(prior_boxes(h, w, MIN_SIZES, STEPS))
    g = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.zeros(2, p), torch.rand(2, p, generator=g) * 4 + 1], -1)
    loc, lm = torch.zeros(2, p, 4), torch.zeros(2, p, 10)
    # IoU threshold 1: nothing is suppressed, so the caps alone decide what is left.
    capped = postprocess(loc, logits, lm, (h, w), (h, w), min_score=0.5, nms_iou=1.0, max_per_image=7)
    assert capped.image_index.tolist() == [0] * 7 + [1] * 7
    for i in range(2):
        s = capped.for_image(i).scores
        assert torch.allclose(s, logits[i].softmax(-1)[:, 1].topk(7).values, atol=1e-6)
    top = postprocess(loc, logits, lm, (h, w), (h, w), min_score=0.5, nms_iou=1.0, pre_nms_top_k=5)
    assert top.image_index.tolist() == [0] * 5 + [1] * 5
    none = postprocess(loc, logits, lm, (h, w), (h, w), min_score=0.9999)
    assert len(none) == 0 and none.landmarks.shape == (0, 5, 2)


def test_resnet50_body_has_torchvision_parameter_count():
    # torchvision resnet50: 25,557,032 parameters, of which fc holds 2048*1000 + 1000.
    assert sum(p.numel() for p in ResNet50Body().parameters()) == 25_557_032 - 2_049_000


def test_r50_parity_with_facexlib_random_weights(monkeypatch):
    tv_models = sys.modules["torchvision.models"]
    if not hasattr(tv_models, "resnet50"):  # the stand-in torchvision has no models: lend ours
        monkeypatch.setattr(tv_models, "resnet50", lambda pretrained=False: ResNet50Body(), raising=False)
    torch.manual_seed(0)
    ref = fx.RetinaFace(network_name="resnet50", half=False, phase="train", device="cpu")
    with torch.no_grad():  # random BN statistics, so a mis-mapped BN tensor would show
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    ref.eval()
    upstream = {"module." + k: v for k, v in ref.state_dict().items()}  # Resnet50_Final.pth layout
    ours = RetinaFace("resnet50")
    ours.load_state_dict(convert_state_dict(upstream), strict=True)
    ours.eval()
    x = preprocess(torch.rand(2, 3, 72, 100, generator=torch.Generator().manual_seed(1)) * 255)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    for u, v in zip(a, b):
        assert u.shape == v.shape
        assert (u - v).abs().max() <= 1e-4


def test_uint8_frames_give_the_float_result(mnet):
    img = _rgb(MEDIA / "insightface_wheel/t1.jpg")
    a = mnet.detect(to_tensor_batch([img]))
    b = mnet.detect(to_tensor_batch([img], dtype=torch.uint8))
    assert len(a) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
