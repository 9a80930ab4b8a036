"""``python -m routelib.studies.pathways reference ...``: notebook 01's reference run
(:func:`routelib.studies.pathways.reference.main`); ``python -m routelib.studies.pathways control-reference
...``: section 9's claim (d) on its model (:func:`routelib.studies.pathways.control_reference.main`)."""

import sys

from routelib import cli
from routelib.studies.pathways import control_reference, reference


def main(argv: list[str] | None = None) -> int:
    """Dispatch on the first argument: ``control-reference`` or (anything else) the reference run's command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return (control_reference.main if argv[:1] == ["control-reference"] else reference.main)(argv)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
