"""The README is the user's door: its test command is what CI runs, and it documents every command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1
    assert ci[0] in (ROOT / "README.md").read_text()


def test_readme_documents_every_command_and_flag():
    import inspect

    from tidyface.cli import Commands

    readme = (ROOT / "README.md").read_text()
    for name, fn in inspect.getmembers(Commands, inspect.isfunction):
        if name.startswith("_"):
            continue
        assert f"tidyface {name}" in readme, name
        for p in inspect.signature(fn).parameters.values():
            if p.name == "self" or p.kind is p.VAR_POSITIONAL or p.default is p.empty:
                continue  # positional arguments are shown in the command line itself
            if p.name == "i":  # the -i alias of video2faces' input
                assert "`-i`" in readme
                continue
            assert f"--{p.name.replace('_', '-')}" in readme, f"{name} --{p.name}"
