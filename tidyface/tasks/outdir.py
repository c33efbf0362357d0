"""Output folders a command owns: never its own inputs, locked while in use, and a record of
exactly what it wrote, so that --overwrite removes that and nothing else.

OUT/.tidyface/owner.json  {"command": ..., "entries": [...]}: the files and folders (relative
                          to OUT) the command made; written before the first result and kept
                          up to date, so an interrupted run can still be overwritten.
OUT/.tidyface/lock        the pid of the run using the folder; a lock whose process is gone
                          is stale and taken over.
Inputs are read without descending into folders that hold an owner.json (ops.image.expand_paths),
so a run never takes an earlier result for input.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import OutputError
from ..ops.image import atomic_write_bytes

STATE = ".tidyface"
OWNER = "owner.json"
LOCK = "lock"


def _overlap(out: Path, inputs: Iterable[Path]) -> Path | None:
    """An input that is the output, holds it, or lies inside it."""
    o = out.resolve()
    for p in inputs:
        r = Path(p).resolve()
        if r == o or r in o.parents or o in r.parents:
            return Path(p)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class OutputFolder:
    """The output folder of one run of `command` (a context manager: checked and locked on
    entry, unlocked on exit)."""

    def __init__(self, path: str | os.PathLike, command: str, inputs: Sequence[str | os.PathLike] = (),
                 flag: str = "--out"):
        self.path, self.command, self.inputs, self.flag = Path(path), command, list(inputs), flag
        self.state = self.path / STATE
        self._locked = False

    def check(self) -> None:
        """Before any work: a folder (not a file), writable, apart from every input."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.flag} {self.path} is a file; name a folder")
        clash = _overlap(self.path, self.inputs)
        if clash is not None:
            raise OutputError(f"{self.flag} {self.path} overlaps the input {clash}: results would mix with "
                              f"(or replace) the inputs; choose an output folder outside them")
        here = self.path
        while not here.exists() and here.parent != here:  # nothing is made before the run starts
            here = here.parent
        if not here.is_dir():
            raise OutputError(f"{self.flag} {self.path}: {here} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=here):
                pass
        except OSError as e:
            raise OutputError(f"{self.flag} {self.path} cannot be written ({e.strerror or e}); "
                              f"choose a writable folder") from None

    def __enter__(self) -> "OutputFolder":
        self.check()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def lock(self) -> None:
        """Take the folder, or refuse in one line if a live run has it."""
        if self._locked:
            return
        self.state.mkdir(parents=True, exist_ok=True)
        path = self.state / LOCK
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise OutputError(f"{self.path} is in use by another tidyface run (pid {pid}); wait for "
                                      f"it to finish or choose another output folder") from None
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._locked = True
            return
        raise OutputError(f"{self.path}: cannot take the lock {path}; remove it if no tidyface run is using it")

    def unlock(self) -> None:
        if self._locked:
            (self.state / LOCK).unlink(missing_ok=True)
            self._locked = False

    # -- ownership
    def owner(self) -> dict | None:
        path = self.state / OWNER
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise OutputError(f"{path}: unreadable record of an earlier run; remove it by hand if that "
                              f"run's results can go") from None

    def foreign(self) -> list[Path]:
        """What the folder holds that no tidyface run wrote there."""
        owned = set((self.owner() or {}).get("entries", []))
        if not self.path.is_dir():
            return []
        return [p for p in sorted(self.path.iterdir()) if p.name != STATE and p.name not in owned]

    def claim(self, overwrite: bool, *, resume: bool = False, others_files: bool = True) -> bool:
        """Make the folder this run's. A result of another command is refused; this command's own
        earlier result is resumed (resume), replaced (overwrite: exactly its recorded entries
        are removed) or refused; files nobody recorded stay, or refuse the run (others_files
        False). -> whether an earlier result of this command is there to resume."""
        self.lock()
        owner = self.owner()
        if owner is not None and owner.get("command") != self.command:
            raise OutputError(f"{self.path} holds a tidyface {owner.get('command')} result; {self.command} "
                              f"does not write into it (nor --overwrite it): choose another folder")
        foreign = [] if others_files else self.foreign()
        if foreign:
            raise OutputError(f"{self.path} holds files that no tidyface {self.command} run wrote "
                              f"({foreign[0].name}, ...); choose an empty or new folder")
        if owner is not None and overwrite:
            self.remove(owner.get("entries", []))
            owner = None
        if owner is not None and not resume:
            raise OutputError(f"{self.path} already holds a tidyface {self.command} result; pass --overwrite "
                              f"to replace it (exactly its files), or choose another folder")
        if owner is None:
            self.record([])
        return owner is not None

    def remove(self, entries: Iterable[str]) -> None:
        root = self.path.resolve()
        for name in entries:
            p = (self.path / name)
            if root not in p.resolve().parents:  # a record never reaches outside the folder
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self._write([])

    def record(self, entries: Iterable[str]) -> None:
        """Add entries (relative paths) to what this command wrote here."""
        old = (self.owner() or {}).get("entries", [])
        self._write(sorted(set(old) | {str(e) for e in entries}))

    def _write(self, entries: list[str]) -> None:
        data = {"command": self.command, "entries": entries}
        atomic_write_bytes(self.state / OWNER, json.dumps(data, indent=1).encode())
