"""tidyface: faces in photos and videos, with clean PyTorch reimplementations of face models."""
from __future__ import annotations

__version__ = "0.1.0"

from .registry import list_models  # noqa: E402  (light: no torch)

__all__ = ["load_model", "list_models", "detect", "Detections", "WeightsError", "__version__"]


def __getattr__(name):  # torch-heavy parts load on first use, keeping `import tidyface` cheap
    if name == "load_model":
        from .weights import load_model
        return load_model
    if name == "WeightsError":
        from .weights import WeightsError
        return WeightsError
    if name == "detect":
        from .tasks.detect import detect
        return detect
    if name == "Detections":
        from .types import Detections
        return Detections
    raise AttributeError(f"module 'tidyface' has no attribute {name!r}")
