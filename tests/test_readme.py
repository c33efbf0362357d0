"""The README is the user's door: its test command is what CI runs, and its flag tables are the
commands' flags, with the same defaults as `tidyface CMD --help`."""
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tidyface.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command_verbatim():
    ci = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1
    assert ci[0] in README


def readme_flags(command: str) -> dict[str, str]:
    """flag -> default cell of the tables in the README section of `tidyface COMMAND`."""
    section = re.search(rf"^### `tidyface {command}\b.*?(?=^### |^## )", README, re.S | re.M)
    assert section, f"README has no section for tidyface {command}"
    flags = {}
    for line in section.group(0).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        for name in re.findall(r"`(--[a-z-]+)`", cells[0]):
            flags[name] = cells[1]
    return flags


def same_default(cell: str, default) -> bool:
    """A README default cell against the real default: a number or `code` is that value, off/on a
    boolean, and words (none, required, the model's, ...) stand for "not set" (None or "")."""
    text = cell.strip()
    if isinstance(default, bool):
        return text.startswith("on") if default else text.startswith("off")
    code = re.fullmatch(r"`([^`]*)`", text)
    if code:
        return str(default) == code.group(1)
    try:
        return float(text) == float(default)
    except (TypeError, ValueError):
        return default in (None, "") and not re.fullmatch(r"-?[0-9.]+", text)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_readme_flag_tables_match_help(command):
    params = {p.name: p for p in inspect.signature(COMMANDS[command]).parameters.values()}
    flags = {f"--{n.replace('_', '-')}": p for n, p in params.items()
             if p.kind is p.KEYWORD_ONLY and n not in ("i", "help")}
    documented = readme_flags(command)
    shared = {k for k, v in documented.items() if not v}  # "as above" rows
    assert set(flags) <= set(documented), f"flags missing from README: {sorted(set(flags) - set(documented))}"
    known = set(flags) | {f"--{n}" for n in params}  # a positional argument may be named as a flag too
    assert set(documented) <= known, f"README documents unknown flags: {sorted(set(documented) - known)}"
    wrong = {k: (documented[k], flags[k].default) for k in set(flags) - shared
             if not same_default(documented[k], flags[k].default)}
    assert not wrong, f"README defaults differ from --help: {wrong}"
    r = subprocess.run([sys.executable, "-m", "tidyface.cli", command, "--help"], capture_output=True, text=True,
                       env={**os.environ, "PAGER": "cat"})
    help_text = r.stdout + r.stderr
    for name, p in flags.items():
        assert f"--{p.name}=" in help_text and f"Default: {p.default!r}" in help_text, name
