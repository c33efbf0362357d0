"""The `tidyface` command (python-fire): thin wrappers that map flags to task functions.

Imports are inside the commands so that `tidyface --help` stays fast.
"""
from __future__ import annotations

import sys


def _fail(msg: str) -> None:
    print(f"tidyface: error: {msg}", file=sys.stderr)
    sys.exit(2)


class Commands:
    """tidyface: faces in photos and videos (run `tidyface COMMAND --help`)."""

    def detect(self, *paths: str, model: str = "retinaface_mnet025", min_score: float | None = None,
               device: str | None = None, batch_size: int = 8, out: str | None = None,
               weights_dir: str | None = None):
        """Detect faces; prints one JSON object per image on stdout.

        Args:
            paths: images, folders of images (searched recursively) or .txt lists of paths.
            model: detector name (`tidyface models` lists them): retinaface_mnet025 or mtcnn.
            min_score: drop faces scoring below this (default: the model's own threshold).
            device: cpu, cuda, cuda:1 ... (default: cuda when present).
            batch_size: images per forward pass (same-size images are batched together).
            out: also write each image with boxes, scores and landmarks drawn into this folder.
            weights_dir: a folder holding upstream weight files (like TIDYFACE_MIRROR).
        """
        from .tasks.detect import run_detect

        if not paths:
            _fail("give at least one image, folder or .txt list")
        sys.exit(run_detect(paths, model=model, min_score=min_score, device=device,
                            batch_size=batch_size, out=out, weights_dir=weights_dir))

    def models(self, task: str | None = None, weights_dir: str | None = None):
        """Print the weights catalogue: name, task, licence, upstream files, sha256, size, local?

        Args:
            task: only models of this task (detect, embed, ...).
            weights_dir: also look for upstream files in this folder (like TIDYFACE_MIRROR).
        """
        from .registry import list_models
        from .weights import is_available

        rows = [("name", "task", "licence", "upstream file", "sha256", "size", "local", "from")]
        for e in list_models(task):
            s = e.spec
            local = "yes" if is_available(s, weights_dir) else "no"
            for i, f in enumerate(s.files):
                first = i == 0
                rows.append((s.name if first else "", s.task if first else "", s.license if first else "",
                             f.filename, (f.sha256[:16] + "...") if f.sha256 else "unknown",
                             f"{f.size:,}" if f.size else "unknown", local if first else "",
                             e.source if first else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def main() -> None:
    import fire

    from .weights import WeightsError

    try:
        fire.Fire(Commands(), name="tidyface")
    except WeightsError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("tidyface: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
