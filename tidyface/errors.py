"""One error model. A `TidyfaceError` is the user's to fix (a bad flag or value, an unreadable
input, an output folder in use, a missing weights file): the command prints its one-line
message, which names the flag or file and the fix, and exits 2. Any other exception is a bug in
tidyface and keeps its traceback."""
from __future__ import annotations


class TidyfaceError(Exception):
    """A problem the user can fix; the message is one line naming the flag or file and the fix."""


class UsageError(TidyfaceError, ValueError):
    """A flag or argument value that cannot be used."""


class InputError(TidyfaceError, ValueError):
    """An input file or folder that cannot be read or used."""


class OutputError(TidyfaceError):
    """An output folder that cannot be written: it holds other results, or is in use."""
