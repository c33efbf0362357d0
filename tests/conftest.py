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
