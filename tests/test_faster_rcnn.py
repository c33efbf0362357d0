"""Faster R-CNN R50-FPN (tidyface/models/faster_rcnn.py), its RoIAlign (ops/roi_align.py) and the
mmdet checkpoint converter (convert/mmdet.py).

No weights of hysts' detector are here: a synthetic checkpoint in mmdet 2.x's layout (key names
and shapes from mmdet's ResNet / FPN / RPNHead / Shared2FCBBoxHead) with random values goes
through our converter, and the same tensors are loaded under torchvision's names into
`torchvision.models.detection.fasterrcnn_resnet50_fpn` (torch 2.14.1 + torchvision 0.29.1; run
in the second venv: /work/venv214/bin/python -m pytest tests/test_faster_rcnn.py). Where mmdet and
torchvision differ, torchvision is set to mmdet's way for the comparison (tidyface follows mmdet):
anchors (torchvision rounds its base anchors to whole pixels; mmdet does not: its unrounded
anchors replace torchvision's cell anchors), RoI pooling (torchvision's MultiScaleRoIAlign uses
aligned=False, sampling_ratio 2; mmdet aligned=True, sampling 0: swapped in), and the input
pipeline (torchvision normalises then resizes with floor sizes; mmdet resizes then normalises, int(x+.5):
both are given the same normalised, padded tensor). Left as they are, not exercised by these
random weights: torchvision drops proposals narrower than 1e-3 px and final boxes narrower than
1e-2 px (mmdet: > 0 and none), adds its level-mapping eps outside log2 (mmdet inside), and takes
anchor strides as padded size // map size, so its P6 stride is not 64 unless the padded sides are
multiples of 64 (the test input is 256x384); mmdet runs the final NMS after mapping boxes back to
the image (factor 1 here).

Measured (CPU, torch 2.14.1 / torchvision 0.29.1, this file's seeds): FPN P2..P6 and RPN logits /
deltas max abs diff 0.0 (the same float ops in the same order); 1000 proposals on both sides,
each within 7.6e-6 px of one of the other's (compared as sets: near-equal random objectness may
swap places); 100 final faces on both sides, same order, boxes max abs diff 3.1e-5 px (scores
0.925..0.998). RoIAlign vs torchvision.ops.roi_align (400 RoIs, some empty, long or off the map):
4.3e-6 (aligned, sampling 0), 5.5e-6 (legacy, 0), 3.6e-7 (legacy, 2); vs the kernel's loops written
out in float64 here: 3.5e-6, 4.0e-6, 5.4e-6. Asserted: features 1e-4, RoIAlign 1e-5, boxes 0.5 px,
scores 1e-4.
"""
import math

import pytest
import torch

from tidyface.convert.mmdet import convert_mmdet
from tidyface.models.faster_rcnn import (STRIDES, FasterRCNN, box_detections,
                                         extract_roi_features, level_anchors, normalise_and_pad, resized_size,
                                         rpn_proposals)
from tidyface.ops.roi_align import roi_align



def torchvision_reference():
    """torchvision, the reference of the two comparisons below, does not load beside the torch
    the suite runs on (PyPI's torchvision needs torch 2.14.1, CI pins 2.13.0), so these two run
    in a second environment (the command in the module docstring; numbers above) and skip in
    the suite's own, CI included. Everything else in this file runs everywhere."""
    try:  # the real package: other tests stand in for a few torchvision names (refshim, test_vit)
        import torchvision
        import torchvision.models.detection  # noqa: F401
        from torchvision.ops import roi_align  # noqa: F401  (a build for another torch fails here)
    except (ImportError, RuntimeError, AttributeError) as e:
        pytest.skip(f"torchvision does not load beside this torch ({str(e).splitlines()[0] if str(e) else e!r})")
    return torchvision

FEATURE_TOL, ROI_TOL, BOX_TOL = 1e-4, 1e-5, 0.5


def _naive_roi_align(f, roi, size, scale, ratio, aligned):
    """One RoI, sample by sample, as the torchvision / mmcv CPU kernel's loops read."""
    C, H, W = f.shape
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * scale - off for v in roi[1:])
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    gh = ratio if ratio > 0 else math.ceil(rh / size)
    gw = ratio if ratio > 0 else math.ceil(rw / size)
    out = torch.zeros(C, size, size, dtype=torch.float64)
    for ph in range(size):
        for pw in range(size):
            for iy in range(gh):
                for ix in range(gw):
                    y = y1 + ph * rh / size + (iy + 0.5) * rh / size / gh
                    x = x1 + pw * rw / size + (ix + 0.5) * rw / size / gw
                    if y < -1 or y > H or x < -1 or x > W:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    yl, xl = int(y), int(x)
                    yh, xh = (yl + 1, xl + 1)
                    if yl >= H - 1:
                        yl = yh = H - 1
                        y = float(yl)
                    if xl >= W - 1:
                        xl = xh = W - 1
                        x = float(xl)
                    ly, lx = y - yl, x - xl
                    out[:, ph, pw] += ((1 - ly) * (1 - lx) * f[:, yl, xl] + (1 - ly) * lx * f[:, yl, xh]
                                       + ly * (1 - lx) * f[:, yh, xl] + ly * lx * f[:, yh, xh]).double()
            out[:, ph, pw] /= max(gh * gw, 1)
    return out.float()


def _rois(n, gen, span=(150.0, 120.0), size=100.0):
    """Random RoIs over two images, some empty, some long and thin, some off the map."""
    xy = torch.rand(n, 2, generator=gen) * torch.tensor(span) - 10
    wh = torch.rand(n, 2, generator=gen) * size
    wh[:2] = 0
    wh[2:4, 0] = 3 * size
    return torch.cat([torch.randint(0, 2, (n, 1), generator=gen).float(), xy, xy + wh], 1)


@pytest.mark.parametrize("aligned,ratio", [(True, 0), (False, 0), (True, 2)])
def test_roi_align_matches_the_kernel_loops(aligned, ratio):
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, 30, 38, generator=gen)
    rois = _rois(8, gen)
    got = roi_align(f, rois, 7, 0.25, ratio, aligned)
    want = torch.stack([_naive_roi_align(f[int(r[0])], r, 7, 0.25, ratio, aligned) for r in rois])
    assert (got - want).abs().max() <= ROI_TOL


def test_roi_align_matches_torchvision():
    tv = torchvision_reference()
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(2, 16, 60, 76, generator=gen)
    rois = _rois(400, gen, (300.0, 240.0), 150.0)
    for aligned, ratio in ((True, 0), (False, 0), (False, 2)):
        got = roi_align(f, rois, 7, 0.25, ratio, aligned)
        want = tv.ops.roi_align(f, rois, 7, 0.25, ratio, aligned)
        assert (got - want).abs().max() <= ROI_TOL, (aligned, ratio)


# --- a synthetic mmdet checkpoint ------------------------------------------------------------------

def _bn(state, name, c, gen, gain=(0.5, 1.0)):
    lo, hi = gain
    state[f"{name}.weight"] = lo + (hi - lo) * torch.rand(c, generator=gen)
    state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen)
    state[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
    state[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=gen)
    state[f"{name}.num_batches_tracked"] = torch.tensor(0)


def _conv(state, name, cout, cin, k, gen, bias=False, gain=1.0):
    state[f"{name}.weight"] = gain * torch.randn(cout, cin, k, k, generator=gen) * math.sqrt(2 / (cin * k * k))
    if bias:
        state[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=gen)


def _linear(state, name, cout, cin, gen, gain=1.0):
    state[f"{name}.weight"] = gain * torch.randn(cout, cin, generator=gen) / math.sqrt(cin)
    state[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=gen)


def mmdet_checkpoint(seed=0):
    """A Faster R-CNN R50-FPN state dict in mmdet 2.x's key layout, one class, random values
    (the last BN of each bottleneck damped so 16 residual sums stay near unit scale; the class
    logits spread so that scores are far apart and both sides' NMS orders agree)."""
    gen, s = torch.Generator().manual_seed(seed), {}
    _conv(s, "backbone.conv1", 64, 3, 7, gen)
    _bn(s, "backbone.bn1", 64, gen)
    cin = 64
    for i, depth in enumerate((3, 4, 6, 3), 1):
        c = 64 * 2 ** (i - 1)
        for j in range(depth):
            p = f"backbone.layer{i}.{j}"
            _conv(s, f"{p}.conv1", c, cin, 1, gen)
            _bn(s, f"{p}.bn1", c, gen)
            _conv(s, f"{p}.conv2", c, c, 3, gen)
            _bn(s, f"{p}.bn2", c, gen)
            _conv(s, f"{p}.conv3", 4 * c, c, 1, gen)
            _bn(s, f"{p}.bn3", 4 * c, gen, (0.1, 0.3))
            if j == 0:
                _conv(s, f"{p}.downsample.0", 4 * c, cin, 1, gen)
                _bn(s, f"{p}.downsample.1", 4 * c, gen)
            cin = 4 * c
    for i, c in enumerate((256, 512, 1024, 2048)):
        _conv(s, f"neck.lateral_convs.{i}.conv", 256, c, 1, gen, bias=True)
        _conv(s, f"neck.fpn_convs.{i}.conv", 256, 256, 3, gen, bias=True)
    _conv(s, "rpn_head.rpn_conv", 256, 256, 3, gen, bias=True)
    _conv(s, "rpn_head.rpn_cls", 3, 256, 1, gen, bias=True)
    _conv(s, "rpn_head.rpn_reg", 12, 256, 1, gen, bias=True, gain=0.1)
    _linear(s, "roi_head.bbox_head.shared_fcs.0", 1024, 256 * 7 * 7, gen)
    _linear(s, "roi_head.bbox_head.shared_fcs.1", 1024, 1024, gen)
    _linear(s, "roi_head.bbox_head.fc_cls", 2, 1024, gen, gain=2.0)
    _linear(s, "roi_head.bbox_head.fc_reg", 4, 1024, gen, gain=0.3)
    return s


def test_converter_maps_every_tensor(tmp_path):
    state = mmdet_checkpoint()
    path = tmp_path / "mmdet_anime-face_faster-rcnn.pth"
    torch.save({"meta": {"CLASSES": ("face",), "epoch": 12}, "state_dict": state}, path)
    ours = convert_mmdet(path, FasterRCNN)
    with torch.device("meta"):  # shapes only: random init of 41M weights is slow
        model = FasterRCNN()
    assert len(ours) == len(state) == len(model.state_dict())
    model.load_state_dict(ours, strict=True, assign=True)
    # values travel under their new names (spot checks across the four parts)
    for mm, tf in (("backbone.layer3.0.downsample.1.running_var", "backbone.layer3.0.downsample.bn.running_var"),
                   ("neck.fpn_convs.2.conv.weight", "neck.output2.weight"),
                   ("rpn_head.rpn_cls.bias", "rpn.cls.bias"),
                   ("roi_head.bbox_head.shared_fcs.1.weight", "box_head.fc2.weight")):
        assert torch.equal(ours[tf], state[mm])
    bad = dict(state, **{"roi_head.bbox_head.fc_extra.weight": torch.zeros(1)})
    torch.save({"state_dict": bad}, path)
    with pytest.raises(ValueError, match=r"mmdet_anime-face_faster-rcnn\.pth.*fc_extra"):
        convert_mmdet(path, FasterRCNN)
    del state["rpn_head.rpn_reg.bias"]
    with pytest.raises(ValueError, match="missing.*rpn.reg.bias"):
        convert_mmdet(state, FasterRCNN)


# --- parity with torchvision's Faster R-CNN ---------------------------------------------------------

TORCHVISION_KEYS = (  # mmdet prefix -> torchvision prefix, for the same tensors
    ("backbone.", "backbone.body."),
    ("neck.lateral_convs.{i}.conv.", "backbone.fpn.inner_blocks.{i}.0."),
    ("neck.fpn_convs.{i}.conv.", "backbone.fpn.layer_blocks.{i}.0."),
    ("rpn_head.rpn_conv.", "rpn.head.conv.0.0."),
    ("rpn_head.rpn_cls.", "rpn.head.cls_logits."),
    ("rpn_head.rpn_reg.", "rpn.head.bbox_pred."),
    ("roi_head.bbox_head.shared_fcs.0.", "roi_heads.box_head.fc6."),
    ("roi_head.bbox_head.shared_fcs.1.", "roi_heads.box_head.fc7."),
)


def torchvision_state(mm):
    """The mmdet tensors under torchvision's names. The predictor differs in layout: torchvision's
    class 0 is the background (mmdet's last row), and it regresses the background too (zeros)."""
    out = {}
    for k, v in mm.items():
        if k.startswith("roi_head.bbox_head.fc_"):
            continue
        for a, b in TORCHVISION_KEYS:
            if "{i}" in a:
                hit = [(a.format(i=i), b.format(i=i)) for i in range(4) if k.startswith(a.format(i=i))]
                a, b = hit[0] if hit else (None, None)
            if a and k.startswith(a):
                out[b + k[len(a):]] = v
                break
    cls_w, cls_b = mm["roi_head.bbox_head.fc_cls.weight"], mm["roi_head.bbox_head.fc_cls.bias"]
    out["roi_heads.box_predictor.cls_score.weight"] = cls_w.flip(0)
    out["roi_heads.box_predictor.cls_score.bias"] = cls_b.flip(0)
    reg_w, reg_b = mm["roi_head.bbox_head.fc_reg.weight"], mm["roi_head.bbox_head.fc_reg.bias"]
    out["roi_heads.box_predictor.bbox_pred.weight"] = torch.cat([torch.zeros_like(reg_w), reg_w])
    out["roi_heads.box_predictor.bbox_pred.bias"] = torch.cat([torch.zeros_like(reg_b), reg_b])
    return out


def _mmdet_cell_anchors(dtype):
    """mmdet's base anchors per level (not rounded), in torchvision's cell-anchor form."""
    return [level_anchors(s, 1, 1, dtype=dtype) for s in STRIDES]


class _AlignedRoIPool(torch.nn.Module):
    """torchvision's MultiScaleRoIAlign (its LevelMapper) with mmdet's RoIAlign settings."""

    def __init__(self, tv):
        super().__init__()
        self.tv = tv
        self.mapper = tv.ops.poolers.initLevelMapper(2, 5)

    def forward(self, features, proposals, image_shapes):
        feats = [features[k] for k in ("0", "1", "2", "3")]
        rois = torch.cat([torch.cat([torch.full_like(p[:, :1], i), p], 1) for i, p in enumerate(proposals)])
        level = self.mapper(proposals)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], 7, 7))
        for i, f in enumerate(feats):
            idx = (level == i).nonzero(as_tuple=True)[0]
            out[idx] = self.tv.ops.roi_align(f, rois[idx], 7, 1.0 / STRIDES[i], 0, True)
        return out


def _torchvision_model(tv, mm):
    model = tv.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    model.load_state_dict(torchvision_state(mm), strict=True)
    model.rpn.anchor_generator.cell_anchors = _mmdet_cell_anchors(torch.float32)
    model.roi_heads.box_roi_pool = _AlignedRoIPool(tv)
    return model.eval()


def _input(h=250, w=370, seed=3):
    """Normalised pixels padded to 256x384: multiples of 64, where torchvision's anchor strides
    (padded size // map size) equal mmdet's (elsewhere its P6 stride is not 64)."""
    nh, nw = resized_size(h, w, 0)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, 3, nh, nw, generator=gen) * 255
    return normalise_and_pad(pixels), (nh, nw)


def _set_distance(a, b):
    """The largest distance (max abs coordinate) from a box of either set to the other set."""
    d = (a[:, None] - b[None]).abs().amax(-1)
    return max(d.amin(1).max().item(), d.amin(0).max().item())


@torch.no_grad()
def test_matches_torchvision_faster_rcnn():
    tv = torchvision_reference()
    from torchvision.models.detection.image_list import ImageList

    mm = mmdet_checkpoint()
    with torch.device("meta"):
        ours = FasterRCNN()
    ours.load_state_dict(convert_mmdet(mm, FasterRCNN), strict=True, assign=True)
    ours.eval()
    theirs = _torchvision_model(tv, mm)
    x, hw = _input()
    feats, logits, deltas = ours(x)
    tv_feats = theirs.backbone(x)
    fpn = max((a - b).abs().max().item() for a, b in zip(feats, tv_feats.values()))
    tv_logits, tv_deltas = theirs.rpn.head(list(tv_feats.values()))
    rpn = max((a - b).abs().max().item() for a, b in zip(logits + deltas, tv_logits + tv_deltas))
    print(f"FPN max abs {fpn:.2e}, RPN {rpn:.2e}, P2 scale {feats[0].abs().max().item():.2f}")
    assert fpn <= FEATURE_TOL and rpn <= FEATURE_TOL

    proposals, image_index = rpn_proposals(logits, deltas, hw)
    tv_props, _ = theirs.rpn(ImageList(x, [hw]), tv_feats)
    assert len(proposals) == len(tv_props[0])
    # near-equal random objectness scores may swap places: compared as sets, both ways
    near = _set_distance(proposals, tv_props[0])
    print(f"{len(proposals)} proposals, each within {near:.2e} px of one of torchvision's")
    assert near <= BOX_TOL
    rois = torch.cat([image_index[:, None].float(), proposals], 1)
    cls, reg = ours.box_head(extract_roi_features(feats[:4], rois))
    dets = box_detections(rois, cls, reg, hw)
    tv_dets = theirs.roi_heads(tv_feats, tv_props, [hw])[0][0]
    box = (dets.boxes - tv_dets["boxes"]).abs().max().item() if len(dets) == len(tv_dets["boxes"]) else math.inf
    print(f"{len(dets)} faces (torchvision {len(tv_dets['boxes'])}), boxes max abs {box:.2e} px, "
          f"scores {dets.scores.min().item():.3f}..{dets.scores.max().item():.3f}")
    assert len(dets) > 5 and box <= BOX_TOL
    assert (dets.scores - tv_dets["scores"]).abs().max() <= FEATURE_TOL


def test_mmcv_keep_ratio_sizes():
    # by hand: 1920x1080 -> min(1333/1920, 800/1080) = 0.6943 -> 1333 x int(749.8 + .5);
    # 400x300 -> min(3.33, 2.667) -> int(1066.7 + .5) x 800; max_size 0 leaves the size alone
    assert resized_size(1080, 1920) == (750, 1333)
    assert resized_size(300, 400) == (800, 1067)
    assert resized_size(300, 400, 0) == (300, 400)
    assert resized_size(300, 400, 666) == (400, 533)


@torch.no_grad()
def test_detect_composes_the_steps_and_maps_back():
    with torch.device("meta"):
        model = FasterRCNN()
    model.load_state_dict(convert_mmdet(mmdet_checkpoint(), FasterRCNN), strict=True, assign=True)
    model.eval()
    gen = torch.Generator().manual_seed(4)
    image = (torch.rand(1, 3, 50, 74, generator=gen) * 255).to(torch.uint8)
    dets = model.detect(image, max_size=148)
    hw = resized_size(50, 74, 148)  # (89, 131): upscaled, as mmcv does
    from tidyface.ops.resize import resize_bilinear

    feats, logits, deltas = model(normalise_and_pad(resize_bilinear(image, hw)))
    props, index = rpn_proposals(logits, deltas, hw)
    rois = torch.cat([index[:, None].float(), props], 1)
    cls, reg = model.box_head(extract_roi_features(feats[:4], rois))
    want = box_detections(rois, cls, reg, hw, (74 / hw[1], 50 / hw[0]))
    assert len(dets) > 0 and dets.landmarks is None
    assert torch.equal(dets.boxes, want.boxes) and torch.equal(dets.scores, want.scores)
    assert dets.boxes[:, 2].max() <= 74 + 1e-3 and dets.boxes[:, 3].max() <= 50 + 1e-3  # clamped, mapped back
