"""Where the benchmarks find the checkout and `../shared`. Importing it also points the weights
store's mirror at `shared/weights` (unless TIDYFACE_MIRROR is set) and lets the benchmarks import
the test helpers (`refshim`) and an uninstalled `tidyface`."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TIDYFACE_SHARED", ROOT.parent / "shared"))
VIDEO = SHARED / "media/simplefr_video_with_identity_db/Video_2.mp4"  # 1280x720, 82 s TV scene

for _p in (ROOT / "tests", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("TIDYFACE_MIRROR", str(SHARED / "weights"))
