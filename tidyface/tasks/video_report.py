"""What video2faces shows people: drawn frames, the rejects log, the index page of groups."""
from __future__ import annotations

import html
import threading
from pathlib import Path

import numpy as np

from ..ops.image import atomic_write_bytes


def draw_frame(image: np.ndarray, boxes, scores, rejected) -> np.ndarray:
    """Downscaled to fit 1024 px; kept boxes green, rejected red, with scores."""
    import cv2

    h, w = image.shape[:2]
    sc = min(1.0, 1024 / max(h, w))
    out = cv2.resize(image, (int(w * sc), int(h * sc)), interpolation=cv2.INTER_AREA) if sc < 1 else image.copy()
    for b, score, rej in zip(boxes.tolist(), scores.tolist(), rejected.tolist()):
        x1, y1, x2, y2 = (int(v * sc) for v in b)
        c = (255, 0, 0) if rej else (0, 255, 0)
        cv2.rectangle(out, (x1, y1), (x2, y2), c, 2)
        cv2.putText(out, f"{score:.2f}", (x1, y1 - 3 if y1 > 12 else y2 - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, c, 1,
                    cv2.LINE_AA)
    return out


def reject_row(name: str, video: Path, frame, box, score: float, reasons: list[bool], o) -> dict:
    """One row of log_rejects.csv: where the face was, and which threshold it failed."""
    ox, oy = frame.offset
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"file_name": name, "video": str(video), "frame": frame.index, "score": round(score, 4),
            "width": round(x2 - x1, 1), "height": round(y2 - y1, 1),
            "x1": round(x1 + ox, 1), "y1": round(y1 + oy, 1), "x2": round(x2 + ox, 1), "y2": round(y2 + oy, 1),
            f"too_low(min_score={o.det_min_score})": int(reasons[0]),
            f"too_small(min_size={o.det_min_size})": int(reasons[1]),
            f"too_close(min_border={o.det_min_border})": int(reasons[2])}


def write_index(out: Path, groups: dict[str, list[str]], title: str) -> None:
    """OUT/index.html: each group as a grid of thumbnails with its count."""
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>body{font:14px sans-serif;margin:16px}h2{margin:18px 0 6px}"
             ".g{display:flex;flex-wrap:wrap;gap:4px}.g img{height:96px;width:auto;border-radius:3px}"
             "figure{margin:0}figcaption{font-size:10px;color:#666;max-width:96px;overflow:hidden}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for g, files in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        parts.append(f"<h2 id='{html.escape(g)}'>{html.escape(g)} <small>({len(files)} faces)</small></h2>"
                     "<div class=g>")
        for f in files:
            src = html.escape(f"groups/{g}/{f}")
            parts.append(f"<figure><a href='{src}'><img loading=lazy src='{src}' title='{html.escape(f)}'></a>"
                         f"<figcaption>{html.escape(f)}</figcaption></figure>")
        parts.append("</div>")
    atomic_write_bytes(out / "index.html", "\n".join(parts).encode())


def warm_imports(group_mode: str) -> None:
    """Import the grouping stage's libraries (~0.3-0.8 s) on a thread while frames decode."""
    def run():
        import scipy.sparse.csgraph  # noqa: F401  (dedup)
        if group_mode == "auto":
            import scipy.cluster.hierarchy  # noqa: F401
        elif group_mode == "cluster":
            import sklearn.cluster  # noqa: F401
            import sklearn.metrics  # noqa: F401

    threading.Thread(target=run, daemon=True).start()
