"""What the Python API takes as an image: RGB 0..255 in every common container, or one clear
InputError line naming what was given (ops.image.as_rgb_uint8 / as_rgb_batch)."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MEDIA, need
from tidyface import Cropper, ModelCache, detect
from tidyface.errors import InputError
from tidyface.ops.image import as_rgb_batch, as_rgb_uint8, read_image

MODEL = "retinaface_mnet025"


@pytest.fixture(scope="module")
def astronaut():
    return read_image(need(MEDIA / "skimage/astronaut.png"))


@pytest.fixture(scope="module")
def models():
    return ModelCache()


@pytest.fixture(scope="module")
def reference(astronaut, models):
    d = detect(astronaut, model=MODEL, models=models)
    assert len(d) == 1, "the astronaut photo has one face"
    return d


def same(a, b):
    assert a.image_index.tolist() == b.image_index.tolist()
    assert torch.allclose(a.boxes, b.boxes, atol=1e-4) and torch.allclose(a.scores, b.scores, atol=1e-6)
    assert torch.allclose(a.landmarks, b.landmarks, atol=1e-4)


# Each kind: (name, image -> the input). All hold the astronaut's RGB pixels exactly.
ACCEPTED = {
    "uint8 HWC array": lambda a: a,
    "path str": lambda a: str(MEDIA / "skimage/astronaut.png"),
    "path Path": lambda a: MEDIA / "skimage/astronaut.png",
    "float32 0..255": lambda a: a.astype(np.float32),
    "float64 0..255": lambda a: a.astype(np.float64),
    "float16 0..255": lambda a: a.astype(np.float16),
    "int64 0..255": lambda a: a.astype(np.int64),
    "RGBA array": lambda a: np.dstack([a, np.full(a.shape[:2], 77, np.uint8)]),
    "non-contiguous view": lambda a: np.ascontiguousarray(a[:, ::-1])[:, ::-1],
    "tensor CHW uint8": lambda a: torch.from_numpy(a).permute(2, 0, 1),
    "tensor CHW float32": lambda a: torch.from_numpy(a).permute(2, 0, 1).float(),
    "tensor CHW float64": lambda a: torch.from_numpy(a).permute(2, 0, 1).double(),
    "tensor HWC uint8": lambda a: torch.from_numpy(a),
    "tensor CHW bfloat16": lambda a: torch.from_numpy(a).permute(2, 0, 1).to(torch.bfloat16),
    "tensor CHW int16": lambda a: torch.from_numpy(a).permute(2, 0, 1).to(torch.int16),
    "PIL RGB": lambda a: Image.fromarray(a),
    "PIL RGBA": lambda a: Image.fromarray(a).convert("RGBA"),
}


@pytest.mark.parametrize("kind", ACCEPTED)
def test_accepted_single_images_detect_as_the_uint8_array(kind, astronaut, models, reference):
    image = ACCEPTED[kind](astronaut)
    assert np.array_equal(as_rgb_uint8(image), astronaut)
    same(detect(image, model=MODEL, models=models), reference)


@pytest.mark.parametrize("kind", ["uint8 HWC array", "float64 0..255", "tensor CHW uint8", "PIL RGB",
                                  "path str"])
def test_lists_and_tuples_of_any_kind(kind, astronaut, models, reference):
    image = ACCEPTED[kind](astronaut)
    d = detect((np.zeros((64, 80, 3), np.uint8), image), model=MODEL, models=models)
    assert d.image_index.tolist() == [1]
    same(d.shift_images(-1), reference)


def test_grey_arrays_become_three_equal_channels(astronaut, models):
    grey = astronaut[:, :, 1]
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    want = detect(rgb, model=MODEL, models=models)
    assert len(want) == 1
    for image in (grey, grey[:, :, None], grey.astype(np.float32), torch.from_numpy(grey)[None],
                  Image.fromarray(grey)):
        assert np.array_equal(as_rgb_uint8(image), rgb)
        same(detect(image, model=MODEL, models=models), want)


@pytest.mark.parametrize("batch", ["numpy BHWC", "tensor BCHW"])
def test_a_4d_array_or_tensor_is_a_batch(batch, astronaut, models, reference):
    stack = np.stack([astronaut, astronaut])
    images = stack if batch == "numpy BHWC" else torch.from_numpy(stack).permute(0, 3, 1, 2).double()
    d = detect(images, model=MODEL, models=models)
    assert d.image_index.tolist() == [0, 1]
    same(d.select(torch.tensor([0])), reference)


def test_float_rounds_half_up_and_keeps_the_uint8_array_uncopied(astronaut):
    assert as_rgb_uint8(astronaut) is astronaut
    assert as_rgb_uint8(np.array([[[0.4, 127.5, 254.6]]])).tolist() == [[[0, 128, 255]]]
    assert as_rgb_uint8(np.zeros((4, 4, 3), np.float32)).max() == 0  # black is not "0..1"


def test_cropper_takes_a_single_image_of_any_kind(astronaut, models):
    cropper = Cropper(112, models=models, det_model=MODEL)
    want = cropper.crop([astronaut])
    assert len(want) == 1
    for image in (astronaut, torch.from_numpy(astronaut).permute(2, 0, 1).float(), Image.fromarray(astronaut),
                  np.stack([astronaut])):
        got = cropper.crop(image)
        assert torch.equal(got.crops, want.crops) and got.image_index.tolist() == [0]
    with pytest.raises(InputError, match=r"images\[0\] holds floats in 0\.\.1"):
        cropper.crop([astronaut / 255.0])


def _one_line(e: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg, (n, msg)
    return msg


# Each refused kind: (input, what the message must name).
REFUSED = {
    "float 0..1": (lambda a: a / 255.0, ["0..1", "x * 255", "(512, 512, 3)", "float64"]),
    "tensor float 0..1": (lambda a: torch.from_numpy(a).permute(2, 0, 1) / 255.0,
                          ["0..1", "x * 255", "(3, 512, 512)", "float32"]),
    "NaN": (lambda a: np.where(a > 200, np.nan, a.astype(np.float32)), ["NaN", "float32"]),
    "inf": (lambda a: np.full((8, 8, 3), np.inf), ["infinite", "(8, 8, 3)"]),
    "above 255": (lambda a: a.astype(np.float32) * 2, ["0..255", "float32"]),
    "uint16 65535": (lambda a: a.astype(np.uint16) * 257, ["0..255", "uint16"]),
    "bool": (lambda a: a > 128, ["(512, 512, 3)", "bool"]),
    "complex": (lambda a: a.astype(np.complex64), ["complex64"]),
    "object": (lambda a: np.empty((4, 4, 3), object), ["(4, 4, 3)", "object"]),
    "two channels": (lambda a: a[:, :, :2], ["(512, 512, 2)", "HxWx3"]),
    "CHW numpy": (lambda a: a.transpose(2, 0, 1).copy(), ["(3, 512, 512)", "transpose(1, 2, 0)"]),
    "1-D": (lambda a: a.ravel(), ["(786432,)", "uint8"]),
    "5-D": (lambda a: a[None, None], ["(1, 1, 512, 512, 3)"]),
    "empty": (lambda a: a[:0], ["empty", "(0, 512, 3)"]),
    "bool tensor": (lambda a: torch.zeros(3, 8, 8, dtype=torch.bool), ["(3, 8, 8)", "bool"]),
    "nested list": (lambda a: [a.tolist()], ["list"]),
    "number": (lambda a: 3, ["int"]),
    "None": (lambda a: None, ["NoneType"]),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_refused_kinds_are_one_input_error_line(kind, astronaut, models):
    make, names = REFUSED[kind]
    with pytest.raises(InputError) as e:
        detect(make(astronaut), model=MODEL, models=models)
    _one_line(e, *names)


# The detectors' own batched call.
BATCH_ACCEPTED = {
    "uint8 BCHW": lambda b: b[None],
    "float32 BCHW": lambda b: b[None].float(),
    "float64 BCHW": lambda b: b[None].double(),
    "float16 BCHW": lambda b: b[None].half(),
    "uint8 CHW": lambda b: b,
}


@pytest.fixture(scope="module")
def chw(astronaut):
    return torch.from_numpy(astronaut).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("kind", BATCH_ACCEPTED)
@pytest.mark.parametrize("name", [MODEL, "mtcnn"])
def test_model_detect_takes_batches_of_any_float(kind, name, chw, models):
    net = models.get(name)
    want = net.detect(chw[None])
    assert len(want) == 1
    same(net.detect(BATCH_ACCEPTED[kind](chw)), want)


def test_model_batch_check_costs_no_copy_for_uint8_and_float32(chw):
    for t in (chw[None], chw[None].float()):
        assert as_rgb_batch(t) is t
    assert as_rgb_batch(chw).data_ptr() == chw.data_ptr()


BATCH_REFUSED = {
    "float 0..1": (lambda b: b[None] / 255.0, ["0..1", "x * 255", "(1, 3, 512, 512)"]),
    "channels last": (lambda b: b.permute(1, 2, 0)[None], ["(1, 512, 512, 3)", "permute(0, 3, 1, 2)"]),
    "int32": (lambda b: b[None].int(), ["(1, 3, 512, 512)", "int32"]),
    "bool": (lambda b: b[None] > 0, ["bool"]),
    "numpy": (lambda b: b[None].numpy(), ["numpy array", "uint8"]),
    "2-D": (lambda b: b[0], ["(512, 512)"]),
    "NaN": (lambda b: torch.full((1, 3, 16, 16), float("nan")), ["NaN", "(1, 3, 16, 16)"]),
}


@pytest.mark.parametrize("kind", BATCH_REFUSED)
@pytest.mark.parametrize("name", [MODEL, "mtcnn"])
def test_model_detect_refuses_other_batches(kind, name, chw, models):
    make, names = BATCH_REFUSED[kind]
    with pytest.raises(InputError) as e:
        models.get(name).detect(make(chw))
    _one_line(e, *names)


def test_to_bgr_swaps_red_and_blue_in_every_layout(astronaut):
    from tidyface.ops.resize import to_bgr

    frames = np.stack([astronaut, astronaut[::-1].copy(), astronaut[:, ::-1].copy()])
    nhwc = torch.from_numpy(frames).permute(0, 3, 1, 2)  # channels last, as decoded frames are
    bgr = torch.from_numpy(frames[..., ::-1].copy()).permute(0, 3, 1, 2)
    cases = [(nhwc, bgr), (nhwc[1:, :, 50:90], bgr[1:, :, 50:90]), (nhwc[:0], bgr[:0]),  # cv2's path
             (nhwc.contiguous(), bgr), (nhwc[..., ::2], bgr[..., ::2]), (nhwc.float(), bgr.float())]
    for images, want in cases:
        got = to_bgr(images)
        assert got.dtype == images.dtype and torch.equal(got, want)
        assert torch.equal(to_bgr(got), images)  # its own inverse
    assert to_bgr(nhwc).permute(0, 2, 3, 1).is_contiguous()  # cv2 writes channels last too


@pytest.mark.parametrize("hw", [(360, 640), (517, 301), (900, 1600)])  # shrink, odd sizes, enlarge
def test_bilinear_resize_of_8_bit_frames_is_cv2s(astronaut, hw):
    import cv2

    from tidyface.ops.resize import resize_bilinear

    frames = np.stack([astronaut, astronaut[::-1].copy()])
    nhwc = torch.from_numpy(frames).permute(0, 3, 1, 2)  # as frames come from numpy
    want = torch.from_numpy(np.stack([cv2.resize(f, hw[::-1], interpolation=cv2.INTER_LINEAR) for f in frames]))
    want = want.permute(0, 3, 1, 2).float()
    for images in (nhwc, nhwc.contiguous()):  # either memory layout
        got = resize_bilinear(images, hw)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    # the float path (other devices, float input) stays within a grey level of cv2's pixels
    floats = resize_bilinear(nhwc.float(), hw)
    assert floats.shape == want.shape and (floats - want).abs().max() <= 1.0
    assert torch.equal(resize_bilinear(nhwc, nhwc.shape[-2:]), nhwc.float())  # same size: a cast
