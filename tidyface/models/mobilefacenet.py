"""MobileFaceNet face embedder (Chen et al. 2018, arXiv:1804.07573) as trained by foamliu, 128-d.

Facts from foamliu/MobileFaceNet `mobilefacenet.py` (every version since a383a3a, 2019-11-19, the
first whose module tree matches the v1.0 `mobilefacenet.pt` state dict; all of them use ReLU6 in
the conv-BN-act units and plain ReLU in the stem's separable conv, no PReLU) and
its `data_gen.py` / `lfw_eval.py` (RGB, ToTensor then ImageNet mean/std; 112x112 crops aligned
onto the ArcFace 5-point template; MS1M training images decoded RGB by mxnet).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete, load_torch_file, rename_keys
from ..ops.image import check_crops, normalise
from ..registry import ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from .base import Encoder

INPUT_SIZE = 112
EMBEDDING_DIM = 128
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, on RGB in 0..1
STD = (0.229, 0.224, 0.225)

# (expansion t, output channels c, repeats n, first stride s): the paper's bottleneck table.
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBNAct(nn.Module):
    """Convolution without bias, BatchNorm, then ReLU6 (foamliu's ConvBNReLU)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6(inplace=True)  # in place: one fresh activation fewer per layer

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SeparableConv(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, each with BatchNorm and plain ReLU (not ReLU6)."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.depthwise_bn(self.depthwise(x)))
        return self.act(self.pointwise_bn(self.pointwise(x)))


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise (stride), linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.expand = ConvBNAct(cin, hidden, kernel=1)
        self.depthwise = ConvBNAct(hidden, hidden, kernel=3, stride=stride, groups=hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project_bn(self.project(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class GlobalDepthwise(nn.Module):
    """7x7 depthwise conv over the whole 7x7 map (the paper's GDConv) with BatchNorm, linear."""

    def __init__(self, channels: int, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class EmbeddingHead(nn.Module):
    """Linear 1x1 conv (with bias) to the embedding, then BatchNorm."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, dim, 1)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)).flatten(1)


class MobileFaceNet(nn.Module, Encoder):
    """(B,3,112,112) normalised RGB (see `preprocess`) -> (B,128) L2-normalised embeddings."""

    reduced_precision = True
    traceable_forward = True  # tensor ops whose shapes follow the input's: CPU graphs (ops.graphs)

    def __init__(self, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        self.stem = ConvBNAct(3, 64, kernel=3, stride=2)  # 112 -> 56
        self.stem_separable = SeparableConv(64)
        blocks, cin = [], 64
        for expansion, cout, repeats, stride in BOTTLENECKS:  # 56 -> 28 -> 14 -> 7
            for i in range(repeats):
                blocks.append(Bottleneck(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(cin, 512, kernel=1)
        self.global_depthwise = GlobalDepthwise(512)
        self.embedding = EmbeddingHead(512, embedding_dim)

    def forward_features(self, x: Tensor) -> Tensor:
        """Embeddings before L2 normalisation (upstream sums these for flip augmentation)."""
        x = self.blocks(self.stem_separable(self.stem(x)))
        return self.embedding(self.global_depthwise(self.head(x)))

    def forward(self, x: Tensor) -> Tensor:
        # normalised in float32 under --precision too, so embeddings have unit length
        return F.normalize(self.forward_features(x).float(), dim=1)

    def embed(self, crops: Tensor) -> Tensor:
        """Aligned RGB 0..255 crops (B,3,S,S) -> L2-normalised embeddings: preprocess + forward."""
        return self(preprocess(crops))


def preprocess(images: Tensor) -> Tensor:
    """RGB (B,3,112,112) in 0..255 (aligned onto the ArcFace template) -> the network's input."""
    check_crops(images, INPUT_SIZE, "MobileFaceNet takes RGB")
    x = images.float() if not images.is_floating_point() else images
    return normalise(x, MEAN, STD)


# foamliu's module names -> ours (applied in order to every key, buffers included).
KEY_MAP = (
    (r"^conv1\.0\.", "stem.conv."),
    (r"^conv1\.1\.", "stem.bn."),
    (r"^dw_conv\.depthwise\.", "stem_separable.depthwise."),
    (r"^dw_conv\.bn1\.", "stem_separable.depthwise_bn."),
    (r"^dw_conv\.pointwise\.", "stem_separable.pointwise."),
    (r"^dw_conv\.bn2\.", "stem_separable.pointwise_bn."),
    (r"^features\.(\d+)\.conv\.0\.0\.", r"blocks.\1.expand.conv."),
    (r"^features\.(\d+)\.conv\.0\.1\.", r"blocks.\1.expand.bn."),
    (r"^features\.(\d+)\.conv\.1\.0\.", r"blocks.\1.depthwise.conv."),
    (r"^features\.(\d+)\.conv\.1\.1\.", r"blocks.\1.depthwise.bn."),
    (r"^features\.(\d+)\.conv\.2\.", r"blocks.\1.project."),
    (r"^features\.(\d+)\.conv\.3\.", r"blocks.\1.project_bn."),
    (r"^conv2\.0\.", "head.conv."),
    (r"^conv2\.1\.", "head.bn."),
    (r"^gdconv\.depthwise\.", "global_depthwise.conv."),
    (r"^gdconv\.bn\.", "global_depthwise.bn."),
    (r"^conv3\.", "embedding.conv."),
    (r"^bn\.", "embedding.bn."),
)


def convert_foamliu(paths: Mapping[str, Path]) -> dict:
    """foamliu's `mobilefacenet.pt` (a plain state dict of 307 tensors) -> our names, checked."""
    (path,) = paths.values()
    return check_complete(rename_keys(load_torch_file(path), KEY_MAP), MobileFaceNet, str(path))


register(
    WeightSpec(
        name="mobilefacenet", task="embed",
        files=(UpstreamFile(
            "mobilefacenet.pt", "90a00ba1d8b0b688af3deb731ed53dca582e6106805d1bc3cfdef55f570493f4",
            4_135_271, urls=("https://github.com/foamliu/MobileFaceNet/releases/download/v1.0/"
                             "mobilefacenet.pt",)),),
        license="Apache-2.0", origin="foamliu/MobileFaceNet",
        converter=convert_foamliu,
        meta=ModelMeta(input_size=(INPUT_SIZE, INPUT_SIZE), mean=tuple(255 * m for m in MEAN),
                       std=tuple(255 * v for v in STD), template="arcface", embedding_dim=EMBEDDING_DIM,
                       num_params=999_936),
        # deepface's 300 pairs put it between 0.54 (farthest same-person pair) and 0.60
        # (closest different pair); video faces are farther apart, and on the labelled Video_2
        # faces ARI peaks at 0.65-0.70 (0.77; 0.54 at 0.60)
        # hash_confirm: on Video_2's 122 labelled faces different people are never closer than
        # 0.454 (0.64 among pairs within 8 hash bits), and 72% of same-person pairs within 8
        # bits are under 0.4 (tests/test_dedup_real.py)
        defaults=TaskDefaults(group_threshold=0.65, hash_confirm=0.4, styles=("live",)),
        description="MobileFaceNet (foamliu, MS1M subset), 128-d embeddings of 112x112 ArcFace crops",
    ),
    MobileFaceNet,
)
