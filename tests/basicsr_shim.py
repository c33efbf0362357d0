"""Test-only stand-in for the few basicsr pieces that GFPGAN's clean architecture files import,
and the GFPGAN reference built through it (random weights) in the upstream checkpoint layout.

gfpgan (PyPI 1.3.8, installed --no-deps) imports basicsr, which does not import on this torch
(it needs torchvision and compiled ops). `gfpgan/archs/gfpganv1_clean_arch.py` and
`stylegan2_clean_arch.py` only need `basicsr.utils.registry.ARCH_REGISTRY` (a decorator that
records the class) and `basicsr.archs.arch_util.default_init_weights` (kaiming-normal init, a
scale, a bias fill); both are written here from their definitions. The package's own
`__init__` files import every arch, dataset and model module (basicsr's training code), so
`gfpgan` and `gfpgan.archs` are entered as bare packages over the installed folders, and only
the two arch files ever run.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

CLEAN_ARCH = "gfpgan.archs.gfpganv1_clean_arch"


class _Registry:
    """basicsr's Registry: `@ARCH_REGISTRY.register()` returns the class unchanged."""

    def __init__(self, name: str):
        self.name, self.classes = name, {}

    def register(self, obj=None):
        def add(o):
            self.classes[o.__name__] = o
            return o

        return add if obj is None else add(obj)


@torch.no_grad()
def _default_init_weights(module_list, scale=1, bias_fill=0, **kwargs):
    # basicsr arch_util: kaiming-normal weights (kwargs: a, mode, nonlinearity) times `scale`,
    # biases set to `bias_fill`, for the convs and linears of each module
    for module in module_list if isinstance(module_list, list) else [module_list]:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, **kwargs)
                m.weight.mul_(scale)
                if m.bias is not None:
                    m.bias.fill_(bias_fill)


def _package(name: str, folder: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [folder]
    sys.modules[name] = mod
    return mod


def install() -> None:
    """Make `import gfpgan.archs.gfpganv1_clean_arch` work without basicsr (a no-op for gfpgan
    when it is not installed: importing the arch then fails, and conftest.reference skips)."""
    if "basicsr.archs.arch_util" not in sys.modules:
        registry = types.ModuleType("basicsr.utils.registry")
        registry.ARCH_REGISTRY = _Registry("arch")
        arch_util = types.ModuleType("basicsr.archs.arch_util")
        arch_util.default_init_weights = _default_init_weights
        basicsr, utils, archs = (types.ModuleType(n) for n in ("basicsr", "basicsr.utils", "basicsr.archs"))
        basicsr.utils, basicsr.archs, utils.registry, archs.arch_util = utils, archs, registry, arch_util
        for mod in (basicsr, utils, registry, archs, arch_util):
            sys.modules[mod.__name__] = mod
    if "gfpgan" in sys.modules:
        return
    spec = importlib.util.find_spec("gfpgan")  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return
    folder = list(spec.submodule_search_locations)[0]
    _package("gfpgan", folder).archs = _package("gfpgan.archs", os.path.join(folder, "archs"))


# GFPGANer's clean-arch settings (gfpgan/utils.py), the ones every clean release uses
GFPGANER_CLEAN = dict(num_style_feat=512, decoder_load_path=None, fix_decoder=False, num_mlp=8,
                      input_is_latent=True, different_w=True, narrow=1, sft_half=True)


# StyleConv noise strengths and biases, ToRGB biases: the decoder parameters upstream sets to 0
_CONSTANT_AT_INIT = re.compile(
    r"^stylegan_decoder\.(style_conv1|style_convs\.\d+|to_rgb1|to_rgbs\.\d+)\.(weight|bias)$")


def reference_gfpgan(arch, out_size: int = 512, channel_multiplier: int = 2, seed: int = 0, **overrides):
    """upstream GFPGANv1Clean with GFPGANer's settings and seeded random weights, in eval mode.
    The parameters upstream starts at constants (noise strengths and StyleConv / ToRGB biases at
    0) get random values too, so that a path they gate (noise injection, a bias) cannot be
    missing or misplaced on our side and still match."""
    torch.manual_seed(seed)
    ref = arch.GFPGANv1Clean(out_size=out_size, channel_multiplier=channel_multiplier,
                             **{**GFPGANER_CLEAN, **overrides})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if _CONSTANT_AT_INIT.match(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return ref.eval()


def upstream_checkpoint(ref: nn.Module, path: Path, key: str = "params_ema") -> dict:
    """Save `ref`'s state dict as the releases do ({"params_ema": state}); returns the state."""
    state = ref.state_dict()
    torch.save({key: state}, path)
    return state


_RELEASE_STANDIN: list[Path] = []


def gfpgan_release_standin(path: Path) -> None:
    """A stand-in for the 512 px, channel-multiplier-2 releases (GFPGANv1.3, v1.4, NoCE-C2 share
    the architecture): written once per process from the reference (~350 MB), then linked."""
    install()
    from conftest import reference

    if not _RELEASE_STANDIN:
        arch = reference(CLEAN_ARCH)
        folder = tempfile.mkdtemp(prefix="tidyface-gfpgan-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        target = Path(folder) / "GFPGAN-standin.pth"
        upstream_checkpoint(reference_gfpgan(arch), target)
        _RELEASE_STANDIN.append(target)
    Path(path).symlink_to(_RELEASE_STANDIN[0])
