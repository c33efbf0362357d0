"""tidyface: faces in photos and videos, with clean PyTorch reimplementations of face models.

Images are RGB, uint8 or float in 0..255. The functions (each also a `tidyface` command):

    detect(images, model=...)           -> Detections (boxes, scores, landmarks, image_index)
    crop(images, output_size, ...)      -> Faces (crops, crop_mat, detections); Cropper for many
    uncrop(crops, matrices, size), paste_back(image, crop, matrix)   pixels back into the image
    embed(paths, model=...)             -> FaceTable (one row per face, with embeddings)
    group(path, out, mode=...)          -> the faces of a folder sorted by person
    video_to_faces(input, **flags)      -> videos in, faces grouped per person out
    parse(images)                       -> Faces with masks: each face's class map on its aligned crop
    anonymize(images, **flags)          -> the images with every face obscured (`tidyface anonymize`
                                           does photos and videos on disk)
    read_faces(result)                  -> the FaceTable of an embed, group or video2faces result
    load_model(name), list_models()     the model zoo; ModelCache for tasks that share models
    Detector, Landmarker, Encoder, Parser, Enhancer   the model protocols a plugin implements
"""
from __future__ import annotations

__version__ = "0.1.0"

from .registry import list_models  # noqa: E402  (light: no torch)

# name -> module that defines it; torch-heavy parts load on first use, keeping `import tidyface` cheap
_LAZY = {
    "load_model": "weights", "WeightsError": "weights",
    "Detections": "types", "Faces": "types", "FaceTable": "types", "read_faces": "results",
    "ModelCache": "cache", "TidyfaceError": "errors",
    "Detector": "models.base", "Landmarker": "models.base", "Encoder": "models.base", "Parser": "models.base",
    "Enhancer": "models.base",
    "detect": "tasks.detect", "landmarks": "tasks.detect",
    "embed": "tasks.embed",
    "group": "tasks.group:run_group",
    "Cropper": "tasks.crop", "crop": "tasks.crop", "uncrop": "tasks.crop", "paste_back": "tasks.crop",
    "video_to_faces": "tasks.video2faces",
    "anonymize": "tasks.anonymize",
    "parse": "tasks.parse",
    "enhance": "tasks.enhance",
}
__all__ = ["list_models", "__version__", *_LAZY]


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, _, attr = _LAZY[name].partition(":")
        return getattr(importlib.import_module(f".{module}", __name__), attr or name)
    raise AttributeError(f"module 'tidyface' has no attribute {name!r}")
