import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("TIDYFACE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
WEIGHTS = SHARED / "weights"
MEDIA = SHARED / "media"


def need(path: Path) -> Path:
    """A file from ../shared, or a one-line skip (CI has ../shared, so nothing skips there)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing, and CI must have ../shared")
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(autouse=True, scope="session")
def _weights_env(tmp_path_factory):
    """Every test resolves weights from ../shared/weights as a mirror, into a private store."""
    old = {k: os.environ.get(k) for k in ("TIDYFACE_HOME", "TIDYFACE_MIRROR", "TIDYFACE_OFFLINE")}
    os.environ["TIDYFACE_HOME"] = str(tmp_path_factory.mktemp("store"))
    os.environ["TIDYFACE_MIRROR"] = str(WEIGHTS)
    os.environ["TIDYFACE_OFFLINE"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# The three test layers (DESIGN.md), each runnable alone: `pytest -m unit`, `-m parity`, `-m realdata`.
PARITY = {"test_facenet", "test_mtcnn", "test_retinaface", "test_mobilefacenet", "test_onnx", "test_fuse", "test_bisenet"}
REAL_DATA = {"test_video2faces", "test_group", "test_verification", "test_detect", "test_plugin"}
REAL_DATA_FIXTURES = {"real_run", "video2_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in PARITY:
            item.add_marker(pytest.mark.parity)
        elif module in REAL_DATA or REAL_DATA_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.realdata)
        else:
            item.add_marker(pytest.mark.unit)
