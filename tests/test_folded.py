"""The CPU paths of models/folded.py compute what the plain PyTorch layers compute."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from tidyface.models import folded


def _ops(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _conv_relu(cin, cout, kernel, stride=1, groups=1):
    torch.manual_seed(0)
    m = folded.ConvReLU(cin, cout, kernel, stride, groups).eval()
    with torch.no_grad():
        m.conv.bias.normal_()  # half the outputs negative: the ReLU has work to do
    return m


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel,stride,groups", [(3, 1, 8), (3, 2, 1), (1, 1, 1)])
def test_conv_relu_on_large_maps_runs_inside_the_convolution(layout, kernel, stride, groups):
    m = _conv_relu(8, 8, kernel, stride, groups)
    side = 1040 if stride == 2 else 520  # 8 x 520 x 520 outputs: just above FUSED_RELU_MIN_VALUES
    x = torch.randn(1, 8, side, side).contiguous(memory_format=layout)
    assert folded._out_values(x, m.conv) == 8 * 520 * 520 >= folded.FUSED_RELU_MIN_VALUES
    want = F.relu(F.conv2d(x, m.conv.weight, m.conv.bias, stride, kernel // 2, 1, groups))
    with torch.inference_mode():
        got = m(x)
        assert "mkldnn::_convolution_pointwise" in _ops(lambda: m(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.min() == 0 and got.is_contiguous(memory_format=layout)


def test_conv_relu_elsewhere_is_conv_then_relu():
    m = _conv_relu(8, 8, 3)
    small = torch.randn(2, 8, 40, 40)
    with torch.inference_mode():
        assert "mkldnn::_convolution_pointwise" not in _ops(lambda: m(small))
    big = torch.randn(1, 8, 520, 520, requires_grad=True)
    out = m(big)  # training keeps the two modules (and their gradients)
    out.sum().backward()
    assert big.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert "mkldnn::_convolution_pointwise" not in _ops(lambda: m(big.detach()))
    torch.testing.assert_close(out.detach(), F.relu(F.conv2d(big.detach(), m.conv.weight, m.conv.bias, 1, 1)),
                               atol=1e-5, rtol=1e-5)


def test_one_by_one_conv_on_onednn_equals_torch_conv():
    torch.manual_seed(0)
    conv = folded.Conv2d(16, 24, 1).eval()
    x = torch.randn(3, 16, 30, 50).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias), atol=1e-5, rtol=1e-5)


def test_stacked_heads_equal_the_heads_one_by_one():
    torch.manual_seed(0)
    heads = [folded.Conv2d(16, c, 3, padding=1).eval() for c in (1, 4, 10)]
    depthwise = [folded.Conv2d(c, c, 3, padding=1, groups=c).eval() for c in (1, 4, 10)]
    x = torch.randn(2, 16, 20, 24)
    with torch.inference_mode():
        y = folded.sibling_convs(x, heads)
        parts = y.split(folded.out_channels(heads), 1)
        for head, part in zip(heads, parts):
            torch.testing.assert_close(part, head(x), atol=1e-5, rtol=1e-5)
        z = folded.depthwise_blocks(y, depthwise).split(folded.out_channels(depthwise), 1)
        for dw, part, got in zip(depthwise, parts, z):
            torch.testing.assert_close(got, dw(part), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="depthwise"):
        folded.depthwise_blocks(y, heads)


@pytest.mark.parametrize("name", ["scrfd_500m", "scrfd_2p5g", "scrfd_10g", "yunet", "centerface"])
def test_declared_peak_activation_is_the_largest_map(name):
    from tidyface.registry import get

    model = get(name).builder().eval()
    peak = []

    def record(module, inputs, out):
        peak.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t))

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 128, 160))
    for h in hooks:
        h.remove()
    assert max(peak) / (128 * 160) == model.peak_activation_per_pixel


def test_images_per_forward_keeps_the_largest_map_in_reused_blocks(monkeypatch):
    from tidyface.ops import memory
    from tidyface.registry import get

    model = get("centerface").builder().eval()
    x = torch.zeros(1, 3, 736, 1280)  # 96 x 368 x 640 values: 90 MB a frame
    monkeypatch.setattr(memory, "_kept_block_bytes", None)  # glibc's policy: one at a time
    assert folded.images_per_forward(model, x) == 1
    monkeypatch.setattr(memory, "_kept_block_bytes", 256 << 20)
    assert folded.images_per_forward(model, x) == 2
    assert folded.images_per_forward(model, x[..., :368, :640]) == 11
    assert folded.images_per_forward(torch.nn.Identity(), x) == 1  # nothing declared

    calls = []
    model.forward = lambda t: (calls.append(len(t)), t.sum((1, 2, 3)))[1]
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 4, 4)
    monkeypatch.setattr(folded, "images_per_forward", lambda m, first: 3)
    out = folded.forward_by_image(model, images, lambda b: b * 2)
    assert calls == [1, 3, 1] and torch.equal(out, torch.arange(5.0) * 96)
