"""One way for every command-line entry point to fail: an expected failure (a bad option, an offline
Hub, a missing model folder, an unknown dataset, a corrupt trace, a missing asset package) becomes
one line on stderr and exit status 2, never a traceback; Ctrl-C exits with 130. Unexpected errors
(bugs) keep their traceback.

    if __name__ == "__main__":
        sys.exit(cli.run(main))
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, Sequence

from routelib.errors import ConfigError, RoutelibError

#: Failures a user can fix from the message alone.
EXPECTED = (RoutelibError, FileNotFoundError, NotADirectoryError, PermissionError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with ' | ')."""
    text = str(err).strip() or type(err).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``'s exit status; expected failures print ``error: <message>`` and return 2."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except EXPECTED as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown option, missing value, bad choice) raise :class:`ConfigError`, so
    :func:`run` prints them as one ``error:`` line like every other expected failure."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                          defaults: dict[str, Any] | None = None) -> None:
    """One ``--<field>`` option per field of dataclass ``cls`` but those in ``skip``, unset (None) unless
    given; read them back with :func:`dataclass_options`. Lists are comma-separated (``--seeds 0,1,2``).
    The help shows each field's default, or the one in ``defaults`` that the caller applies instead."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        parser.add_argument(f"--{f.name}", default=None, metavar="VALUE", help=f"{cls.__name__}.{f.name} (default: {default})")


def _parse(name: str, text: str, annotation: Any) -> Any:
    """``text`` from the command line as a value of type ``annotation`` (int, float, bool, str or a list of them)."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return [_parse(name, part.strip(), item) for part in text.split(",") if part.strip()]
    if annotation is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"--{name} {text!r}: expected true or false")
        return text.lower() in ("1", "true", "yes")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ConfigError(f"--{name} {text!r}: expected {'an integer' if annotation is int else 'a number'}") from None
    return text


def dataclass_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (see :func:`add_dataclass_options`), parsed to
    their annotated types; build the config with ``routelib.config.from_params``."""
    hints = typing.get_type_hints(cls)
    return {f.name: _parse(f.name, getattr(args, f.name), hints[f.name])
            for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
