"""MobileFaceNet: strict load of foamliu's weights, and verification on real aligned faces.

Faces are found by OpenCV's YuNet (a test-only reference detector), aligned with our umeyama +
warp onto ARCFACE_112 from the full-resolution photo, and embedded.
"""
import csv

import cv2
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from conftest import MEDIA, WEIGHTS, need
from tidyface.models import mobilefacenet as mfn
from tidyface.ops.align import ARCFACE_112, transform_points, umeyama, warp
from tidyface.ops.image import read_image
from tidyface.weights import load_model

PAIRS = MEDIA / "deepface_pairs"
CELEBRITIES = MEDIA / "facenet_pytorch" / "test_images"


@pytest.fixture(scope="module")
def model():
    need(WEIGHTS / "mobilefacenet.pt")
    return load_model("mobilefacenet")


@pytest.fixture(scope="module")
def yunet():
    onnx = need(WEIGHTS / "face_detection_yunet_2023mar.onnx")
    det = cv2.FaceDetectorYN.create(str(onnx), "", (320, 320), 0.5)

    def landmarks(rgb: np.ndarray, long_side: int = 640) -> np.ndarray:
        """5 points of the most confident face, in full-resolution pixel-centre coordinates.

        YuNet rows are box(4), right eye, left eye, nose, right mouth corner, left mouth corner
        (the person's right and left), score. The person's right eye is the one seen on the
        image's left, so for upright faces YuNet's order is already ours (smaller-x eye first);
        the callers assert that. YuNet is run on a downscaled copy (it misses very large faces).
        """
        h, w = rgb.shape[:2]
        s = min(1.0, long_side / max(h, w))
        sw, sh = round(w * s), round(h * s)
        small = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA) if s < 1 else rgb
        det.setInputSize((sw, sh))
        _, faces = det.detect(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        assert faces is not None and len(faces), "YuNet found no face"
        pts = faces[faces[:, 14].argmax(), 4:14].reshape(5, 2).astype(np.float64)
        return (pts + 0.5) * np.array([w / sw, h / sh]) - 0.5

    return landmarks


def align(images, landmarks):
    """(N,3,112,112) RGB 0..255 ArcFace crops cut from full-resolution RGB photos, + where the
    detected landmarks land in the crops."""
    crops, points = [], []
    for rgb in images:
        lm = landmarks(rgb)
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0], "eyes/mouth not in image-left-first order"
        mat = umeyama(torch.from_numpy(lm)[None], ARCFACE_112)
        crops.append(warp(torch.from_numpy(rgb).permute(2, 0, 1)[None], mat, None, (112, 112))[0])
        points.append(transform_points(torch.from_numpy(lm)[None], mat)[0])
    return torch.stack(crops), torch.stack(points)


@pytest.fixture(scope="module")
def pairs(yunet):
    with open(need(PAIRS / "master.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))  # file_x,file_y,Decision (Yes/No), CRLF line ends
    names = sorted({r[k] for r in rows for k in ("file_x", "file_y")})
    crops, _ = align([read_image(PAIRS / n) for n in names], yunet)
    index = {n: i for i, n in enumerate(names)}
    first = torch.tensor([index[r["file_x"]] for r in rows])
    second = torch.tensor([index[r["file_y"]] for r in rows])
    same = np.array([r["Decision"].strip() == "Yes" for r in rows])
    return crops, first, second, same


def test_strict_load_and_output(model):
    state = mfn.convert_foamliu({"mobilefacenet.pt": WEIGHTS / "mobilefacenet.pt"})
    upstream = torch.load(WEIGHTS / "mobilefacenet.pt", map_location="cpu", weights_only=True)
    assert len(state) == len(upstream) == len(model.state_dict()) == 307  # all mapped, none left over
    params = sum(v.numel() for k, v in upstream.items() if not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked")))
    assert sum(p.numel() for p in model.parameters()) == params == 999_936
    for ours, theirs in zip(state.values(), upstream.values()):  # the key map only renames
        assert torch.equal(ours, theirs)
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        emb = model(mfn.preprocess(x))
    assert emb.shape == (3, 128) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_preprocess():
    mean = torch.tensor(mfn.MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(mfn.STD).view(1, 3, 1, 1) * 255
    x = (mean + std).expand(2, 3, 112, 112)  # one standard deviation above the mean, per channel
    assert torch.allclose(mfn.preprocess(x), torch.ones(2, 3, 112, 112), atol=1e-6)
    assert torch.equal(mfn.preprocess(x.to(torch.uint8)), mfn.preprocess(x.to(torch.uint8).float()))
    with pytest.raises(ValueError, match="112"):
        mfn.preprocess(torch.zeros(1, 3, 160, 160))


def test_celebrities_align_and_embed(model, yunet):
    paths = sorted(p for p in need(CELEBRITIES).glob("*/*") if p.suffix.lower() in (".jpg", ".png"))
    assert len(paths) >= 4
    photos = [read_image(p) for p in paths]
    crops, points = align(photos, yunet)
    assert (points - ARCFACE_112.float()).abs().max() < 8  # fit residuals of real faces: a few px
    # The mirrored photo, detected and aligned on its own, shows the same person.
    flipped, _ = align([np.ascontiguousarray(p[:, ::-1]) for p in photos], yunet)
    with torch.no_grad():
        emb = model(mfn.preprocess(crops))
        emb_flip = model(mfn.preprocess(flipped))
    same = (emb * emb_flip).sum(1)
    cross = emb @ emb.T - torch.eye(len(paths)) * 2
    print("mirror cosines", same.numpy().round(3), "max cross-identity", float(cross.max()))
    assert same.min() > 0.8
    assert cross.max() < 0.5
    assert (same[:, None] > cross).all()


def test_deepface_pairs_verification(model, pairs):
    crops, first, second, same = pairs
    with torch.no_grad():
        emb = model(mfn.preprocess(crops))
    score = (emb[first] * emb[second]).sum(1).numpy()
    auc, best_acc, fold_acc = verification_metrics(score, same)
    print(f"{len(same)} pairs ({same.sum()} same): AUC {auc:.4f}, best-threshold accuracy {best_acc:.4f}, "
          f"10-fold accuracy {fold_acc:.4f}; mean cosine same {score[same].mean():.3f} "
          f"different {score[~same].mean():.3f}")
    assert auc >= 0.99 and fold_acc >= 0.97


def verification_metrics(score, same, folds=10):
    """ROC AUC (Mann-Whitney, ties count half), accuracy at the best threshold, and k-fold accuracy
    (threshold chosen on the other folds, evaluated on the held-out one)."""
    pos, neg = score[same], score[~same]
    auc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))

    def best_threshold(s, y):
        cands = np.r_[s, s.max() + 1e-6]
        accs = [((s >= t) == y).mean() for t in cands]
        return cands[int(np.argmax(accs))], max(accs)

    _, best_acc = best_threshold(score, same)
    order = np.random.default_rng(0).permutation(len(score))
    correct = 0
    for held in np.array_split(order, folds):
        train = np.setdiff1d(order, held)
        t, _ = best_threshold(score[train], same[train])
        correct += ((score[held] >= t) == same[held]).sum()
    return float(auc), float(best_acc), correct / len(score)


def bn_drift(bn: nn.BatchNorm2d, x: Tensor) -> tuple[float, float]:
    """How far a batch's input statistics are from a BatchNorm's running ones: mean over channels
    of |mean - running_mean| / running_sd, and median |log(var / running_var)|."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3))
    run_var = bn.running_var + bn.eps
    return (float(((mean - bn.running_mean).abs() / run_var.sqrt()).mean()),
            float((var.clamp(min=1e-12) / run_var).log().abs().median()))


def mean_drift_all_layers(model, x):
    drift = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: drift.append(bn_drift(mod, inp[0])[0]))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return float(np.mean(drift))


def test_preprocessing_and_activation_match_checkpoint_statistics(model, pairs):
    """The BatchNorm running statistics remember what the network saw in training: on real
    aligned faces, the right colour order, normalisation and activation reproduce them best.
    Each alternative is checked to be measurably worse, so this test can tell them apart."""
    crops = pairs[0]
    with torch.no_grad():
        def first_bn(x):
            return bn_drift(model.stem.bn, model.stem.conv(x))
        drift_rgb, logvar_imagenet = first_bn(mfn.preprocess(crops))
        drift_bgr, _ = first_bn(mfn.preprocess(crops.flip(1)))
        _, logvar_tf = first_bn((crops - 127.5) / 128)  # the other common convention
    relu = mfn.MobileFaceNet()
    relu.load_state_dict(model.state_dict())
    for name, mod in list(relu.named_modules()):
        if isinstance(mod, nn.ReLU6):
            parent, _, leaf = name.rpartition(".")
            setattr(relu.get_submodule(parent), leaf, nn.ReLU())
    x = mfn.preprocess(crops)
    all_relu6, all_relu = mean_drift_all_layers(model, x), mean_drift_all_layers(relu.eval(), x)
    print(f"first BN mean drift RGB {drift_rgb:.3f} BGR {drift_bgr:.3f}; first BN |log var ratio| "
          f"ImageNet {logvar_imagenet:.3f} (x-127.5)/128 {logvar_tf:.3f}; mean drift over all BNs "
          f"ReLU6 {all_relu6:.4f} ReLU {all_relu:.4f}")
    assert logvar_imagenet < 0.3 < 1.0 < logvar_tf
    assert drift_rgb < 0.7 * drift_bgr
    assert all_relu6 < 0.9 * all_relu
