"""MTCNN: parity with facenet-pytorch's MTCNN on the same photos and weights."""
import numpy as np
import pytest
import torch

import refshim
from conftest import MEDIA, WEIGHTS, need
from tidyface.ops.image import read_image, to_tensor_batch
from tidyface.ops.nms import box_iou
from tidyface.weights import load_model

PHOTOS = ["insightface_wheel/t1.jpg", "dlib_faces_landmarks/bald_guys.jpg", "dlib_faces_landmarks/dogs.jpg",
          "facenet_pytorch/multiface.jpg", "skimage/astronaut.png"]


@pytest.fixture(scope="module")
def nets():
    refshim.install()
    from facenet_pytorch import MTCNN as RefMTCNN

    for f in ("pnet.pt", "rnet.pt", "onet.pt"):
        need(WEIGHTS / f)
    ref = RefMTCNN(keep_all=True, device="cpu")
    # The reference loads the copies inside its wheel: prove they are the same bytes we convert.
    for net, ours in (("pnet", "pnet.pt"), ("rnet", "rnet.pt"), ("onet", "onet.pt")):
        theirs = torch.load(WEIGHTS / ours, weights_only=True)
        for k, v in getattr(ref, net).state_dict().items():
            assert torch.equal(v, theirs[k])
    return ref, load_model("mtcnn")


@pytest.mark.parametrize("photo", PHOTOS)
def test_parity_with_facenet_pytorch(nets, photo):
    ref, ours = nets
    img = read_image(need(MEDIA / photo))
    boxes, probs, points = ref.detect(img, landmarks=True)
    det = ours.detect(to_tensor_batch([img]))
    n_ref = 0 if boxes is None else len(boxes)
    assert len(det) == n_ref
    if n_ref == 0:
        return
    boxes = torch.tensor(np.stack(boxes).astype(np.float32))
    iou = box_iou(boxes, det.boxes)
    match = iou.argmax(1)
    assert sorted(match.tolist()) == list(range(n_ref)), "one-to-one match"
    assert iou.max(1).values.min() >= 0.99
    assert (torch.tensor(np.stack(points).astype(np.float32)) - det.landmarks[match]).abs().max() <= 1.0
    assert (torch.tensor(np.array(list(probs), dtype=np.float32)) - det.scores[match]).abs().max() <= 1e-4


def test_batch_equals_single(nets):
    """A batch of frames gives exactly what each frame gives alone."""
    _, ours = nets
    img = read_image(need(MEDIA / "insightface_wheel/t1.jpg"))[::2, ::2].copy()
    frames = [img, img[:, ::-1].copy(), np.zeros_like(img)]
    batch = ours.detect(to_tensor_batch(frames))
    for i, f in enumerate(frames):
        alone = ours.detect(to_tensor_batch([f]))
        got = batch.for_image(i)
        assert len(got) == len(alone)
        order_a, order_b = alone.scores.argsort(), got.scores.argsort()
        assert torch.allclose(alone.boxes[order_a], got.boxes[order_b], atol=1e-3)
    assert len(batch.for_image(2)) == 0


def test_uint8_frames_give_the_float_result(nets):
    """`tidyface detect` hands the detectors 8-bit frames (4x less memory than float)."""
    _, ours = nets
    img = read_image(need(MEDIA / "facenet_pytorch/multiface.jpg"))
    a = ours.detect(to_tensor_batch([img]))
    b = ours.detect(to_tensor_batch([img], dtype=torch.uint8))
    assert len(a) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def test_pnet_outputs_match_the_reference_net(nets):
    """P-Net alone, on a channels-last input as the pyramid hands it: the face probability of
    every cell, and the box offsets that offsets_at computes only at the cells asked for."""
    ref, ours = nets
    torch.manual_seed(0)
    x = torch.rand(2, 3, 61, 87).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref_offsets, ref_prob = ref.pnet(x)
        prob, features = ours.pnet(x)
        image, row, col = (i.flatten() for i in torch.meshgrid(
            *(torch.arange(n) for n in prob.shape), indexing="ij"))
        offsets = ours.pnet.offsets_at(features, image, row, col)
    assert (prob - ref_prob[:, 1]).abs().max() <= 1e-5
    assert (offsets - ref_offsets.permute(0, 2, 3, 1).reshape(-1, 4)).abs().max() <= 1e-5


def test_prelu_channels_last_is_prelu():
    from tidyface.models.mtcnn import prelu_channels_last

    torch.manual_seed(0)
    weight = torch.randn(10)
    for x in (torch.randn(2, 10, 7, 9).contiguous(memory_format=torch.channels_last), torch.randn(2, 10, 7, 9)):
        y = prelu_channels_last(x, weight)
        assert torch.equal(y, torch.nn.functional.prelu(x, weight))
        assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
