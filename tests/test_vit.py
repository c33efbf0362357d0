"""animesion's anime-face ViT-B/16 and ViT-L/16 (tidyface/models/vit.py): converter and parity.

No copy of the animesion checkpoints can be had on these machines (../shared/README), so the
weights are random, written under animesion's own checkpoint keys (the training wrapper's
`model.` prefix, separate attn.proj_q/k/v, the block-level `proj`, `pwff`, the DAF:re classifier
`fc`; arkel23/animesion vit_animesion/model.py, transformer.py, utilities/model_selection.py).

Parity: tidyface's converter maps them onto tidyface's ViT; this file's own key map puts the same
tensors into timm's VisionTransformer (PyPI timm 1.0.31, test-only; torchvision stood in for below)
configured the same: 128 px, patch 16, class token, learned position embeddings that cover it,
LayerNorm eps 1e-12, exact GELU, qkv bias, no pre-norm, no pre-logits, no head. Both see the same
preprocessed anime faces (../shared tidy_torch_models); timm's explicit attention path is used
(fused_attn off), tidyface's is torch's fused kernel. Measured max abs differences of the
features (class token after the final norm, before L2), 1 and 2 CPU threads alike: B/16 1.67e-6
(2 faces, values up to 3.99), L/16 9.54e-7 (1 face, up to 3.22; its 24 blocks cycle through 4
random ones); asserted <= 1e-4 (DESIGN.md's fp32 parity). Negative control: q and k swapped in
block 0 moves the B/16 features by 1.21, so the comparison can fail.
Preprocessing: our normalisation of 128x128 crops equals video-to-faces' cv2.dnn.blobFromImages
(1/127.5, mean 127.5, swapRB) to 6.0e-8 (float32 rounding); asserted <= 1e-6.

Converter: a synthetic checkpoint (each tensor a distinct constant, stride-0 so the file takes
65 kB for B/16, 128 kB for L/16 at the real shapes) converts with every tensor where this file's
own map says (q, k, v concatenated in that order), the classifier dropped; an extra key and a
missing proj_k are each refused naming the file. STAND_INS writes the same files for
tests/test_models.py's converter check.
"""
import sys
import types
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from conftest import MEDIA, need, reference
from tidyface.models.vit import VARIANTS, VisionTransformer, animesion_state, preprocess
from tidyface.ops.image import read_image
from tidyface.registry import get

PARITY_TOL = 1e-4
# (dim, depth, heads) of animesion's B_16 and L_16 configs (vit_animesion/configs.py)
CONFIGS = {"vit_anime_b16": (768, 12, 12), "vit_anime_l16": (1024, 24, 16)}
BUILDERS = {name: builder for name, builder, *_ in VARIANTS}
CLASSES = 3263  # DAF:re characters: the classifier the checkpoints carry


# ------------------------------------------------------------- animesion's checkpoint layout

def _block_shapes(i: int, dim: int) -> dict:
    p = f"model.transformer.blocks.{i}."
    shapes = {}
    for name, out, cin in (("attn.proj_q", dim, dim), ("attn.proj_k", dim, dim), ("attn.proj_v", dim, dim),
                           ("proj", dim, dim), ("pwff.fc1", 4 * dim, dim), ("pwff.fc2", dim, 4 * dim)):
        shapes[f"{p}{name}.weight"], shapes[f"{p}{name}.bias"] = (out, cin), (out,)
    for norm in ("norm1", "norm2"):
        shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (dim,)
    return shapes


def animesion_shapes(dim: int, depth: int) -> dict:
    """Key -> shape of animesion's VisionTransformer.state_dict() for a 128 px, patch 16 ViT."""
    shapes = {"model.class_token": (1, 1, dim), "model.patch_embedding.weight": (dim, 3, 16, 16),
              "model.patch_embedding.bias": (dim,), "model.positional_embedding.pos_embedding": (1, 65, dim)}
    for i in range(depth):
        shapes.update(_block_shapes(i, dim))
    shapes.update({"model.norm.weight": (dim,), "model.norm.bias": (dim,),
                   "model.fc.weight": (CLASSES, dim), "model.fc.bias": (CLASSES,)})
    return shapes


def random_checkpoint(dim: int, depth: int, distinct_blocks: int | None = None, seed: int = 0) -> dict:
    """Random tensors in animesion's layout, scaled so that attention is not uniform (q.k has
    unit spread per head) and every block matters: a q/k mix-up must show. distinct_blocks:
    the blocks cycle through that many random ones (views, so L/16's 24 cost what 4 do)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in animesion_shapes(dim, depth).items():
        parts = key.split(".")
        if distinct_blocks and parts[1] == "transformer" and int(parts[3]) >= distinct_blocks:
            parts[3] = str(int(parts[3]) % distinct_blocks)
            state[key] = state[".".join(parts)]
            continue
        t = torch.randn(shape, generator=g)
        if parts[-2] in ("norm1", "norm2", "norm") and parts[-1] == "weight":
            t = t.mul_(0.1).add_(1)
        elif parts[-1] == "bias":
            t = t.mul_(0.1)
        else:
            t = t.div_(float(np.prod(shape[1:])) ** 0.5)  # unit gain: std 1/sqrt(fan in)
        state[key] = t
    return state


def constant_checkpoint(dim: int, depth: int) -> dict:
    """Each tensor filled with its own index (a stride-0 view of one number: tiny when saved)."""
    return {key: torch.tensor(float(i)).expand(shape)
            for i, (key, shape) in enumerate(animesion_shapes(dim, depth).items())}


def _save_constant(name: str, path) -> None:
    torch.save(constant_checkpoint(*CONFIGS[name][:2]), path)


# For tests/test_models.py's converter check (STAND_INS): the upstream files are not in ../shared.
STAND_INS = {name: partial(_save_constant, name) for name in CONFIGS}


# ------------------------------------------------------------- timm, the reference

def _stand_in_torchvision() -> None:
    """timm imports a few torchvision names when it loads (FrozenBatchNorm2d, InterpolationMode,
    ToTensor, dataset classes) and uses none of them in a ViT. No CPU torchvision matches this
    torch, so where none imports, placeholders are added under those names, beside whatever
    tests/refshim.py has already put there."""
    try:
        from torchvision.datasets import ImageFolder  # noqa: F401
        from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: F401
        from torchvision.transforms import ToTensor  # noqa: F401
        from torchvision.transforms.functional import InterpolationMode  # noqa: F401
        return
    except Exception:
        pass
    import enum

    def module(name: str) -> types.ModuleType:
        mod = sys.modules.get(name)
        if mod is None:
            mod = sys.modules[name] = types.ModuleType(name)
            if "." in name:
                parent, child = name.rsplit(".", 1)
                setattr(module(parent), child, mod)
        return mod

    def place(modname: str, attr: str, value) -> None:
        if not hasattr(module(modname), attr):
            setattr(module(modname), attr, value)

    place("torchvision.ops.misc", "FrozenBatchNorm2d", type("FrozenBatchNorm2d", (nn.Module,), {}))
    place("torchvision.transforms", "ToTensor", type("ToTensor", (), {}))
    place("torchvision.transforms.functional", "InterpolationMode",
          enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS"))
    for name in ("CIFAR10", "CIFAR100", "FashionMNIST", "INaturalist", "ImageFolder", "ImageNet",
                 "KMNIST", "MNIST", "Places365", "QMNIST"):
        place("torchvision.datasets", name, type(name, (), {}))


def timm_state(ckpt: dict, depth: int) -> dict:
    """animesion's keys -> timm's VisionTransformer keys, written out here (not tidyface's map)."""
    m = "model."
    out = {"patch_embed.proj.weight": ckpt[m + "patch_embedding.weight"],
           "patch_embed.proj.bias": ckpt[m + "patch_embedding.bias"],
           "cls_token": ckpt[m + "class_token"], "pos_embed": ckpt[m + "positional_embedding.pos_embedding"],
           "norm.weight": ckpt[m + "norm.weight"], "norm.bias": ckpt[m + "norm.bias"]}
    for i in range(depth):
        src, dst = f"{m}transformer.blocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat([ckpt[f"{src}attn.proj_{c}.{p}"] for c in "qkv"])
            out[f"{dst}attn.proj.{p}"] = ckpt[f"{src}proj.{p}"]
            for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "pwff.fc1"),
                                 ("mlp.fc2", "pwff.fc2")):
                out[f"{dst}{ours}.{p}"] = ckpt[f"{src}{theirs}.{p}"]
    return out


def timm_vit(name: str, ckpt: dict) -> nn.Module:
    _stand_in_torchvision()
    vt = reference("timm.models.vision_transformer")
    dim, depth, heads = CONFIGS[name]
    with torch.device("meta"):
        model = vt.VisionTransformer(
            img_size=128, patch_size=16, num_classes=0, global_pool="token", embed_dim=dim, depth=depth,
            num_heads=heads, mlp_ratio=4.0, qkv_bias=True, class_token=True, no_embed_class=False,
            pre_norm=False, fc_norm=False, norm_layer=partial(nn.LayerNorm, eps=1e-12),
            act_layer=nn.GELU, weight_init="skip")
    model.load_state_dict(timm_state(ckpt, depth), strict=True, assign=True)
    for block in model.blocks:  # timm's explicit softmax(q k^T * scale) v, not the fused kernel
        block.attn.fused_attn = False  # that tidyface calls: the two paths stay independent
    return model.eval()


def tidyface_vit(name: str, ckpt: dict) -> VisionTransformer:
    builder = BUILDERS[name]
    with torch.device("meta"):
        model = builder()
    model.load_state_dict(animesion_state(ckpt, builder, "random weights"), strict=True, assign=True)
    return model.eval()


def anime_faces(n: int) -> torch.Tensor:
    """(n,3,128,128) float RGB 0..255: whole anime face pictures resized as video-to-faces does
    (cv2 bilinear)."""
    import cv2

    names = ("aniface1.jpg", "aniface2.jpg")[:n]
    faces = [cv2.resize(read_image(need(MEDIA / "tidy_torch_models" / f)), (128, 128),
                        interpolation=cv2.INTER_LINEAR) for f in names]
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float()


# ------------------------------------------------------------- tests

# (variant, faces, distinct random blocks): L/16 kept cheap, one face and 4 blocks cycled
PARITY = [("vit_anime_b16", 2, None), ("vit_anime_l16", 1, 4)]


@pytest.mark.parametrize("name, faces, distinct", PARITY, ids=[p[0] for p in PARITY])
def test_features_match_timm_on_the_same_weights(name, faces, distinct):
    dim, depth, _ = CONFIGS[name]
    ckpt = random_checkpoint(dim, depth, distinct)
    ref, ours = timm_vit(name, ckpt), tidyface_vit(name, ckpt)
    crops = anime_faces(faces)
    x = preprocess(crops)
    with torch.inference_mode():
        want, got = ref(x), ours.forward_features(x)
        emb = ours.embed(crops.to(torch.uint8))
    assert got.shape == want.shape == (faces, dim)
    diff = float((got - want).abs().max())
    print(f"{name}: features max abs diff {diff:.2e} (max |value| {float(want.abs().max()):.2f})")
    assert diff <= PARITY_TOL
    # the encoder's output: the same feature, L2-normalised, from uint8 0..255 crops
    torch.testing.assert_close(emb, torch.nn.functional.normalize(want, dim=1), atol=PARITY_TOL, rtol=0)
    if name == "vit_anime_b16":  # negative control: a q/k mix-up in one block must show
        swapped = dict(ckpt)
        q, k = (f"model.transformer.blocks.0.attn.proj_{c}.weight" for c in "qk")
        swapped[q], swapped[k] = ckpt[k], ckpt[q]
        with torch.inference_mode():
            off = float((tidyface_vit(name, swapped).forward_features(x[:1]) - want[:1]).abs().max())
        print(f"{name}: q and k swapped in block 0: max abs diff {off:.2e}")
        assert off > 100 * PARITY_TOL


def test_preprocess_matches_video_to_faces_blob():
    cv2 = pytest.importorskip("cv2")
    crops = anime_faces(2)
    bgr = [np.ascontiguousarray(c.permute(1, 2, 0).numpy().astype(np.uint8)[:, :, ::-1]) for c in crops]
    blob = cv2.dnn.blobFromImages(bgr, 1 / 127.5, (128, 128), (127.5, 127.5, 127.5), swapRB=True)
    np.testing.assert_allclose(preprocess(crops.to(torch.uint8)).numpy(), blob, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="128"):
        preprocess(torch.zeros(1, 3, 112, 112))


def _expected_sources(name: str) -> dict:
    """Our key -> the animesion keys whose tensors it must hold (three for qkv, in order)."""
    dim, depth, _ = CONFIGS[name]
    m = "model."
    want = {"class_token": [m + "class_token"], "pos_embed": [m + "positional_embedding.pos_embedding"]}
    for p in ("weight", "bias"):
        want[f"patch_embed.{p}"], want[f"norm.{p}"] = [f"{m}patch_embedding.{p}"], [f"{m}norm.{p}"]
    for i in range(depth):
        src = f"{m}transformer.blocks.{i}."
        for p in ("weight", "bias"):
            want[f"blocks.{i}.attn.qkv.{p}"] = [f"{src}attn.proj_{c}.{p}" for c in "qkv"]
            want[f"blocks.{i}.attn.out.{p}"] = [f"{src}proj.{p}"]
            for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "pwff.fc1"),
                                 ("mlp.fc2", "pwff.fc2")):
                want[f"blocks.{i}.{ours}.{p}"] = [f"{src}{theirs}.{p}"]
    return want


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converter_places_every_tensor(name, tmp_path):
    spec = get(name).spec
    path = tmp_path / spec.files[0].filename
    STAND_INS[name](path)
    index = {key: i for i, key in enumerate(animesion_shapes(*CONFIGS[name][:2]))}
    state = spec.converter({path.name: path})
    want = _expected_sources(name)
    assert set(state) == set(want)
    used = set()
    for key, sources in want.items():
        chunks = state[key].chunk(len(sources))  # qkv: q, k, v stacked on the output axis
        for chunk, src in zip(chunks, sources):  # constant per source: its two ends tell
            assert chunk.flatten()[[0, -1]].tolist() == [index[src]] * 2, (key, src)
        used.update(sources)
    # every upstream tensor is used, except the classifier head, dropped on purpose
    assert set(index) - used == {"model.fc.weight", "model.fc.bias"}


def test_converter_refuses_leftovers_and_gaps(tmp_path):
    spec = get("vit_anime_b16").spec
    path = tmp_path / spec.files[0].filename
    ckpt = constant_checkpoint(*CONFIGS["vit_anime_b16"][:2])
    torch.save({**ckpt, "model.pre_logits.weight": torch.zeros(768, 768)}, path)
    with pytest.raises(ValueError, match=rf"{path.name}.*unexpected \['pre_logits.weight'\]"):
        spec.converter({path.name: path})
    del ckpt["model.transformer.blocks.3.attn.proj_k.bias"]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=rf"{path.name}: blocks.3.attn.proj_q.bias: the block lacks one of"):
        spec.converter({path.name: path})
