"""animesion's Vision Transformers (Dosovitskiy et al. 2021, arXiv:2010.11929) trained on DAF:re
anime faces: the ViT-B/16 and ViT-L/16 encoders that video-to-faces groups anime characters with.

Facts from arkel23/animesion `classification_tagging/models/vit_animesion/` (`model.py`,
`transformer.py`, `configs.py`: lukemelas/PyTorch-Pretrained-ViT's layout and key names, a 16x16
conv patch embedding, class token, learned position embeddings for 8x8 + 1 tokens at 128 px,
pre-norm blocks, LayerNorm eps 1e-12, exact erf GELU, attention scaled by sqrt(head width), the
final norm before the classifier `fc`; `utilities/model_selection.py` and `misc.py`: the .ckpt is
the state dict of a wrapper holding that ViT as `model`; `inference.py`: (x/255 - 0.5)/0.5) and
sephirot-github/video-to-faces `src/videotofaces/encoders/vit.py` (the two checkpoints and their
Google Drive ids, `fc` dropped, the CLS token after the final norm as the feature, faces resized
to 128x128 by cv2.dnn.blobFromImages and fed RGB as (x - 127.5)/127.5).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete, load_torch_file, rename_keys
from ..ops.image import check_crops, normalise
from ..registry import ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from .base import Encoder

INPUT_SIZE, PATCH, LN_EPS = 128, 16, 1e-12
MEAN = STD = (0.5, 0.5, 0.5)  # on RGB in 0..1: (x - 127.5) / 127.5 on 0..255


class SelfAttention(nn.Module):
    """Multi-head self-attention; q, k and v from one fused projection (one matrix product
    instead of animesion's three), softmax(q k^T / sqrt(head width)) v, then the output
    projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # (B,N,3D) -> 3 x (B,heads,N,D/heads); -1 keeps a traced graph free of frozen sizes
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # scale: 1/sqrt(head width), as upstream
        return self.out(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Linear to 4x the width, exact (erf) GELU, linear back."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(.))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = FeedForward(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module, Encoder):
    """(B,3,128,128) normalised RGB (see `preprocess`) -> (B,dim) L2-normalised embeddings."""

    reduced_precision = True

    def __init__(self, dim: int, depth: int, heads: int, image_size: int = INPUT_SIZE,
                 patch: int = PATCH):
        super().__init__()
        grid = image_size // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward_features(self, x: Tensor) -> Tensor:
        """The class token after the final norm (what video-to-faces groups by), unnormalised.
        LayerNorm acts on each token alone, so normalising only the class token is the same as
        animesion's norm over all tokens followed by taking token 0."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, grid*grid, dim), row-major
        x = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        # normalised in float32 under --precision too, so embeddings have unit length
        return F.normalize(self.forward_features(x).float(), dim=1)

    def embed(self, crops: Tensor) -> Tensor:
        """RGB 0..255 crops (B,3,128,128) -> L2-normalised embeddings: preprocess + forward."""
        return self(preprocess(crops))


def preprocess(images: Tensor) -> Tensor:
    """RGB (B,3,128,128) in 0..255 (the face box stretched to 128x128) -> the network's input."""
    check_crops(images, INPUT_SIZE, "the anime ViT takes RGB")
    x = images if images.is_floating_point() else images.float()
    return normalise(x, MEAN, STD)


def vit_b16() -> VisionTransformer:
    return VisionTransformer(dim=768, depth=12, heads=12)


def vit_l16() -> VisionTransformer:
    return VisionTransformer(dim=1024, depth=24, heads=16)


# ---------------------------------------------------------------- animesion checkpoint -> ours

ANIMESION_KEYS = (  # applied in order to every key
    (r"^model\.", ""),  # the training wrapper holds the ViT as `model`
    (r"^patch_embedding\.", "patch_embed."),
    (r"^positional_embedding\.pos_embedding$", "pos_embed"),
    (r"^transformer\.blocks\.(\d+)\.proj\.", r"blocks.\1.attn.out."),
    (r"^transformer\.blocks\.(\d+)\.pwff\.", r"blocks.\1.mlp."),
    (r"^transformer\.blocks\.(\d+)\.", r"blocks.\1."),
)
# The DAF:re character classifier (3263 classes in video-to-faces' classify mode): not part of
# the embedding, so dropped by name; any other key left over is refused by check_complete.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


def _fuse_qkv(state: dict, source: str) -> dict:
    """animesion's separate attn.proj_q/k/v (weights and biases) -> our attn.qkv, q then k then v."""
    out = {}
    for key in list(state):
        if ".attn.proj_q." not in key:
            continue
        parts = [state.pop(key.replace("proj_q", f"proj_{c}"), None) for c in "qkv"]
        if any(p is None for p in parts):
            raise ValueError(f"{source}: {key}: the block lacks one of proj_q, proj_k, proj_v")
        out[key.replace("proj_q", "qkv")] = torch.cat(parts, 0)
    return {**state, **out}


def animesion_state(state: Mapping[str, Tensor], builder, source: str) -> dict:
    """An animesion ViT state dict (wrapper prefix optional) -> ours, every tensor accounted for:
    renamed, fused into qkv, or the classifier head dropped; anything else is an error naming
    `source`."""
    ours = rename_keys(dict(state), ANIMESION_KEYS)
    for key in CLASSIFIER_KEYS:
        ours.pop(key, None)
    return check_complete(_fuse_qkv(ours, source), builder, source)


def _animesion_converter(builder):
    def convert(paths: Mapping[str, Path]) -> dict:
        (path,) = paths.values()
        return animesion_state(load_torch_file(path), builder, str(path))

    return convert


# ---------------------------------------------------------------- registry

# Drive's file host for each file id, then video-to-faces' own request (its utils/download.py:
# the uc endpoint with confirm=1, to pass the "too large to scan" page).
_DRIVE = ("https://drive.usercontent.google.com/download?id={}&export=download&confirm=t",
          "https://drive.google.com/uc?id={}&confirm=1")
# The authors published no sha256 or size, and no copy can be had on these machines: both are
# unknown (None), so the store prints and records the sha256 of the first download.
UNKNOWN = None

# No real weights here, so no threshold could be measured: the tasks' generic defaults apply.
_DEFAULTS = TaskDefaults()

# (name, builder, width, parameters, checkpoint file, Drive id, size in video-to-faces' Drive listing)
VARIANTS = (
    ("vit_anime_b16", vit_b16, 768, 85_697_280,
     "verify_danbooruFaces_b16_ptTrue_batch16_imageSize128_50epochs_epochDecay20.ckpt",
     "1hEtmrzlh7RrXuUoxi5eqMQd5yIirQ-XC", "336.6 MB"),
    ("vit_anime_l16", vit_l16, 1024, 303_166_464,
     "verify_danbooruFaces_l16_ptTrue_batch16_imageSize128_50epochs_epochDecay20.ckpt",
     "1eZai1_gjos6TNeQZg6IY-cIWxtg0Pxah", "1.14 GB"),
)


def _register() -> None:
    for name, builder, width, params, filename, drive_id, listed in VARIANTS:
        register(WeightSpec(
            name=name, task="embed",
            files=(UpstreamFile(filename, UNKNOWN, UNKNOWN, urls=tuple(u.format(drive_id) for u in _DRIVE)),),
            license="MIT", origin="arkel23/animesion (as used by nsndp/video-to-faces)",
            converter=_animesion_converter(builder),
            # template "box": anime faces have no 5 points; the face box is stretched onto the
            # input, as video-to-faces resizes its box crops
            meta=ModelMeta(input_size=(INPUT_SIZE, INPUT_SIZE), mean=tuple(255 * m for m in MEAN),
                           std=tuple(255 * s for s in STD), template="box", embedding_dim=width,
                           num_params=params),
            # B/16: video-to-faces' default anime encoder (L/16 has 3.5x its parameters)
            defaults=_DEFAULTS if name != "vit_anime_b16" else replace(_DEFAULTS, styles=("anime",)),
            description=f"animesion ViT-{name[-3:].upper()} (DAF:re faces), {width}-d embeddings of "
                        f"128x128 anime face boxes (the checkpoint's 3263-character classifier is "
                        f"dropped); sha256 and size not published (video-to-faces lists {listed})"),
            builder)


_register()
