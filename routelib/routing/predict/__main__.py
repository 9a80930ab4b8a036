"""``python -m routelib.routing.predict <trace_dir> [options]``: evaluate the predictors on a trace folder
(:func:`routelib.routing.predict.evaluation.main`)."""

from routelib import cli
from routelib.routing.predict.evaluation import main

raise SystemExit(cli.run(main))
