"""`tidyface models`: the weights catalogue, one row per upstream file."""
from __future__ import annotations


def catalogue_rows(task: str | None = None, weights_dir=None) -> list[tuple[str, ...]]:
    from ..registry import TASKS, list_models
    from ..errors import UsageError
    from ..weights import is_available

    if task is not None and task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    rows = [("name", "task", "licence", "upstream file", "sha256", "size", "local", "from")]
    for e in list_models(task):
        s = e.spec
        local = "yes" if is_available(s, weights_dir) else "no"
        for i, f in enumerate(s.files):
            first = i == 0
            rows.append((s.name if first else "", s.task if first else "", s.license if first else "",
                         f.filename, f.sha256 or "unknown",
                         f"{f.size:,}" if f.size else "unknown", local if first else "",
                         e.source if first else ""))
    return rows


def print_catalogue(task: str | None = None, weights_dir=None) -> None:
    rows = catalogue_rows(task, weights_dir)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
