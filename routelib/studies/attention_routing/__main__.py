"""``python -m routelib.studies.attention_routing reference ...``: notebook 02's reference run
(:func:`routelib.studies.attention_routing.reference.main`)."""

from routelib import cli
from routelib.studies.attention_routing.reference import main

if __name__ == "__main__":
    raise SystemExit(cli.run(main))
