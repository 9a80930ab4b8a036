"""``python -m routelib.studies.pathways reference ...``: notebook 01's reference run
(:func:`routelib.studies.pathways.reference.main`)."""

from routelib import cli
from routelib.studies.pathways.reference import main

if __name__ == "__main__":
    raise SystemExit(cli.run(main))
