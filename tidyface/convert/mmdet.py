"""mmdetection 2.x checkpoints (`{"state_dict": ..., "meta": ...}`) -> tidyface state dicts.

Key names from mmdet 2.x `models/backbones/resnet.py` (torchvision-style `conv1`, `bn1`,
`layerN.i.convK`/`bnK`, `downsample.0`/`.1`), `necks/fpn.py` (ConvModules
`lateral_convs.i.conv`, `fpn_convs.i.conv`), `dense_heads/rpn_head.py` (`rpn_conv`, `rpn_cls`,
`rpn_reg`) and `roi_heads/bbox_heads/convfc_bbox_head.py` (`shared_fcs.i`, `fc_cls`, `fc_reg`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from . import check_complete, load_torch_file, rename_keys

# mmdet name -> tidyface name (regexes, applied in order); a key no rule maps keeps its mmdet
# name and check_complete refuses it, naming the file.
RESNET_KEYS = (
    (r"^(backbone\.layer\d\.\d+)\.downsample\.0\.", r"\1.downsample.conv."),
    (r"^(backbone\.layer\d\.\d+)\.downsample\.1\.", r"\1.downsample.bn."),
)
FPN_KEYS = (
    (r"^neck\.lateral_convs\.(\d)\.conv\.", r"neck.lateral\1."),
    (r"^neck\.fpn_convs\.(\d)\.conv\.", r"neck.output\1."),
)
RPN_KEYS = (
    (r"^rpn_head\.rpn_conv\.", "rpn.conv."),
    (r"^rpn_head\.rpn_cls\.", "rpn.cls."),
    (r"^rpn_head\.rpn_reg\.", "rpn.reg."),
)
SHARED2FC_KEYS = (
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "box_head.fc1."),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.", "box_head.fc2."),
    (r"^roi_head\.bbox_head\.fc_cls\.", "box_head.cls."),
    (r"^roi_head\.bbox_head\.fc_reg\.", "box_head.reg."),
)
FASTER_RCNN_FPN_KEYS = RESNET_KEYS + FPN_KEYS + RPN_KEYS + SHARED2FC_KEYS


def convert_mmdet(path: str | Path, builder: Callable, rules: Iterable[tuple[str, str]] = FASTER_RCNN_FPN_KEYS
                  ) -> dict:
    """An mmdet checkpoint file (or its state dict) -> `builder()`'s state dict, every tensor
    renamed by `rules`; leftovers, missing keys and wrong shapes are refused naming the file."""
    state = load_torch_file(Path(path)) if isinstance(path, (str, Path)) else dict(path)
    source = str(path) if isinstance(path, (str, Path)) else "mmdet state dict"
    return check_complete(rename_keys(state, rules), builder, source)
