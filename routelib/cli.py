"""One way for every command-line entry point to fail: an expected failure (a bad option, an offline
Hub, a missing model folder, an unknown dataset, a corrupt trace, a missing asset package) becomes
one line on stderr and exit status 2, never a traceback; Ctrl-C exits with 130. Unexpected errors
(bugs) keep their traceback.

    if __name__ == "__main__":
        sys.exit(cli.run(main))
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from routelib.errors import RoutelibError

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
