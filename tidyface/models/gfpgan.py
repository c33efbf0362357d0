"""GFPGAN v1 "clean" face restorer (Wang et al. 2021, arXiv:2101.04061): a U-Net encoder whose
latents and spatial features steer a StyleGAN2 decoder (Karras et al. 2020, arXiv:1912.04958).

Facts from TencentARC/GFPGAN 1.3.8: `gfpgan/archs/gfpganv1_clean_arch.py`, `stylegan2_clean_arch.py`
(architecture), `gfpgan/utils.py` GFPGANer and `inference_gfpgan.py` (settings, pre- and
post-processing, release URLs), `scripts/convert_gfpganv_to_clean.py` (the release layout), LICENSE:
- Widths: StyleGAN2's 512 channels up to 32 px, then 256 * channel_multiplier at 64 px, halving
  per doubling, times `narrow`; the encoder uses half of those. Every clean release runs
  out_size 512, channel_multiplier 2, narrow 1, style width 512, 8-layer mapping MLP,
  input_is_latent=True, different_w=True, sft_half=True (GFPGANer's clean arch).
- Encoder: a 1x1 conv from RGB (LeakyReLU 0.2), seven residual blocks down to 4x4 (3x3 conv,
  LeakyReLU, bilinear x0.5, 3x3 conv, LeakyReLU, plus a bilinear x0.5 and 1x1 bias-free skip), a
  3x3 conv (LeakyReLU); a Linear from the flattened 4x4 map to 16 latents of 512 (one per decoder
  layer: different_w). Then seven residual blocks up (bilinear x2), each fed the sum of the path and
  the down block output of its size; at each level two branches (3x3 conv, LeakyReLU 0.2, 3x3 conv)
  give the SFT scale and shift.
- Decoder: a learned 4x4 constant, a modulated 3x3 conv and a ToRGB (1x1 modulated conv without
  demodulation, + bias); then per level 8..512 px a modulated conv after bilinear x2, the SFT (the
  second half of the channels times scale plus shift, sft_half), a modulated conv and a ToRGB added
  to the bilinear-x2 previous RGB. A modulated conv: per-sample input scales s = Linear(latent),
  weights demodulated by rsqrt(sum (W s)^2 + 1e-8), output * sqrt(2), plus noise * a learned
  strength, plus bias, LeakyReLU 0.2. The latents go to the decoder as they are: its mapping MLP
  never runs (input_is_latent=True).
- Noise: GFPGANer calls the network with its default randomize_noise=True, so upstream draws fresh
  noise on every call; tidyface uses the noise maps stored in the checkpoint (upstream's
  randomize_noise=False) so restoring is deterministic, and `random_noises` gives upstream's draw.
- Input: RGB (x/255 - 0.5)/0.5 of a 512 FFHQ-aligned crop (facexlib 0.3.0
  face_restoration_helper.py: its FFHQ 5-point template at 512, crop_ratio 1; aligned inputs of
  another size go through cv2.resize, bilinear); output: clamped
  to [-1, 1], (y + 1)/2 * 255, rounded (basicsr tensor2img, min_max=(-1, 1)).
- Releases: {"params_ema": state dict} (GFPGANer takes params_ema, else params), 285 tensors for
  the 512 px, channel-multiplier-2 architecture, incl. 15 noise maps. A legacy-format torch.save of
  that dict is 348,632,874 bytes (measured with the reference package, random weights), the size
  published for GFPGANv1.3.pth.
- sha256s and sizes: third-party manifests in public repositories (v1.3 and v1.4: 348,632,874
  bytes; NoCE-C2's sha256 from AUR PKGBUILD sha256sums, its size taken as the layout's); no release
  file could be had here to check them. v1.4's URL: GFPGAN's README and inference script name the
  v1.3.0 release, third-party manifests v1.3.4; both are listed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete, load_torch_file, rename_keys
from ..errors import InputError
from ..ops.image import as_rgb_batch, normalise
from ..ops.resize import resize_antialiased, resize_bilinear
from ..registry import ModelMeta, UpstreamFile, WeightSpec, register
from .base import Enhancer, model_device

INPUT_SIZE = 512
STYLE_DIM = 512
MAPPING_LAYERS = 8  # StyleGAN2's mapping MLP, stored in the releases but never run (see convert)
LEAKY_SLOPE = 0.2
DEMOD_EPS = 1e-8
MEAN = STD = (0.5, 0.5, 0.5)  # on RGB in 0..1: x -> 2x - 1


def stylegan_width(res: int, channel_multiplier: int, narrow: float) -> int:
    """StyleGAN2's channels at a resolution: 512 up to 32 px, then 256 * multiplier at 64 px,
    halving per doubling; all times `narrow` (upstream's table, truncated the same way)."""
    return int((512 if res <= 32 else 256 * channel_multiplier * 64 // res) * narrow)


def _leaky(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


def _resample(x: Tensor, factor: float) -> Tensor:
    # by a scale factor, as upstream: its sampling positions, and no shape frozen into an export
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class ResBlock(nn.Module):
    """3x3 conv, LeakyReLU, bilinear resample, 3x3 conv, LeakyReLU; plus the resampled input
    through a bias-free 1x1 conv. factor 0.5 (encoder down) or 2 (encoder up)."""

    def __init__(self, cin: int, cout: int, factor: float):
        super().__init__()
        self.factor = factor
        self.conv1 = _conv3x3(cin, cin)
        self.conv2 = _conv3x3(cin, cout)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = _leaky(self.conv2(_resample(_leaky(self.conv1(x)), self.factor)))
        return y + self.skip(_resample(x, self.factor))


class SFTBranch(nn.Module):
    """One level's SFT scale or shift from the encoder's feature: 3x3 conv, LeakyReLU, 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv3x3(channels, channels)
        self.conv2 = _conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(_leaky(self.conv1(x)))


def modulated_conv(x: Tensor, weight: Tensor, styles: Tensor, padding: int, demodulate: bool,
                   upsample: bool) -> Tensor:
    """StyleGAN2's modulated convolution: each sample's conv(x, W * s), divided per output channel
    by sqrt(sum (W s)^2 + eps) when demodulating. Computed as conv(x * s, W) times that factor,
    the same sums: one shared weight serves the whole batch, where upstream's per-sample weights
    need a grouped conv whose group count (the batch size) an exported graph would freeze."""
    w = weight[0]  # (cout, cin, k, k); upstream stores a leading 1
    x = x * styles[:, :, None, None]
    if upsample:  # x * s is per channel, so it commutes with the (linear) upsampling
        x = _resample(x, 2)
    out = F.conv2d(x, w, padding=padding)
    if demodulate:
        out = out * torch.rsqrt(styles.square() @ w.square().sum((2, 3)).t() + DEMOD_EPS)[:, :, None, None]
    return out


class StyleConv(nn.Module):
    """Modulated 3x3 conv (optionally after a bilinear x2), * sqrt(2), + noise * strength, + bias,
    LeakyReLU 0.2. `noise`: the checkpoint's fixed map for this layer, (1,1,r,r)."""

    def __init__(self, cin: int, cout: int, resolution: int, upsample: bool, style_dim: int = STYLE_DIM):
        super().__init__()
        self.upsample = upsample
        self.modulation = nn.Linear(style_dim, cin)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, 3, 3) / math.sqrt(cin * 9))
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))
        self.register_buffer("noise", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: Tensor, latent: Tensor, noise: Tensor | None = None) -> Tensor:
        out = modulated_conv(x, self.weight, self.modulation(latent), 1, True, self.upsample)
        # sqrt(2): StyleGAN2's activation gain, which the clean port applies before the LeakyReLU
        # (the same thing: LeakyReLU is positively homogeneous)
        out = out * math.sqrt(2) + self.noise_strength * (self.noise if noise is None else noise)
        return _leaky(out + self.bias)


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB without demodulation, + bias, + the previous RGB upsampled x2."""

    def __init__(self, cin: int, style_dim: int = STYLE_DIM):
        super().__init__()
        self.modulation = nn.Linear(style_dim, cin)
        self.weight = nn.Parameter(torch.randn(1, 3, cin, 1, 1) / math.sqrt(cin))
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, latent: Tensor, previous: Tensor | None = None) -> Tensor:
        out = modulated_conv(x, self.weight, self.modulation(latent), 0, False, False) + self.bias
        return out if previous is None else out + _resample(previous, 2)


class DecoderBlock(nn.Module):
    """One decoder level: StyleConv up (x2), SFT on the second half of the channels, StyleConv,
    ToRGB onto the previous RGB."""

    def __init__(self, cin: int, cout: int, resolution: int, style_dim: int = STYLE_DIM):
        super().__init__()
        self.half = cout // 2
        self.up_conv = StyleConv(cin, cout, resolution, upsample=True, style_dim=style_dim)
        self.conv = StyleConv(cout, cout, resolution, upsample=False, style_dim=style_dim)
        self.to_rgb = ToRGB(cout, style_dim)

    def forward(self, x: Tensor, rgb: Tensor, latents: Tensor, scale: Tensor, shift: Tensor,
                noises: Sequence[Tensor | None]) -> tuple[Tensor, Tensor]:
        x = self.up_conv(x, latents[:, 0], noises[0])
        kept, steered = x.split(self.half, dim=1)
        x = self.conv(torch.cat([kept, steered * scale + shift], dim=1), latents[:, 1], noises[1])
        return x, self.to_rgb(x, latents[:, 2], rgb)


class StyleDecoder(nn.Module):
    """StyleGAN2's synthesis network with an SFT per level; latents (B, 2 log2(size) - 2, 512)."""

    def __init__(self, out_size: int, channel_multiplier: int, narrow: float, style_dim: int = STYLE_DIM):
        super().__init__()
        width = [stylegan_width(2 ** i, channel_multiplier, narrow) for i in range(out_size.bit_length())]
        self.constant = nn.Parameter(torch.randn(1, width[2], 4, 4))
        self.first_conv = StyleConv(width[2], width[2], 4, upsample=False, style_dim=style_dim)
        self.first_rgb = ToRGB(width[2], style_dim)
        self.blocks = nn.ModuleList(DecoderBlock(width[i - 1], width[i], 2 ** i, style_dim)
                                    for i in range(3, out_size.bit_length()))

    def noise_layers(self) -> list[StyleConv]:
        """The StyleConvs in upstream's noise order (noise0, noise1, ...)."""
        return [self.first_conv] + [c for b in self.blocks for c in (b.up_conv, b.conv)]

    def forward(self, latents: Tensor, conditions: Sequence[tuple[Tensor, Tensor]],
                noises: Sequence[Tensor] | None = None) -> Tensor:
        noises = [None] * (1 + 2 * len(self.blocks)) if noises is None else noises
        x = self.first_conv(self.constant.expand(latents.shape[0], -1, -1, -1), latents[:, 0], noises[0])
        rgb = self.first_rgb(x, latents[:, 1])
        for i, (block, (scale, shift)) in enumerate(zip(self.blocks, conditions)):
            x, rgb = block(x, rgb, latents[:, 2 * i + 1:2 * i + 4], scale, shift, noises[2 * i + 1:2 * i + 3])
        return rgb


class GFPGANClean(nn.Module, Enhancer):
    """(B,3,S,S) RGB in [-1, 1] (see `preprocess`; S = out_size) -> (B,3,S,S) restored RGB,
    about [-1, 1], not clamped. `noises`: one map per StyleConv (upstream's noise order, see
    `random_noises`); None uses the stored ones."""

    reduced_precision = True

    def __init__(self, out_size: int = INPUT_SIZE, channel_multiplier: int = 2, narrow: float = 1.0,
                 style_dim: int = STYLE_DIM):
        super().__init__()
        if out_size < 8 or out_size & (out_size - 1):
            raise ValueError(f"GFPGAN's out_size must be a power of two >= 8, not {out_size}")
        self.out_size, self.style_dim = out_size, style_dim
        log_size = out_size.bit_length() - 1
        levels = log_size - 2  # resolutions 8 .. out_size
        self.num_latents = 2 * log_size - 2  # one per StyleConv and ToRGB
        # the encoder is half as wide as the decoder
        width = [stylegan_width(2 ** i, channel_multiplier, narrow * 0.5) for i in range(log_size + 1)]
        self.stem = nn.Conv2d(3, width[-1], 1)
        self.down = nn.ModuleList(ResBlock(width[i], width[i - 1], 0.5) for i in range(levels + 2, 2, -1))
        self.bottleneck = _conv3x3(width[2], width[2])
        self.to_latents = nn.Linear(width[2] * 16, self.num_latents * style_dim)
        self.up = nn.ModuleList(ResBlock(width[i - 1], width[i], 2) for i in range(3, levels + 3))
        self.sft_scale = nn.ModuleList(SFTBranch(width[i]) for i in range(3, levels + 3))
        self.sft_shift = nn.ModuleList(SFTBranch(width[i]) for i in range(3, levels + 3))
        self.decoder = StyleDecoder(out_size, channel_multiplier, narrow, style_dim)

    def forward(self, x: Tensor, noises: Sequence[Tensor] | None = None) -> Tensor:
        feat = _leaky(self.stem(x))
        skips = []
        for block in self.down:
            feat = block(feat)
            skips.append(feat)
        feat = _leaky(self.bottleneck(feat))
        latents = self.to_latents(feat.flatten(1)).view(-1, self.num_latents, self.style_dim)
        conditions = []
        for up, scale, shift, skip in zip(self.up, self.sft_scale, self.sft_shift, reversed(skips)):
            feat = up(feat + skip)  # the U-Net: each level sees the down block output of its size
            conditions.append((scale(feat), shift(feat)))
        return self.decoder(latents, conditions, noises)

    @torch.no_grad()
    def enhance(self, images: Tensor) -> Tensor:
        """Aligned face crops (N,3,H,W) RGB 0..255 (uint8 or float) -> (N,3,H,W) float32 RGB
        0..255, restored: resized to out_size and back when H, W differ (bilinear)."""
        images = as_rgb_batch(images, "enhance images")
        out = _to_pixels(self(preprocess(images, self.out_size)))
        return resize_antialiased(out, tuple(images.shape[-2:]))


def _to_pixels(y: Tensor) -> Tensor:
    # basicsr tensor2img with min_max=(-1, 1), before rounding: clamp, to 0..1, times 255
    return (y.clamp(-1, 1) + 1) / 2 * 255


def _as_batch(crops) -> Tensor:
    """numpy (N,H,W,3) or (H,W,3) (numpy's image layout), or a tensor (N,3,H,W) or (3,H,W)
    (torch's), RGB 0..255 -> a checked (N,3,H,W) tensor."""
    if isinstance(crops, np.ndarray):
        arr = crops[None] if crops.ndim == 3 else crops
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError(f"GFPGAN crops as numpy must be (N,H,W,3) or (H,W,3) RGB, "
                             f"got shape {crops.shape}")
        crops = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return as_rgb_batch(crops, "GFPGAN crops")


def preprocess(crops, size: int = INPUT_SIZE) -> Tensor:
    """Aligned crops (see `_as_batch`; uint8 or float 0..255) -> the network input (N,3,S,S)
    float32: resized to S x S if needed (bilinear with half-pixel centres, as GFPGANer's
    cv2.resize; uint8 rounded as cv2 returns it), then (x/255 - 0.5)/0.5."""
    x = _as_batch(crops)
    if tuple(x.shape[-2:]) != (size, size):
        x = resize_bilinear(x, (size, size))
    return normalise(x.float(), MEAN, STD)


def postprocess(output: Tensor, size: Sequence[int] | None = None) -> np.ndarray:
    """The network's output (N,3,S,S) -> restored crops (N,H,W,3) RGB uint8 numpy, as basicsr's
    tensor2img(min_max=(-1, 1)) rounds them (RGB here, BGR there); resized to size (h, w) first
    when given and different."""
    pixels = _to_pixels(output.detach().float())
    if size is not None:
        pixels = resize_antialiased(pixels, (int(size[0]), int(size[1])))
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def restore(model: GFPGANClean, crops, batch_size: int = 4) -> np.ndarray:
    """Aligned face crops (numpy (N,H,W,3) or tensor (N,3,H,W), RGB 0..255; FFHQ template, see
    `spec.meta`) -> restored crops (N,H,W,3) RGB uint8 numpy, at the crops' own size; each is
    what GFPGANer.enhance(has_aligned=True) gives for it (with the stored noise)."""
    x = _as_batch(crops)
    if len(x) == 0:
        return np.zeros((0, *x.shape[-2:], 3), np.uint8)
    dev = model_device(model)
    return np.concatenate([postprocess(model(preprocess(chunk.to(dev), model.out_size)), chunk.shape[-2:])
                           for chunk in x.split(max(1, int(batch_size)))])


def random_noises(model: GFPGANClean, batch: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Fresh noise maps as upstream draws them by default (randomize_noise=True): one (batch,1,r,r)
    standard normal map per StyleConv, in its order, on the model's device."""
    dev = model_device(model)
    return [torch.randn((batch, *layer.noise.shape[1:]), generator=generator, device=dev)
            for layer in model.decoder.noise_layers()]


# ---------------------------------------------------------------- upstream checkpoints -> ours

def upstream_key_map(levels: int) -> tuple[tuple[str, str], ...]:
    """GFPGANv1Clean's names -> ours, as (regex, replacement) applied in order to every key;
    `levels` decoder levels (7 at 512 px)."""
    rules = [(r"^conv_body_first\.", "stem."), (r"^conv_body_down\.", "down."),
             (r"^final_conv\.", "bottleneck."), (r"^final_linear\.", "to_latents."),
             (r"^conv_body_up\.", "up."),
             (r"^condition_(scale|shift)\.(\d+)\.0\.", r"sft_\1.\2.conv1."),
             (r"^condition_(scale|shift)\.(\d+)\.2\.", r"sft_\1.\2.conv2."),
             (r"^stylegan_decoder\.constant_input\.weight$", "decoder.constant"),
             (r"^stylegan_decoder\.style_conv1\.", "decoder.first_conv."),
             (r"^stylegan_decoder\.to_rgb1\.", "decoder.first_rgb."),
             (r"^stylegan_decoder\.noises\.noise0$", "decoder.first_conv.noise")]
    for i in range(levels):  # upstream's flat lists: style_convs 2i, 2i+1 and noise 2i+1, 2i+2 are level i's
        block = f"decoder.blocks.{i}"
        rules += [(rf"^stylegan_decoder\.style_convs\.{2 * i}\.", f"{block}.up_conv."),
                  (rf"^stylegan_decoder\.style_convs\.{2 * i + 1}\.", f"{block}.conv."),
                  (rf"^stylegan_decoder\.to_rgbs\.{i}\.", f"{block}.to_rgb."),
                  (rf"^stylegan_decoder\.noises\.noise{2 * i + 1}$", f"{block}.up_conv.noise"),
                  (rf"^stylegan_decoder\.noises\.noise{2 * i + 2}$", f"{block}.conv.noise")]
    # a StyleConv's own `weight` is its noise strength; then the modulated conv's parts move up a level
    rules += [(r"^(decoder\.(first_conv|blocks\.\d+\.(up_conv|conv)))\.weight$", r"\1.noise_strength"),
              (r"\.modulated_conv\.modulation\.", ".modulation."), (r"\.modulated_conv\.weight$", ".weight")]
    return tuple(rules)


def unused_upstream_keys(levels: int, mapping_layers: int = MAPPING_LAYERS) -> list[str]:
    """The release tensors the restorer never uses, so not converted: StyleGAN2's mapping MLP (the
    encoder's latents go to the decoder directly, input_is_latent=True) and the encoder's RGB heads
    at each level (training losses only; GFPGANer calls return_rgb=False)."""
    mlp = [f"stylegan_decoder.style_mlp.{2 * k + 1}" for k in range(mapping_layers)]  # Linear, LeakyReLU
    return [f"{m}.{p}" for m in mlp + [f"toRGB.{i}" for i in range(levels)] for p in ("weight", "bias")]


def _release_state(path: Path) -> dict:
    """The state dict of a GFPGAN release: params_ema, else params (GFPGANer's choice); a file
    holding anything else at its top level is not one."""
    ckpt = load_torch_file(path)
    known = {"params_ema", "params"}
    if not known & set(ckpt) or set(ckpt) - known:
        raise ValueError(f"{path}: not a GFPGAN checkpoint: expected params_ema and/or params at "
                         f"its top level, found {sorted(map(str, ckpt))[:5]}")
    # with both, params is the training copy that GFPGANer also passes over
    return dict(ckpt["params_ema" if "params_ema" in ckpt else "params"])


def convert_gfpgan(path: Path, builder) -> dict:
    """A GFPGANv1Clean release (or any checkpoint in its layout) -> our state dict for `builder`'s
    model: every tensor renamed or, for `unused_upstream_keys`, dropped by name; a missing,
    unexpected or misshapen tensor is an error naming the file."""
    with torch.device("meta"):
        levels = len(builder().decoder.blocks)
    state = _release_state(path)
    unused = unused_upstream_keys(levels)
    missing = [k for k in unused if k not in state]
    if missing:
        raise ValueError(f"{path}: not GFPGANv1Clean's layout: missing {missing[:5]}")
    for k in unused:
        del state[k]
    return check_complete(rename_keys(state, upstream_key_map(levels)), builder, str(path))


# ---------------------------------------------------------------- builders and the registry

def gfpgan_clean_512() -> GFPGANClean:
    """The architecture of every clean release: 512 px, channel multiplier 2, narrow 1."""
    return GFPGANClean(INPUT_SIZE, channel_multiplier=2, narrow=1.0)


def _converter(builder):
    def convert(paths: Mapping[str, Path]) -> dict:
        (path,) = paths.values()
        return convert_gfpgan(path, builder)

    return convert


RELEASES = "https://github.com/TencentARC/GFPGAN/releases/download"
# GFPGAN's LICENSE: Apache-2.0 except third-party parts; its StyleGAN2 code is modified from
# stylegan2-pytorch (Kim Seonghyeon, MIT), a port of NVlabs/stylegan2 under NVIDIA's licence
# (use "non-commercially", i.e. for research or evaluation only). Nothing separate for the weights.
LICENSE = ("Apache-2.0 (GFPGAN); its StyleGAN2 decoder derives from NVlabs/stylegan2, whose NVIDIA "
           "licence allows non-commercial use only (research or evaluation) where it applies")
NUM_PARAMS = 84_339_239  # of gfpgan_clean_512(); tests/test_models.py recomputes it
RELEASE_SIZE = 348_632_874  # see the module docstring

# (name, file, sha256, URLs, description)
CLEAN_RELEASES = (
    ("gfpgan_v1p3", "GFPGANv1.3.pth", "c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70",
     (f"{RELEASES}/v1.3.0/GFPGANv1.3.pth",),
     "GFPGAN v1.3 (clean), 512 px FFHQ-aligned face restoration; more natural results than v1.2"),
    ("gfpgan_v1p4", "GFPGANv1.4.pth", "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
     (f"{RELEASES}/v1.3.0/GFPGANv1.4.pth", f"{RELEASES}/v1.3.4/GFPGANv1.4.pth"),
     "GFPGAN v1.4 (clean), 512 px FFHQ-aligned face restoration; a little more detail than v1.3. "
     "sha256 and size from third-party manifests, unconfirmed against the release here"),
    ("gfpgan_clean_v1_noce_c2", "GFPGANCleanv1-NoCE-C2.pth",
     "29e25ee90c170f4231163f4c83df6b59c968b73f3ce00cb884015ae005db083c",
     (f"{RELEASES}/v0.2.0/GFPGANCleanv1-NoCE-C2.pth",),
     "GFPGAN v1.2 (GFPGANCleanv1-NoCE-C2: clean, no colourisation), 512 px face restoration. sha256 "
     "from third-party manifests; size assumed equal to v1.3's (same layout), unconfirmed"),
)


def _register() -> None:
    meta = ModelMeta(input_size=(INPUT_SIZE, INPUT_SIZE), mean=tuple(255 * m for m in MEAN),
                     std=tuple(255 * s for s in STD), template="ffhq", scale=1, num_params=NUM_PARAMS)
    for name, filename, sha, urls, description in CLEAN_RELEASES:
        register(WeightSpec(
            name=name, task="enhance", files=(UpstreamFile(filename, sha, RELEASE_SIZE, urls=urls),),
            license=LICENSE, origin="TencentARC/GFPGAN", converter=_converter(gfpgan_clean_512),
            meta=meta, description=description), gfpgan_clean_512)


_register()
