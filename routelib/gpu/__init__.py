"""The GPU plan : ordered, resumable steps that turn a short lent GPU slot (docs/design.md §8:
~15 minutes in all, ≤ 10 minutes a command) into committed result files.

- :mod:`routelib.gpu.plan`   the runner: budget, skip finished steps, atomic per-step results + manifest;
- :mod:`routelib.gpu.sizing` what the steps share: rates, the notebooks' GPU yaml, timing arithmetic;
- :mod:`routelib.gpu.steps`  the ordered list: every study's steps (``routelib.studies.<study>.gpu``, each
                             with its H100/H200 estimate and smoke sizes), highest value first;
- :mod:`routelib.gpu.render` README's "GPU results" section from the result files.

``python -m routelib.gpu --help`` (or ``make gpu``). Only :mod:`.steps` (and the command) sit on top,
importing the studies; the runner, sizing and render are libraries the studies' steps build on.
"""
