"""Write requirements/cpu.lock: the exact versions pip resolves for the CPU set-up.

    python requirements/make_lock.py [pip report.json]   # `make lock` runs pip's resolver first

pip resolves ``.[cpu,notebooks,dev]`` without installing anything (``pip install --dry-run
--ignore-installed --report``); this script turns that report into ``name==version`` lines, sorted,
under a header saying when and with which Python it was made. ``make setup`` installs the lock, then
routelib itself with ``--no-deps``, so every machine gets the same versions.
"""

import datetime
import json
import platform
import sys
from pathlib import Path

LOCK = Path(__file__).with_name("cpu.lock")


def main(report_path: str) -> int:
    report = json.loads(Path(report_path).read_text())
    pins = sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in report["install"]
                  if i["metadata"]["name"].lower() != "routelib")
    if not any(name.lower() == "torch" for name, _ in pins):
        print(f"error: {report_path} resolves no torch; is it a report of .[cpu,notebooks,dev]?", file=sys.stderr)
        return 2
    head = [f"# Exact versions of the CPU set-up (routelib extras cpu,notebooks,dev), resolved by pip on "
            f"{datetime.date.today()} with Python {platform.python_version()}.",
            "# Made by `make lock`; `make setup` installs these, then routelib with --no-deps."]
    LOCK.write_text("\n".join(head + [f"{name}=={version}" for name, version in sorted(pins, key=lambda p: p[0].lower())]) + "\n")
    print(f"{LOCK}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "requirements/report.json"))
