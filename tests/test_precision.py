"""--precision: the networks under autocast (cache.in_precision), against float32 on the real
weights and photos where they are here, on random weights elsewhere. Floors are stated per
model; each test prints what it measured."""
import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import MEDIA, WEIGHTS, need, pypi_upstream
from tidyface import registry
from tidyface.cache import ModelCache, cpu_has_bfloat16, in_precision
from tidyface.models.yunet import HEADS
from tidyface.ops.fuse import fuse_conv_bn
from tidyface.ops.graphs import GraphForward, graphs_enabled
from tidyface.ops.image import read_image
from tidyface.tasks import pipeline as pl
from tidyface.weights import load_model

PHOTO = MEDIA / "facenet_pytorch" / "multiface.jpg"  # six faces of about 100-115 px


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return torch.from_numpy(read_image(need(PHOTO))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache()


def both(cache, name):
    return cache.get(name, "cpu"), cache.get(name, "cpu", precision="bfloat16")


def test_float32_leaves_the_model_as_loaded_and_each_precision_is_its_own_entry(cache):
    need(WEIGHTS / "mobilenet0.25_Final.pth")
    full, half = both(cache, "retinaface_mnet025")
    assert full is not half and cache.get("retinaface_mnet025", "cpu", precision="bfloat16") is half
    own = vars(full).get("forward")  # float32: the class's forward, as CPU graphs inside a stream
    if graphs_enabled():
        assert isinstance(own, GraphForward) and own.forward.__func__ is type(full).forward
    else:
        assert own is None
    assert "forward" in vars(half) and not isinstance(vars(half)["forward"], GraphForward)  # autocast
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, float16"):
        cache.get("retinaface_mnet025", "cpu", precision="half")


def test_a_model_whose_class_does_not_opt_in_stays_float32():
    model = load_model("centerface", pretrained=False)  # its boxes moved by 4% of a face in bfloat16
    assert in_precision(model, "bfloat16") is model and "forward" not in vars(model)


def test_the_network_computes_in_bfloat16_on_any_thread_and_returns_float32(cache, photo):
    need(WEIGHTS / "mobilenet0.25_Final.pth")
    _, half = both(cache, "retinaface_mnet025")
    seen = []
    hook = half.body.stage1[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.rand(1, 3, 64, 96) * 100
    try:
        with torch.inference_mode():
            here = half(x)
            with ThreadPoolExecutor(1) as pool:  # autocast is per thread: video2faces' workers
                there = pool.submit(lambda: torch.inference_mode()(half)(x)).result()
    finally:
        hook.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(t.dtype == torch.float32 for t in here)
    assert all(torch.equal(a, b) for a, b in zip(here, there))


def test_the_layers_a_model_keeps_in_float32_compute_in_float32():
    model = in_precision(load_model("yunet", pretrained=False).eval(), "bfloat16")
    seen, levels = {}, []
    model.backbone.model0.conv1.conv.register_forward_hook(lambda m, i, o: seen.update(backbone=o.dtype))
    level_heads = model._level_heads  # YuNet runs a level's heads as stacked convolutions

    def record(i, f):
        levels.append((i, f, level_heads(i, f)))
        return levels[-1][2]

    model._level_heads = record
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 64, 96) * 255)
        assert seen == {"backbone": torch.bfloat16} and len(levels) == 3
        for i, f, heads in levels:
            assert f.dtype == torch.bfloat16 and all(h.dtype == torch.float32 for h in heads)
            # each head unit on its own, as in_precision keeps it: float32 from the same map
            alone = [getattr(model, f"{name}_heads")[i](f) for name, _ in HEADS]
            assert all(a.dtype == torch.float32 and torch.allclose(a, h, atol=1e-5) for a, h in zip(alone, heads))
    assert all(t.dtype == torch.float32 for t in out)


def matched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of a (N,D), the row of b closest to it in max-abs distance."""
    return b[(a[:, None] - b[None]).abs().flatten(2).amax(-1).argmin(1)]


@pytest.mark.parametrize("name, weights", [("retinaface_mnet025", "mobilenet0.25_Final.pth"),
                                           ("scrfd_500m", "det_500m.onnx"),
                                           ("yunet", "face_detection_yunet_2023mar.onnx")])
def test_detectors_find_the_same_faces_within_1_percent_of_their_size(cache, photo, name, weights):
    need(WEIGHTS / weights)
    full, half = both(cache, name)
    with torch.inference_mode():
        a, b = full.detect(photo), half.detect(photo)
    assert len(a) == len(b) == 6
    size = (a.boxes[:, 2:] - a.boxes[:, :2]).amax(1, keepdim=True)
    box = ((a.boxes - matched(a.boxes, b.boxes)).abs() / size).max().item()
    points = ((a.landmarks - matched(a.landmarks, b.landmarks)).abs() / size[:, None]).max().item()
    score = (a.scores.sort().values - b.scores.sort().values).abs().max().item()
    print(f"{name} bfloat16 vs float32: boxes {100 * box:.2f}%, points {100 * points:.2f}% of the face, "
          f"scores {score:.4f}")
    assert box < 0.01 and points < 0.01 and score < 0.01


@pytest.fixture(scope="module")
def photo_faces(cache, photo):
    need(WEIGHTS / "mobilenet0.25_Final.pth")
    with torch.inference_mode():
        return photo, cache.get("retinaface_mnet025", "cpu").detect(photo)


@pytest.mark.parametrize("name, weights, floor", [("mobilefacenet", "mobilefacenet.pt", 0.995),
                                                   ("facenet_casia_tf", "graph_final.pb", 0.995)])
def test_encoders_embed_real_faces_alike(cache, photo_faces, name, weights, floor):
    need(WEIGHTS / weights)
    full, half = both(cache, name)
    photo, dets = photo_faces
    crops = pl.align([photo], dets, pl.encoder_geometry(full)).crops
    a, b = pl.encode(full, crops), pl.encode(half, crops)
    cos = (a * b).sum(1)
    print(f"{name} bfloat16 vs float32 on {len(crops)} faces: cosine min {cos.min():.5f}")
    assert b.dtype == torch.float32 and torch.allclose(b.norm(dim=1), torch.ones(len(b)), atol=1e-5)
    assert cos.min() >= floor


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean().item(), 1e-12))


@pytest.mark.parametrize("name, size", [("realesr_animevideov3_x4_ncnn", 96), ("realesrgan_x4plus_anime_ncnn", 64)])
def test_the_enhancers_restore_a_real_face_alike(cache, photo_faces, name, size):
    need(WEIGHTS / "realesrgan_ncnn")
    full, half = both(cache, name)
    photo, dets = photo_faces
    x0, y0 = dets.boxes[0, :2].int().tolist()
    face = photo[None, :, y0:y0 + size, x0:x0 + size]
    db = psnr(full.enhance(face), half.enhance(face))
    print(f"{name} bfloat16 vs float32 on a {size} px face: PSNR {db:.1f} dB")
    assert db >= 45


def test_the_parser_labels_real_faces_alike(cache, photo_faces):
    pypi_upstream(registry.get("bisenet_celebamask").spec)
    full, half = both(cache, "bisenet_celebamask")
    photo, dets = photo_faces
    crops = pl.align([photo], dets.select(torch.arange(2)), pl.parser_geometry(full)).crops.float()
    with torch.inference_mode():
        agree = (full.parse(crops).argmax(1) == half.parse(crops).argmax(1)).float().mean().item()
    print(f"bisenet_celebamask bfloat16 vs float32 on 2 faces: {100 * agree:.2f}% of pixels the same class")
    assert agree >= 0.98


@pytest.mark.parametrize("name, floor", [("dlib_resnet", 0.999), ("vit_anime_b16", 0.999)])
def test_encoders_without_weights_here_embed_alike_on_random_weights(name, floor):
    torch.manual_seed(0)
    full = fuse_conv_bn(load_model(name, pretrained=False)).eval()
    half = in_precision(copy.deepcopy(full), "bfloat16")
    w, h = full.spec.meta.input_size
    crops = torch.rand(4, 3, h, w) * 255
    cos = (pl.encode(full, crops) * pl.encode(half, crops)).sum(1)
    print(f"{name} (random weights) bfloat16 vs float32: cosine min {cos.min():.5f}")
    assert cos.min() >= floor


def test_gfpgan_restores_alike_on_random_weights():
    if not cpu_has_bfloat16():  # a 512 px GFPGAN forward took over 15 minutes emulated
        pytest.skip("bfloat16 is emulated on this CPU (no AVX512-BF16 or AMX): minutes instead of seconds")
    torch.manual_seed(0)
    full = load_model("gfpgan_v1p4", pretrained=False).eval()
    half = in_precision(copy.deepcopy(full), "bfloat16")
    face = torch.rand(1, 3, 512, 512) * 255
    with torch.inference_mode():
        db = psnr(full.enhance(face), half.enhance(face))
    print(f"gfpgan_v1p4 (random weights) bfloat16 vs float32: PSNR {db:.1f} dB")
    assert db >= 50


def test_the_flag_is_checked_up_front_and_reaches_the_cache(tmp_path, cache, capsys):
    from tidyface.errors import UsageError
    from tidyface.options import DetectOptions
    from tidyface.tasks.detect import run_detect

    with pytest.raises(UsageError, match="--precision must be one of float32, bfloat16, float16"):
        DetectOptions(precision="fp16")
    need(WEIGHTS / "mobilenet0.25_Final.pth")
    assert run_detect([str(need(PHOTO))], DetectOptions(precision="bfloat16"), cache) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) == 1
    assert any(key[0] == "retinaface_mnet025" and key[-1] == "bfloat16" for key in cache._models)


def test_video2faces_in_bfloat16_classifies_as_float32_does(tmp_path):
    """The whole video job in both precisions, face by face on the labelled Video_2 faces: every
    face that both runs keep goes to the same person, and bfloat16 loses at most 2 of float32's
    right faces (43/50), and those to the dedup only. Measured: 43/50 on AVX512-BF16 without AMX;
    41/50 with AMX, where bfloat16's boxes move two faces' crops, and with them their average
    hashes, into the dedup's reach, so the two count as duplicates, not as their person."""
    import test_video2faces as tv

    if not cpu_has_bfloat16():
        pytest.skip("bfloat16 is emulated on this CPU (no AVX512-BF16 or AMX): minutes instead of seconds")
    from tidyface import video_to_faces

    refs, faces = tv.refs_dir(tmp_path), {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        video_to_faces(str(need(tv.VIDEO2)), out_dir=str(out), group_mode="classify", ref_dir=str(refs),
                       enc_oth_thr=0.8, precision=precision)
        faces[precision] = {row: tp for row, tp in tv.labelled_by_truth(out).items() if tp[0] != "none"}
    right = {p: sum(t == g for t, g in f.values()) for p, f in faces.items()}
    both = faces["float32"].keys() & faces["bfloat16"].keys()
    moved = [(faces["float32"][r], faces["bfloat16"][r]) for r in sorted(both)
             if faces["float32"][r] != faces["bfloat16"][r]]
    print(f"video2faces classify, labelled faces to the right person: float32 {right['float32']}/"
          f"{len(faces['float32'])}, bfloat16 {right['bfloat16']}/{len(faces['bfloat16'])}; "
          f"changed (float32, bfloat16): {moved}")
    assert len(faces["bfloat16"]) >= 40
    assert all("duplicate" in (a[1], b[1]) for a, b in moved), moved
    assert right["bfloat16"] >= right["float32"] - 2


def test_float16_on_the_cpu_warns_once_that_it_is_slow(cache, capsys):
    from tidyface.tasks.common import _warn_if_emulated_on_cpu, load_models

    need(WEIGHTS / "mobilenet0.25_Final.pth")
    _warn_if_emulated_on_cpu.cache_clear()
    for _ in range(2):
        (model,) = load_models(cache, "cpu", None, "retinaface_mnet025", precision="float16")
    err = capsys.readouterr().err
    assert err.count("--precision float16 on the CPU") == 1 and "bfloat16 or float32" in err
    with torch.inference_mode():
        assert all(t.dtype == torch.float32 for t in model(torch.rand(1, 3, 32, 32)))
