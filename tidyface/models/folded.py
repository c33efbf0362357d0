"""Layers of networks whose published weights are ONNX graphs with BatchNorm already folded
into the convolutions (SCRFD, YuNet, CenterFace): a conv with a bias stands for upstream's
conv + BN, so the converted weights load as they are and compute what the graph computes."""
from __future__ import annotations

from torch import nn


class ConvReLU(nn.Sequential):
    """Conv2d with bias (upstream conv + BatchNorm, folded by the exporter), then ReLU unless
    relu=False. Padding is kernel // 2, as in every one of these graphs."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)
        if relu:
            self.act = nn.ReLU(inplace=True)


class DepthwiseSeparable(nn.Sequential):
    """MobileNetV1 unit: 3x3 depthwise ConvReLU (carrying the stride), then 1x1 pointwise ConvReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.depthwise = ConvReLU(cin, cin, 3, stride, groups=cin)
        self.pointwise = ConvReLU(cin, cout, 1)
