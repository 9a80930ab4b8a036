"""The GPU plan (issue 20): ordered, resumable steps that turn a short lent GPU slot (DESIGN.md §8:
~15 minutes in all, ≤ 10 minutes a command) into committed result files.

- :mod:`routelib.gpu.plan`   the runner: budget, skip finished steps, atomic per-step results + manifest;
- :mod:`routelib.gpu.steps`  the steps, highest value first, with their H100/H200 estimates and smoke sizes;
- :mod:`routelib.gpu.render` README's "GPU results" section from the result files.

``python -m routelib.gpu --help`` (or ``make gpu``). This package sits on top: it imports the
studies; nothing in routelib imports it.
"""
