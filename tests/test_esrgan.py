"""Real-ESRGAN / BSRGAN enhancers (tidyface/models/esrgan.py) and tiled inference (ops/tiles.py).

Parity: the ncnn runtime (PyPI `ncnn`, test-only, float16 storage and arithmetic switched off so
it computes in float32 from the float16-stored weights, as our conversion does) runs the authors'
own .param/.bin on crops of real photos; tidyface runs the same files converted. Measured max abs
differences on 0..1 outputs (the crops below, 2 CPU threads): animevideov3 x4 1.5e-6, x3 5.5e-6
(the bicubic 0.75 resize), x2 1.3e-6, x4plus-anime 1.3e-5, x4plus 2.3e-6; asserted: <= 1e-4
(DESIGN.md's fp32 parity).
The .pth releases are not here: stand-ins in their upstream layouts (esrgan_standins.py) convert
and load strictly. Tiling: SRVGGNetCompact's receptive radius is 18 input pixels (18 3x3 convs at
input resolution), so tiles overlapping by 18 give the untiled output to float rounding; by 4 they
visibly do not (the negative control).
"""
import numpy as np
import pytest
import torch

from tidyface.models.esrgan import RRDBNet, SRVGGNetCompact
from tidyface.ops.image import read_image
from tidyface.ops.tiles import enhance_tiled, tile_spans
from tidyface.registry import get
from tidyface.weights import load_model

import esrgan_standins
from conftest import MEDIA, WEIGHTS, need, reference

NCNN_DIR = WEIGHTS / "realesrgan_ncnn"
PARITY_TOL = 1e-4  # on 0..1 outputs: float16 weights are stored; both sides compute in float32


def _photo(name: str, box=None, size=None) -> np.ndarray:
    """A crop (y0, y1, x0, x1) of a shared photo, optionally area-resized to (w, h): RGB uint8."""
    import cv2

    img = read_image(need(MEDIA / name))
    if box is not None:
        img = img[box[0]:box[1], box[2]:box[3]]
    return np.ascontiguousarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA) if size else img)


FACE = ("skimage/astronaut.png", (100, 164, 180, 260), None)  # 64x80 px around the face
ANIME_FACE = ("tidy_torch_models/aniface1.jpg", None, (64, 64))  # a whole anime face, 64 px
# (model, its .param/.bin stem, input crop); x4plus (23 RRDBs, ~17 MMAC a pixel) on a 24x16 crop
PARITY = [
    ("realesr_animevideov3_x4_ncnn", "realesr-animevideov3-x4", ANIME_FACE),
    ("realesr_animevideov3_x3_ncnn", "realesr-animevideov3-x3", ANIME_FACE),
    ("realesr_animevideov3_x2_ncnn", "realesr-animevideov3-x2", FACE),
    ("realesrgan_x4plus_anime_ncnn", "realesrgan-x4plus-anime", ("tidy_torch_models/aniface2.jpg", None, (32, 24))),
    ("realesrgan_x4plus_ncnn", "realesrgan-x4plus", ("skimage/astronaut.png", (124, 140, 200, 224), None)),
]


def _ncnn_forward(stem: str, rgb01: np.ndarray) -> np.ndarray:
    ncnn = reference("ncnn")
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.opt.num_threads = 2
    assert net.load_param(str(need(NCNN_DIR / f"{stem}.param"))) == 0
    assert net.load_model(str(need(NCNN_DIR / f"{stem}.bin"))) == 0
    data = np.ascontiguousarray(rgb01, dtype=np.float32)  # (3,h,w); ncnn.Mat borrows it: keep it
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(data).clone())
    ret, out = ex.extract("output")
    assert ret == 0
    return np.array(out)


@pytest.mark.parametrize("name, stem, crop", PARITY, ids=[p[0] for p in PARITY])
def test_matches_the_ncnn_runtime_on_the_same_files(name, stem, crop):
    torch.set_num_threads(2)
    img = _photo(*crop)
    x = img.transpose(2, 0, 1).astype(np.float32) / 255  # Real-ESRGAN-ncnn-vulkan's input
    want = _ncnn_forward(stem, x)
    model = load_model(name)
    with torch.no_grad():
        got = model(torch.from_numpy(x)[None])[0].numpy()
    s = model.spec.meta.scale
    assert got.shape == want.shape == (3, img.shape[0] * s, img.shape[1] * s)
    diff = float(np.abs(got - want).max())
    print(f"{name} {img.shape[1]}x{img.shape[0]} -> x{s}: max abs diff {diff:.2e} on 0..1 outputs")
    assert diff <= PARITY_TOL
    if isinstance(model, SRVGGNetCompact):  # (a second run of an RRDBNet would double the time)
        # enhance: RGB 0..255 in, the same network, clamped to 0..255 out
        enhanced = model.enhance(torch.from_numpy(img).permute(2, 0, 1)[None])[0].numpy()
        assert float(np.abs(enhanced - np.clip(want, 0, 1) * 255).max()) <= 255 * PARITY_TOL


@pytest.mark.parametrize("name", sorted(esrgan_standins.STAND_INS))
def test_pth_release_layouts_convert_and_load_strictly(name, tmp_path):
    entry = get(name)
    (f,) = entry.spec.files
    path = tmp_path / f.filename
    esrgan_standins.STAND_INS[name](path)
    ckpt = torch.load(path, weights_only=True)
    upstream = ckpt.get("params_ema", ckpt.get("params", ckpt))
    state = entry.spec.converter({f.filename: path})
    assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in upstream.values())
    model = entry.builder()
    model.load_state_dict(state, strict=True)
    # the tensors land where the upstream names say, e.g. the first conv and the last
    first = upstream["conv_first.weight" if "conv_first.weight" in upstream else "body.0.weight"]
    torch.testing.assert_close(next(model.parameters()), first, rtol=0, atol=0)


def test_x2plus_takes_odd_sizes_and_pixel_unshuffles():
    with torch.device("meta"):
        assert get("realesrgan_x2plus").builder().stem.in_channels == 12  # 3 x 2 x 2 after unshuffling
    model = RRDBNet(num_blocks=1, scale=2).eval()  # one block: the padding, not the trunk, is tested
    img = torch.from_numpy(_photo(*FACE)[:5, :7]).permute(2, 0, 1)[None]
    out = model.enhance(img)  # reflect-padded to 6x8, cropped back
    assert out.shape == (1, 3, 10, 14)
    with torch.no_grad():
        padded = torch.nn.functional.pad(img.float() / 255, (0, 1, 0, 1), mode="reflect")
        torch.testing.assert_close(out, model(padded)[..., :10, :14].clamp(0, 1) * 255)


@pytest.mark.parametrize("length, tile, overlap", [(96, 56, 18), (51, 50, 20), (200, 64, 0), (30, 64, 8)])
def test_tile_spans_cover_once_with_the_overlap_inside(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    size = min(tile, length)
    assert [a for _, a, _ in spans] == [0] + [b for _, _, b in spans[:-1]] and spans[-1][2] == length
    for start, a, b in spans:
        assert 0 <= start and start + size <= length and start <= a < b <= start + size
        assert start == 0 or a - start >= overlap  # inner edges keep `overlap` of real context
        assert start + size == length or start + size - b >= overlap


def test_tiled_equals_untiled_srvgg_on_a_real_photo():
    torch.set_num_threads(2)
    model = load_model("realesr_animevideov3_x4_ncnn")
    assert model.receptive_radius == 18  # 1 + 16 body + 1 subpixel 3x3 convs at input resolution
    img = torch.from_numpy(_photo("skimage/astronaut.png", (60, 140, 170, 250))).permute(2, 0, 1)[None]
    full = model.enhance(img.float())
    tiled = enhance_tiled(model, img.float(), tile=64, overlap=model.receptive_radius, batch=4)
    diff = float((tiled - full).abs().max())
    print(f"tiled (64 px, overlap 18) vs untiled, 80x80 -> 320x320: max abs diff {diff:.2e} on 0..255")
    assert diff <= 1e-3  # float rounding only (convolutions of other sizes sum in other orders)
    # the negative control: 48 px windows, 4 px overlap, split at 40: 8 px of context < 18
    assert tile_spans(80, 48, 4) == [(0, 0, 40), (32, 40, 80)]
    seams = float((enhance_tiled(model, img.float(), tile=48, overlap=4) - full).abs().max())
    print(f"overlap 4 (< the receptive radius): max abs diff {seams:.2f}")
    assert seams > 1.0
    as_uint8 = enhance_tiled(model, img, tile=80)  # uint8 in, uint8 out (rounded); one window
    assert as_uint8.dtype == torch.uint8
    assert int((as_uint8.int() - full.round().int()).abs().max()) == 0
