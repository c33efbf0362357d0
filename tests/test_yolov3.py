"""YOLOv3 face detector (tidyface/models/yolov3.py): the darknet .cfg/.weights reader
(tidyface/convert/darknet.py), parity with pytorchyolo 1.8.0 (test-only, --no-deps) on the same
random .weights, the letterbox, and the store's handling of a file without a known sha256.

The real yolov3-wider_16000.weights is not in ../shared, so both sides load one random .weights
file (seeded, darknet 0.2 header) for the face cfg that this file writes itself (the layer list
of sthanhng/yoloface's cfg/yolov3-face.cfg, which the converter also accepts: 75 convolutional
layers, 61,576,342 floats). Measured on t1.jpg letterboxed to 256 px (256x192), 2 CPU threads:
raw head maps max abs diff 0.0 (both run the same torch kernels on NCHW input), asserted <= 1e-4;
through `detect` and pytorchyolo's own decode + non_max_suppression (score > 0.6, IoU 0.4) both
keep the same 17 boxes, max corner difference 0.0 px, scores 0.0 (the strides are powers of two,
so (cell + sigmoid) * stride and cell * stride + sigmoid * stride round alike); asserted <= 0.5 px
and 1e-5. (With a channels-last forward, once tried in `detect`, the raw maps differed by up to
4.5e-6 and the boxes by 1.0e-2 px: these random weights give boxes up to ~2000 px wide.)
STAND_INS writes yolov3_wider's two files (the cfg, a zero-filled .weights of the right length)
for tests/test_models.py's converter check.
"""
import hashlib
import os
import sys
import types

import numpy as np
import pytest
import torch

from conftest import MEDIA, need, reference
from tidyface import registry, weights
from tidyface.convert.darknet import DarknetError, conv_layers, parse_cfg, read_weights
from tidyface.models.yolov3 import (YOLOv3, convert_darknet, darknet_layout, letterbox,
                                    letterbox_size)
from tidyface.ops.image import read_image
from tidyface.registry import UpstreamFile, WeightSpec

PARITY_TOL = 1e-4  # raw head maps (DESIGN.md fp32 parity)
BOX_TOL = 0.5  # px, boxes after decode + NMS
SIDE = 256  # the letterbox side of the parity photo: a 416 forward costs ~33 GMAC on 2 cores
# Above it the random weights of seed 1 leave 17 boxes after NMS, their scores >= 6e-4 apart, so
# float rounding (another kernel order) cannot reorder them (at 0.5: 253 boxes, 2e-7 apart)
MIN_SCORE = 0.6
COCO_ANCHORS = "10,13, 16,30, 33,23, 30,61, 62,45, 59,119, 116,90, 156,198, 373,326"
SPEC = registry.get("yolov3_wider").spec


# -- the face cfg and a random .weights for it, written here from darknet's documented layout ----

def face_cfg(anchors: str = COCO_ANCHORS, classes: int = 1) -> str:
    """yolov3-face.cfg's layers: Darknet-53, then per level 6 alternating 1x1 / 3x3 convs and a
    linear 1x1 conv to 3 * (5 + classes), routes back to layers 61 and 36. The [net] section has
    what pytorchyolo's create_modules reads."""
    out = ["[net]", "batch=1", "subdivisions=1", "width=416", "height=416", "channels=3",
           "momentum=0.9", "decay=0.0005", "learning_rate=0.001", "burn_in=1000",
           "max_batches = 500200", "policy=steps", "steps=400000,450000", "scales=.1,.1"]

    def conv(filters, size, stride=1, bn=True, act="leaky"):
        out.extend(["", "[convolutional]"] + (["batch_normalize=1"] if bn else [])
                   + [f"filters={filters}", f"size={size}", f"stride={stride}", "pad=1", f"activation={act}"])

    conv(32, 3)
    for blocks, c in zip((1, 2, 8, 8, 4), (64, 128, 256, 512, 1024)):
        conv(c, 3, 2)  # downsample
        for _ in range(blocks):
            conv(c // 2, 1)
            conv(c, 3)
            out.extend(["", "[shortcut]", "from=-3", "activation=linear"])
    for level, (c, mask) in enumerate(((512, "6,7,8"), (256, "3,4,5"), (128, "0,1,2"))):
        if level:
            out.extend(["", "[route]", "layers = -4"])
            conv(c, 1)
            out.extend(["", "[upsample]", "stride=2", "", "[route]", f"layers = -1, {(61, 36)[level - 1]}"])
        for _ in range(3):
            conv(c, 1)
            conv(2 * c, 3)
        conv(3 * (5 + classes), 1, bn=False, act="linear")
        out.extend(["", "[yolo]", f"mask = {mask}", f"anchors = {anchors}", f"classes={classes}", "num=9",
                    "jitter=.3", "ignore_thresh = .5", "truth_thresh = 1", "random=1"])
    return "\n".join(out) + "\n"


def random_weights(seed: int = 1, version=(0, 2, 0)) -> bytes:
    """A .weights for the face cfg: header, then per conv in cfg order (BN: bias, scale, mean,
    variance; else bias), then its weights. Scales keep the activations of the 75 random layers
    in range and spread the head logits (seed 1: 864 of t1.jpg's 3024 scores above 0.5 at 256 px)."""
    rng = np.random.default_rng(seed)
    with torch.device("meta"):
        shapes = YOLOv3().state_dict()
    seen = np.array([64000], "<i8" if version[0] * 10 + version[1] >= 2 else "<i4")
    parts = [np.array(version, "<i4").tobytes(), seen.tobytes()]
    for kind, name, detail in darknet_layout():
        if kind != "convolutional":
            continue
        bn = detail[3]
        shape = tuple(shapes[f"{name}.conv.weight" if bn else f"{name}.weight"].shape)
        n, fan_in = shape[0], int(np.prod(shape[1:]))
        w = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) / np.float32(np.sqrt(fan_in))
        if bn:
            arrays = [rng.normal(0, 0.1, n), rng.uniform(0.5, 1.0, n), rng.normal(0, 0.1, n),
                      rng.uniform(0.5, 1.5, n), w]
        else:
            arrays = [rng.normal(0, 1.0, n), w * 6]
        parts += [np.asarray(a, "<f4").tobytes() for a in arrays]
    return b"".join(parts)


FLOATS = 61_576_342  # of the face cfg's 75 convolutional layers


def write_standin(path) -> None:
    """yolov3_wider's upstream files in their formats, for tests/test_models.py's converter
    check: the face cfg, and a .weights of the right length holding zeros (a sparse file: no
    time spent writing 246 MB)."""
    if str(path).endswith(".cfg"):
        path.write_text(face_cfg())
        return
    with open(path, "wb") as fh:
        fh.write(np.array([0, 2, 0], "<i4").tobytes() + np.array([0], "<i8").tobytes())
        fh.truncate(20 + 4 * FLOATS)


STAND_INS = {"yolov3_wider": write_standin}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("yolov3")
    cfg, w = d / "yolov3-face.cfg", d / "random.weights"
    cfg.write_text(face_cfg())
    w.write_bytes(random_weights())
    return cfg, w


@pytest.fixture(scope="module")
def model(files):
    m = YOLOv3()
    m.load_state_dict(convert_darknet(*files), strict=True)
    m.spec = SPEC
    return m.eval()


def _pytorchyolo():
    """pytorchyolo's models and utils. Its utils import torchvision (tests/refshim.py stands in
    for the NMS it calls) and imgaug, used there only to seed augmentations: an empty stand-in."""
    import refshim

    refshim.install()
    try:
        import imgaug  # noqa: F401
    except ImportError:
        sys.modules["imgaug"] = types.ModuleType("imgaug")
    return reference("pytorchyolo.models"), reference("pytorchyolo.utils.utils")


@pytest.fixture(scope="module")
def photo():
    return read_image(need(MEDIA / "insightface_wheel/t1.jpg"))  # 1280x886, six faces


@pytest.fixture(scope="module")
def reference_run(files, photo):
    """pytorchyolo's Darknet on the letterboxed photo: its decoded (B, N, 6) output and the raw
    maps entering its three [yolo] layers (the outputs of the convs before them)."""
    models, _ = _pytorchyolo()
    torch.set_num_threads(2)
    net = models.Darknet(str(files[0]))
    net.load_darknet_weights(str(files[1]))
    net.eval()
    yolo_at = [i for i, d in enumerate(net.module_defs) if d["type"] == "yolo"]
    raw = {}
    for i in yolo_at:
        net.module_list[i - 1].register_forward_hook(lambda mod, inp, out, i=i: raw.__setitem__(i, out.clone()))
    x, factors = letterbox(torch.from_numpy(photo).permute(2, 0, 1)[None], SIDE)
    with torch.no_grad():
        decoded = net(x / 255)
    return x / 255, factors, decoded, [raw[i] for i in yolo_at]


# -- the reader and the converter -------------------------------------------------------------

def test_face_cfg_maps_every_conv_and_float(files):
    net, layers = parse_cfg(files[0])
    convs = conv_layers(net, layers, "cfg")
    assert len(layers) == 107 and len(convs) == 75
    floats = sum(c.num_floats for c in convs)
    # = msprITU/YOLOv3-Face face.weights' size (246,305,388 bytes, its LFS pointer): same layers
    assert floats == FLOATS and 20 + 4 * floats == files[1].stat().st_size
    state = convert_darknet(*files)
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")) == floats
    assert sum(p.numel() for p in YOLOv3().parameters()) == SPEC.meta.num_params


@pytest.mark.parametrize("cut, why", [(-4, "truncated"), (8, "left over")])
def test_truncated_or_extra_floats_are_refused_naming_the_file(files, tmp_path, cut, why):
    data = files[1].read_bytes()
    bad = tmp_path / "bad.weights"
    bad.write_bytes(data[:cut] if cut < 0 else data + bytes(cut))
    with pytest.raises(DarknetError, match=rf"{bad}: .*61,576,342 floats.*{why}"):
        convert_darknet(files[0], bad)


def test_old_header_with_int32_seen_reads_the_same_floats(tmp_path):
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text("[net]\nchannels=3\n[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\n"
                   "stride=1\npad=1\nactivation=leaky\n[convolutional]\nfilters=2\nsize=1\nactivation=linear\n")
    convs = conv_layers(*parse_cfg(cfg), "tiny")
    body = np.arange(sum(c.num_floats for c in convs), dtype="<f4").tobytes()
    new, old = tmp_path / "new.weights", tmp_path / "old.weights"
    new.write_bytes(np.array([0, 2, 0], "<i4").tobytes() + np.array([7], "<i8").tobytes() + body)
    old.write_bytes(np.array([0, 1, 0, 7], "<i4").tobytes() + body)
    a, b = read_weights(new, convs), read_weights(old, convs)
    assert (a.version, a.seen, b.version, b.seen) == ((0, 2, 0), 7, (0, 1, 0), 7)
    for la, lb in zip(a.layers, b.layers):
        assert la.keys() == lb.keys() and all(np.array_equal(la[k], lb[k]) for k in la)
    # darknet's order: biases, scales, rolling mean, rolling variance, then the weights
    assert a.layers[0]["biases"].tolist() == [0, 1, 2, 3] and a.layers[0]["rolling_variance"][0] == 12
    assert a.layers[0]["weights"].shape == (4, 3, 3, 3) and a.layers[1]["weights"].shape == (2, 4, 1, 1)


@pytest.mark.parametrize("cfg_text, first_difference", [
    # msprITU/YOLOv3-Face's face.cfg: the same layers with other anchors
    (face_cfg("5,9, 9,17, 16,29, 26,47, 42,73, 72,114, 118,195, 209,304, 353,465"), "[yolo]"),
    (face_cfg(classes=2), "filters=21"),  # two classes: the first head conv has 3 * 7 filters
], ids=["msprITU anchors", "two classes"])
def test_another_network_is_refused_at_its_first_different_layer(files, tmp_path, cfg_text, first_difference):
    cfg = tmp_path / "other.cfg"
    cfg.write_text(cfg_text)
    lines = cfg_text.splitlines()
    at = lines.index(first_difference)
    line = max(i for i in range(at + 1) if lines[i].startswith("[")) + 1  # its section's header
    with pytest.raises(DarknetError, match=rf"{cfg}: layer \d+ \(line {line}\).*not the YOLOv3 face"):
        convert_darknet(cfg, files[1])


def test_cfg_lines_read_as_darknet_reads_them(tmp_path):
    cfg = tmp_path / "odd.cfg"
    cfg.write_text("# comment\n[net]\n channels = 3\n\n; also a comment\n[convolutional]\n"
                   "filt ers=8\nsize=3\tpad=1\n")
    net, (conv,) = parse_cfg(cfg)
    assert net.options == {"channels": "3"} and conv.options == {"filters": "8", "size": "3pad=1"}
    cfg.write_text("[net]\nchannels=3\nfilters\n")
    with pytest.raises(DarknetError, match=rf"{cfg}: line 3: 'filters' is neither"):
        parse_cfg(cfg)
    cfg.write_text("[net]\n[crop]\n")
    with pytest.raises(DarknetError, match=r"\[crop\] at line 2 is not a layer type"):
        conv_layers(*parse_cfg(cfg), str(cfg))


# -- parity with pytorchyolo ---------------------------------------------------------------------

def test_raw_head_maps_match_pytorchyolo(model, reference_run):
    x, _, _, ref_maps = reference_run
    with torch.no_grad():
        ours = model(x)
    assert [tuple(m.shape) for m in ours] == [(1, 18, 6, 8), (1, 18, 12, 16), (1, 18, 24, 32)]
    for got, want in zip(ours, ref_maps):
        diff = float((got - want).abs().max())
        print(f"raw map {tuple(got.shape)}: max abs diff {diff:.2e}, max |value| {float(want.abs().max()):.2f}")
        assert diff <= PARITY_TOL


def test_boxes_match_pytorchyolo_after_the_same_decode_and_nms(model, reference_run, photo):
    _, utils = _pytorchyolo()
    x, factors, decoded, _ = reference_run
    want = utils.non_max_suppression(decoded.clone(), conf_thres=MIN_SCORE, iou_thres=0.4)[0]
    scale = torch.tensor(factors * 2)
    want_boxes, want_scores = want[:, :4] * scale, want[:, 4]
    image = torch.from_numpy(photo).permute(2, 0, 1)
    dets = model.detect(image, min_score=MIN_SCORE, max_size=SIDE)  # letterbox, forward, decode, NMS
    print(f"{len(dets)} boxes (pytorchyolo {len(want)})")
    assert dets.landmarks is None and len(dets) == len(want) >= 5
    order = torch.argsort(want_scores, descending=True)
    box_diff = float((dets.boxes - want_boxes[order]).abs().max())
    print(f"max corner difference {box_diff:.2e} px, score {float((dets.scores - want_scores[order]).abs().max()):.1e}")
    assert box_diff <= BOX_TOL
    torch.testing.assert_close(dets.scores, want_scores[order], atol=1e-5, rtol=0)


# -- the letterbox -------------------------------------------------------------------------------

def test_letterbox_sizes_and_the_numpy_path_agree(model, photo):
    assert letterbox_size(886, 1280, 416) == (288, 416) and letterbox_size(720, 1280, 416) == (234, 416)
    assert letterbox_size(100, 50, 416) == (416, 208)  # smaller images are upscaled, as upstream
    x, factors = letterbox(torch.from_numpy(photo).permute(2, 0, 1)[None], 416)
    assert x.shape == (1, 3, 288, 416) and factors == (1280 / 416, 886 / 288)
    prepared = model.prepare(photo)
    assert prepared.pixels.shape == (288, 416, 3) and prepared.scale == factors
    # torch's bilinear (half-pixel centres, rounded for uint8) vs cv2 INTER_LINEAR's fixed point
    assert np.abs(prepared.pixels.astype(np.float32) - x[0].permute(1, 2, 0).numpy()).max() <= 1
    x, factors = letterbox(torch.zeros(1, 3, 100, 70, dtype=torch.uint8), None)  # max_size=0: pad only
    assert x.shape == (1, 3, 128, 96) and factors == (1.0, 1.0)


# -- the store and a file without a known sha256 (tidyface/weights.py) -------------------------

@pytest.fixture
def unknown_hash(tmp_path, monkeypatch):
    """A spec whose one file has no sha256 or size, served over loopback HTTP."""
    import http.server
    import threading
    from functools import partial

    monkeypatch.setenv("TIDYFACE_HOME", str(tmp_path / "store"))
    monkeypatch.delenv("TIDYFACE_MIRROR", raising=False)
    monkeypatch.delenv("TIDYFACE_OFFLINE", raising=False)
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob.bin").write_bytes(b"darknet" * 1000)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    f = UpstreamFile("blob.bin", None, None, urls=(f"http://127.0.0.1:{srv.server_address[1]}/blob.bin",))
    spec = WeightSpec(name="blob", task="detect", files=(f,), license="MIT", origin="test",
                      converter=lambda paths: {"n": torch.tensor(paths["blob.bin"].stat().st_size)})
    yield spec, served / "blob.bin"
    srv.shutdown()


def test_a_download_without_a_known_sha256_is_recorded_and_printed(unknown_hash, capsys):
    spec, source = unknown_hash
    (f,) = spec.files
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    path = weights.resolve_file(f, spec)
    err = capsys.readouterr().err
    record = weights.store_dir() / "upstream" / "blob.bin.sha256"
    assert f"the downloaded file's is {digest}" in err and str(record) in err
    assert record.read_text().split()[0] == digest and path.read_bytes() == source.read_bytes()
    assert int(weights.load_state_dict(spec)["n"]) == 7000  # converted and cached by its name
    # a later copy that differs from what was downloaded is refused, naming the record
    path.write_bytes(b"something else")
    with pytest.raises(weights.WeightsError, match=r"differs from the \w+\.\.\. recorded .*blob.bin.sha256"):
        weights.verify(path, f)


def test_a_mirror_copy_without_a_known_sha256_is_used_and_its_sha256_printed(unknown_hash, tmp_path,
                                                                              monkeypatch, capsys):
    spec, source = unknown_hash
    (f,) = spec.files
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "blob.bin").write_bytes(source.read_bytes())
    monkeypatch.setenv("TIDYFACE_MIRROR", str(mirror))
    monkeypatch.setenv("TIDYFACE_OFFLINE", "1")
    assert weights.resolve_file(f, spec) == mirror / "blob.bin"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert f"sha256 {digest}, not verified (no sha256 is known for blob.bin)" in capsys.readouterr().err
    os.remove(mirror / "blob.bin")
    with pytest.raises(weights.WeightsError, match=r"put blob\.bin \(no sha256 known, from http"):
        weights.resolve_file(f, spec)


def test_yolov3_wider_spec_names_its_two_upstream_files():
    cfg, w = SPEC.files
    assert cfg.filename == "yolov3-face.cfg" and len(cfg.sha256) == 64 and cfg.size == 8334
    assert w.filename == "yolov3-wider_16000.weights" and w.sha256 is None and w.urls
    assert SPEC.defaults.max_size == 416 and SPEC.meta.num_landmarks is None
