"""The `tidyface` command (python-fire), generated from the option dataclasses of options.py:
each command's flags, defaults and help are those fields, declared nowhere else.

A TidyfaceError (a user's mistake: a bad flag, an unreadable input, a folder in use) prints one
line and exits 2; any other exception is a bug and keeps its traceback. Task modules are
imported when their command runs, so `tidyface --help` stays fast.
"""
from __future__ import annotations

import inspect
import os
import sys
import typing
from typing import Callable

from . import options as opt
from .errors import TidyfaceError, UsageError


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
    # listed so that fire gives no flag the short form -h, which means help everywhere
    params.append(inspect.Parameter("help", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool))
    positional["help"] = "show this help (also -h)."

    def fn(*args, **kw):
        for alias, target in aliases.items():
            value = kw.pop(alias, None)
            if value is not None and not kw.get(target):
                kw[target] = value
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
    fn._options, fn._aliases = options, aliases  # private: fire would list public attributes
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

    result = run_group(options=o)
    _exit(1 if result.failed or not result.images else 0)


def _video2faces(_, o):
    from .tasks.video2faces import run_video2faces

    try:
        summary = run_video2faces(o)
    except KeyboardInterrupt:
        print("tidyface: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    _exit(1 if summary["failed"] else 0)


def _parse(paths, o):
    from .tasks.parse import run_parse

    _exit(run_parse(paths, o))


def _anonymize(paths, o):
    from .tasks.anonymize import run_anonymize

    try:
        code = run_anonymize(paths, o)
    except KeyboardInterrupt:
        print("tidyface: interrupted; run the same command again to resume (finished files are kept)",
              file=sys.stderr)
        sys.exit(130)
    _exit(code)


def _enhance(paths, o):
    from .tasks.enhance import run_enhance

    _exit(run_enhance(paths, o))


def _models(_, o):
    from .tasks.catalogue import print_catalogue

    print_catalogue(o.task, o.weights_dir)


PATHS = "images, folders of images (searched recursively) or .txt lists of paths."
COMMANDS = {
    "detect": command(opt.DetectOptions, _detect, "Detect faces; prints one JSON object per image on stdout.",
                      "paths", PATHS),
    "landmarks": command(opt.LandmarksOptions, _detect, "Detect faces and their landmarks (e.g. dlib's 68 "
                         "points); prints one JSON object per image on stdout.", "paths", PATHS),
    "crop": command(opt.CropOptions, _crop, "Align and crop faces; writes the crops (mirroring the input "
                    "tree) and OUT/crops.json.", "paths", PATHS),
    "embed": command(opt.EmbedOptions, _embed, "Detect, align and embed every face; writes one row per "
                     "face into an .npz.", "paths", PATHS),
    "group": command(opt.GroupCommandOptions, _group, "Sort the faces in a folder of photos (or of face "
                     "crops) into one folder per person: OUT/<group>/<face>.jpg and OUT/groups.csv."),
    "video2faces": command(opt.Video2FacesOptions, _video2faces, "Turn videos into face images grouped per "
                           "person (see README for every flag).", aliases={"i": "input"}),
    "parse": command(opt.ParseOptions, _parse, "Parse every face into classes (skin, eyes, hair, ...); writes "
                     "one class map per face (mirroring the input tree) and OUT/parse.json.", "paths", PATHS),
    "anonymize": command(opt.AnonymizeOptions, _anonymize, "Obscure every face in photos and videos; writes "
                         "them (mirroring the input tree) into OUT with OUT/anonymize_log.jsonl.", "paths",
                         "photos, videos, folders of them (searched recursively) or .txt lists of paths."),
    "enhance": command(opt.EnhanceOptions, _enhance, "Enhance images with a super-resolution model (tiled), or "
                       "only their faces (--faces-only); writes them (mirroring the input tree) into OUT.",
                       "paths", PATHS),
    "models": command(opt.ModelsOptions, _models, "Print the weights catalogue: name, task, licence, "
                      "upstream files, sha256, size, local?"),
}


HELP = ("-h", "--help")
BOOL_WORDS = opt.TRUE_WORDS + opt.FALSE_WORDS


def _suggest(word: str, choices, what: str, listing: str) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"unknown {what} {word}" + (f"; did you mean {close[0]}?" if close else f" ({listing} lists them)")


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


class Argv:
    """One command's arguments, parsed by the option dataclass's fields, before any work: every
    flag is known (or named with its closest match), every value is a string that the options
    then coerce, a list flag takes `1,2,3,4`, `"1 2 3 4"`, `[1,2,3,4]` or `1 2 3 4`, a boolean
    flag alone means true, and after `--` everything is a positional argument (a file named
    `-x.jpg`). python-fire would instead evaluate values as Python literals, take `--` for its
    own flags, and complain of arguments it could not consume only after the command had run."""

    def __init__(self, command: str, fn, tokens: list[str]):
        self.command, self.tokens, self.positional, self.flags = command, list(tokens), [], {}
        hints = typing.get_type_hints(fn._options)
        self.types = {f.name: hints[f.name] for f in opt.fields(fn._options)}
        self.lists = {f.name: f.metadata["numbers"] for f in opt.fields(fn._options) if "numbers" in f.metadata}
        self.names = {f"--{n.replace('_', '-')}": n for n in self.types} | {"-" + a: t for a, t in fn._aliases.items()}
        # fire's help shows -x for a flag whose first letter no other flag has: take those too
        firsts = [n[0] for n in [*self.types, *fn._aliases, "help"]]
        self.names |= {f"-{n[0]}": n for n in self.types if firsts.count(n[0]) == 1}

    def parse(self) -> tuple[list[str], dict[str, str]]:
        while self.tokens:
            token = self.tokens.pop(0)
            if token == "--":
                self.positional += self.tokens
                break
            if token.startswith("-") and not _is_number(token):
                self._flag(token)
            else:
                self.positional.append(token)
        return self.positional, self.flags

    def _flag(self, token: str) -> None:
        key, eq, value = token.partition("=")
        key = key.replace("_", "-")
        name = self.names.get(key)
        if name is None and key.startswith("--no") and self.names.get("--" + key[4:]) in self.types \
                and self.types[self.names["--" + key[4:]]] is bool:  # fire's --noflag
            self.flags[self.names["--" + key[4:]]] = "false"
            return
        if name is None:
            hint = " (a file name? put it after --)" if "." in key or "/" in key else ""
            raise UsageError(_suggest(key, self.names, "flag", f"`tidyface {self.command} --help`") + hint)
        if self.types.get(name) is bool and not eq:
            nxt = self.tokens[0].lower() if self.tokens else ""
            self.flags[name] = self.tokens.pop(0) if nxt in BOOL_WORDS else "true"
            return
        if not eq:
            if not self.tokens:
                raise UsageError(f"{key} needs a value")
            value = self.tokens.pop(0)
        if name in self.lists:
            value = self._list(value, self.lists[name])
        self.flags[name] = value

    def _list(self, value: str, count: int) -> str:
        """A list flag's numbers as "a,b,c": `[1,2]`, `1,2`, `"1 2"`, or `1 2` (separate words)."""
        parts = value.strip("[]() ").replace(",", " ").split()
        while len(parts) < count and self.tokens and _is_number(self.tokens[0]):
            parts.append(self.tokens.pop(0))
        return ",".join(parts)


def run_command(name: str, tokens: list[str]) -> None:
    """Parse and run one command; -h/--help anywhere before `--` shows its help."""
    fn = COMMANDS[name]
    before = tokens[:tokens.index("--")] if "--" in tokens else tokens
    if any(t in HELP for t in before):
        import fire  # only help needs it: the flags are parsed by Argv

        fire.Fire(COMMANDS, command=[name, "--", "--help"], name="tidyface")
        return
    positional, flags = Argv(name, fn, tokens).parse()
    _freeze_imports()
    fn(*positional, **flags)


def _freeze_imports() -> None:
    """Import torch, then move everything alive into the collector's permanent generation.
    torch leaves about 170k long-lived objects, and every full collection walks them all
    (0.16 s on 2 cores); loading two models allocates enough to trigger such collections, which
    made up a quarter of the start-up to the first frame. Those objects live for the whole
    process anyway, so not scanning them frees nothing less."""
    import gc

    import torch  # noqa: F401 - every command needs it

    gc.freeze()


def main(argv=None) -> None:
    from . import __version__
    from .ops.memory import keep_freed_memory

    tokens = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    try:
        if not tokens or tokens[0] in HELP:
            import fire

            fire.Fire(COMMANDS, command=["--help"], name="tidyface")
        elif tokens[0] == "--version":
            print(f"tidyface {__version__}")
        elif tokens[0] not in COMMANDS:
            _fail(_suggest(tokens[0], COMMANDS, "command", "`tidyface --help`"))
        else:
            run_command(tokens[0], tokens[1:])
            sys.stdout.flush()
    except TidyfaceError as e:
        _fail(str(e))
    except BrokenPipeError:  # `tidyface detect ... | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        print("tidyface: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
