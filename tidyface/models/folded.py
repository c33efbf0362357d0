"""Layers of networks whose published weights are ONNX graphs with BatchNorm already folded
into the convolutions (SCRFD, YuNet, CenterFace): a conv with a bias stands for upstream's
conv + BN, so the converted weights load as they are and compute what the graph computes.
Also how the three run their 1x1 convolutions (Conv2d), a level's heads (sibling_convs,
depthwise_blocks) and a batch (forward_by_image, in groups that fit the allocator's kept blocks; the
enhancers use it too) on the CPU;
RetinaFace's convolutions are Conv2d too (video2faces runs it on one thread, in batches of 4)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and keys) whose 1x1 convolutions of CPU float32 inference go
    to oneDNN: PyTorch sends a 1x1 conv of fewer than 16 images on one thread to its im2col +
    GEMM kernel instead (ConvParams::use_mkldnn), and these nets' thin 1x1 layers on large maps
    run slower there (SCRFD-500M at 640, one thread: 82 against 61 ms, the same values up to
    float rounding; RetinaFace mnet0.25 in video2faces at --video-step 0.25: 22.5 -> 20.1 s for
    the whole run). Training, tracing, autocast (--precision) and other devices keep PyTorch's own
    choice."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.kernel_size == (1, 1) and self.padding_mode == "zeros" and _onednn_inference(x, weight):
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(self.padding), list(self.stride),
                                                     list(self.dilation), self.groups)
        return super()._conv_forward(x, weight, bias)


def _onednn_inference(x: Tensor, weight: Tensor) -> bool:
    """CPU float32 inference, outside training, tracing and autocast, where oneDNN is built in."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.jit.is_tracing() and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available())


def sibling_convs(x: Tensor, convs: Sequence[nn.Conv2d]) -> Tensor:
    """The outputs of convs that read the same map with the same kernel, stride and padding,
    stacked on the channel axis, from one convolution with their filters stacked: a detector
    level's thin heads then read their map once, not once each (SCRFD-500M's three stride-8
    heads: 1.8-2.2 against 3.5-4.5 ms on 2 threads, the same values). Split the result with
    `split(out_channels(convs), 1)`."""
    weight, bias = _stacked(convs)
    return _in_weight_dtype(lambda t: convs[0]._conv_forward(t, weight, bias), x, weight)


def depthwise_blocks(x: Tensor, convs: Sequence[nn.Conv2d]) -> Tensor:
    """Depthwise convs applied to consecutive channel blocks of x (the blocks sibling_convs
    stacks), as one depthwise convolution."""
    if any(c.groups != c.in_channels or c.out_channels != c.in_channels for c in convs):
        raise ValueError("depthwise_blocks takes depthwise convolutions (groups = in = out channels)")
    weight, bias = _stacked(convs)
    c = convs[0]
    return _in_weight_dtype(lambda t: F.conv2d(t, weight, bias, c.stride, c.padding, c.dilation,
                                              weight.shape[0]),
                            x, weight)


def out_channels(convs: Sequence[nn.Conv2d]) -> list[int]:
    return [c.out_channels for c in convs]


def _stacked(convs: Sequence[nn.Conv2d]) -> tuple[Tensor, Tensor]:
    # Built at each call (a few thousand values): loading, casting or training the convs' own
    # parameters then acts on the stacked ones too.
    return torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs])


def _in_weight_dtype(conv: Callable[[Tensor], Tensor], x: Tensor, weight: Tensor) -> Tensor:
    """conv(x) computed in the weights' dtype: under --precision that is the reduced one, or
    float32 for the layers a model keeps there (cache.in_precision, float32_layers)."""
    with torch.autocast(x.device.type, enabled=False):
        return conv(x.to(weight.dtype))


# A ReLU pass over a map this large re-reads it from memory once it has left the CPU caches; oneDNN
# applies the ReLU as the convolution writes instead (CenterFace at 720p: its ConvReLUs 92 -> 81 ms;
# smaller maps, and depthwise convs of many channels, gained nothing or lost: benchmarks/RESULTS.md).
FUSED_RELU_MIN_VALUES = 1 << 21


class ConvReLU(nn.Sequential):
    """Conv2d with bias (upstream conv + BatchNorm, folded by the exporter), then ReLU unless
    relu=False. Padding is kernel // 2, as in every one of these graphs. In CPU float32 inference
    a ReLU whose map has at least FUSED_RELU_MIN_VALUES values runs inside the convolution."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 relu: bool = True):
        super().__init__()
        self.conv = Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)
        if relu:
            self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        if len(self) == 2 and _onednn_inference(x, c.weight) and _out_values(x, c) >= FUSED_RELU_MIN_VALUES:
            return torch.ops.mkldnn._convolution_pointwise(x, c.weight, c.bias, list(c.padding), list(c.stride),
                                                           list(c.dilation), c.groups, "relu", [], "")
        return super().forward(x)


def _out_values(x: Tensor, conv: nn.Conv2d) -> int:
    """How many values conv(x) has (batch x channels x rows x columns)."""
    n = x.shape[0] * conv.out_channels
    for size, k, s, p, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        n *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return n


class DepthwiseSeparable(nn.Sequential):
    """MobileNetV1 unit: 3x3 depthwise ConvReLU (carrying the stride), then 1x1 pointwise ConvReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.depthwise = ConvReLU(cin, cin, 3, stride, groups=cin)
        self.pointwise = ConvReLU(cin, cout, 1)


def forward_by_image(model: nn.Module, images: Tensor, prepare: Callable[[Tensor], Tensor]
                     ) -> Tensor | tuple[Tensor, ...]:
    """model(prepare(images)) for a batch; on the CPU the first image alone (its input says how
    large a forward is), then groups of images_per_forward, each group's input prepared alone too,
    and the outputs concatenated on the batch axis (the same values: no layer mixes images).
    Batches stay whole on other devices."""
    if images.device.type != "cpu" or len(images) <= 1:
        return model(prepare(images))
    first = prepare(images[:1])
    n = images_per_forward(model, first)
    outs = [model(first)] + [model(prepare(images[i:i + n])) for i in range(1, len(images), n)]
    if isinstance(outs[0], Tensor):  # a model with one output (the enhancers)
        return torch.cat(outs)
    return tuple(torch.cat(parts) for parts in zip(*outs))


def images_per_forward(model: nn.Module, one_input: Tensor) -> int:
    """How many CPU images one forward takes: as many as keep its largest activation within the
    blocks the allocator keeps for reuse (ops.memory.keep_freed_memory, which the tidyface command
    sets); the model declares that activation as `peak_activation_per_pixel` values per pixel of
    its input. A bigger one is mapped and page-faulted in anew at every forward. One image where
    either is unknown: with glibc's own policy whole batches were the slowest (YuNet at 1280x736,
    batch 8: 76 ms/frame, 28 one at a time), with the command's they are the fastest (28 against 34;
    SCRFD-500M 21 against 29; CenterFace, 90 MB per image: 150 in pairs, 160 alone, 266 whole;
    benchmarks/RESULTS.md)."""
    from ..ops.memory import kept_block_bytes

    kept, per_pixel = kept_block_bytes(), getattr(model, "peak_activation_per_pixel", None)
    if not kept or not per_pixel:
        return 1
    return max(1, int(kept // (per_pixel * one_input[0, 0].numel() * one_input.element_size())))
