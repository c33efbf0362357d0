"""The `tidyface` command (python-fire), generated from the option dataclasses of options.py:
each command's flags, defaults and help are those fields, declared nowhere else.

A TidyfaceError (a user's mistake: a bad flag, an unreadable input, a folder in use) prints one
line and exits 2; any other exception is a bug and keeps its traceback. Task modules are
imported when their command runs, so `tidyface --help` stays fast.
"""
from __future__ import annotations

import inspect
import sys
import typing
from typing import Callable

from . import options as opt
from .errors import TidyfaceError


def _fail(msg: str, code: int = 2) -> None:
    print(f"tidyface: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _ordered(options: type) -> list:
    """The command's argument first, then its own flags, the shared ones (device, ...) last."""
    rank = {f.name: 1 for f in opt.fields(opt.GroupingFlags)} | {f.name: 2 for f in opt.fields(opt.Common)}
    return sorted(opt.fields(options), key=lambda f: (not f.metadata.get("positional"), rank.get(f.name, 0)))


def _docstring(summary: str, options: type, positional: dict[str, str]) -> str:
    lines = [summary, "", "Args:"]
    lines += [f"    {name}: {text}" for name, text in positional.items()]
    lines += [f"    {f.name}: {f.metadata['help']}" for f in _ordered(options)]
    return "\n".join(lines)


def command(options: type, run: Callable, summary: str, varargs: str | None = None,
            varargs_help: str = "", aliases: dict[str, str] | None = None):
    """A function for fire whose signature and docstring are the fields of `options`; calling it
    builds the options (coercing and checking every value) and runs `run(positional, options)`."""
    aliases = aliases or {}
    params, positional = [], {}
    if varargs:
        params.append(inspect.Parameter(varargs, inspect.Parameter.VAR_POSITIONAL))
        positional[varargs] = varargs_help
    hints = typing.get_type_hints(options)
    for f in _ordered(options):
        if f.metadata.get("positional") and not aliases:  # required: fire shows it as COMMAND ARG
            params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name]))
            continue
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if f.metadata.get("positional") else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(f.name, kind, default=f.default, annotation=hints[f.name]))
    for alias, target in aliases.items():
        params.append(inspect.Parameter(alias, inspect.Parameter.KEYWORD_ONLY, default=None))
        positional[alias] = f"same as {target}."

    def fn(*args, **kw):
        for alias, target in aliases.items():
            if kw.get(alias) is not None:
                kw.setdefault(target, None)
                kw[target] = kw[target] or kw[alias]
            kw.pop(alias, None)
        if not varargs:
            names = [f.name for f in opt.fields(options) if f.metadata.get("positional")]
            kw.update(zip(names, args))
            args = ()
        try:
            return run(tuple(str(a) for a in args), options(**kw))
        except TidyfaceError as e:
            _fail(str(e))

    fn.__signature__ = inspect.Signature(params)
    fn.__doc__ = _docstring(summary, options, positional)
    fn.__name__ = options.__name__
    return fn


def _exit(code) -> None:
    if code:
        sys.exit(code)


def _detect(paths, o):
    from .tasks.detect import run_detect

    _exit(run_detect(paths, o))


def _crop(paths, o):
    from .tasks.crop import run_crop

    _exit(run_crop(paths, options=o))


def _embed(paths, o):
    from .tasks.embed import run_embed

    _exit(run_embed(paths, o))


def _group(_, o):
    from .tasks.group import run_group

    run_group(options=o)


def _video2faces(_, o):
    from .tasks.video2faces import run_video2faces

    try:
        summary = run_video2faces(o)
    except KeyboardInterrupt:
        print("tidyface: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    _exit(1 if summary["failed"] else 0)


def _models(_, o):
    from .tasks.catalogue import print_catalogue

    print_catalogue(o.task, o.weights_dir)


PATHS = "images, folders of images (searched recursively) or .txt lists of paths."
COMMANDS = {
    "detect": command(opt.DetectOptions, _detect, "Detect faces; prints one JSON object per image on stdout.",
                      "paths", PATHS),
    "crop": command(opt.CropOptions, _crop, "Align and crop faces; writes the crops (mirroring the input "
                    "tree) and OUT/crops.json.", "paths", PATHS),
    "embed": command(opt.EmbedOptions, _embed, "Detect, align and embed every face; writes one row per "
                     "face into an .npz.", "paths", PATHS),
    "group": command(opt.GroupCommandOptions, _group, "Sort the faces in a folder of photos (or of face "
                     "crops) into one folder per person: OUT/<group>/<face>.jpg and OUT/groups.csv."),
    "video2faces": command(opt.Video2FacesOptions, _video2faces, "Turn videos into face images grouped per "
                           "person (see README for every flag).", aliases={"i": "input"}),
    "models": command(opt.ModelsOptions, _models, "Print the weights catalogue: name, task, licence, "
                      "upstream files, sha256, size, local?"),
}


def main(argv=None) -> None:
    import fire

    from .ops.memory import keep_freed_memory

    keep_freed_memory()
    try:
        fire.Fire(COMMANDS, command=argv, name="tidyface")
    except TidyfaceError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("tidyface: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
