"""pip constraints files from pyproject.toml: its lower bounds, and the lock.

    python scripts/constraints.py lower [--extras track] > lower.txt
    python scripts/constraints.py lock REPORT.json > constraints.txt

``lower`` prints ``name==X`` for every dependency ``name>=X`` (and for the named extras), so
``pip install --constraint lower.txt`` installs the oldest versions graft says it works with
(scripts/check_install.sh runs them). Every dependency must have a lower bound; an exact pin
(``==``) in pyproject.toml is refused: exact versions belong in constraints.txt.

torch and torchvision are the exception: ``==X.*``, the lowest minor release at whichever of
its patch releases pip finds first, since each torch release is a multi-GB download unless
the machine keeps it on disk (this project's machines keep 2.14.1, not 2.14.0).

``lock`` turns the report of ``pip install --dry-run --ignore-installed --report`` (what
``make lock`` runs) into constraints.txt: every package the resolution installs, pinned.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
#: pinned to their lowest minor release rather than its first patch release (see above)
MINOR_ONLY = {"torch", "torchvision"}
LOCK_HEADER = """\
# The exact versions `make` and CI install (pip install --constraint constraints.txt).
# pyproject.toml states the ranges graft supports; `make check-install` installs their
# lower bounds instead. Written by `make lock` (scripts/constraints.py): it resolves
# .[dev,demo,track] again, keeping every pin below; to move a package, change or delete
# its line, then run `make lock`.
"""


def requirements(pyproject: Path, extras: list[str]) -> list[Requirement]:
    """The dependencies of ``pyproject`` plus those of the named optional groups."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = project.get("optional-dependencies", {})
    missing = [e for e in extras if e not in groups]
    if missing:
        raise SystemExit(
            f"No extra {', '.join(missing)} in {pyproject}: it has {', '.join(groups)}."
        )
    texts = list(project["dependencies"]) + [r for e in extras for r in groups[e]]
    return [Requirement(t) for t in texts]


def lower_bound(req: Requirement) -> str:
    """``name==X`` for ``name>=X`` (``name==X.*`` for torch and torchvision)."""
    exact = [s for s in req.specifier if s.operator in ("==", "===")]
    lows = [s.version for s in req.specifier if s.operator == ">="]
    if exact:
        raise SystemExit(
            f"pyproject.toml pins {req}: state a range (name>=X) and put the exact version "
            "in constraints.txt."
        )
    if len(lows) != 1:
        raise SystemExit(
            f"{req} in pyproject.toml has no single lower bound (name>=X): add one, the "
            "oldest version make check-install proves graft works with."
        )
    suffix = ".*" if req.name.lower() in MINOR_ONLY else ""
    return f"{req.name}=={lows[0]}{suffix}"


#: pins held below the newest release on purpose, and why (written above the pin, so the
#: reason survives ``make lock``)
HELD = {
    "ml_dtypes": "0.7.0 takes 0.68 s to import against 0.01 s for 0.6.0 (measured here: "
    "python -X importtime -c 'import ml_dtypes'); onnx imports it on every export",
}


def lock(report: Path) -> str:
    """constraints.txt from a ``pip install --dry-run --report`` file."""
    installs = json.loads(report.read_text())["install"]
    pins = sorted(
        ((item["metadata"]["name"], item["metadata"]["version"]) for item in installs),
        key=lambda pin: pin[0].lower(),
    )
    lines = []
    for name, version in pins:
        if name.lower() == "graft":
            continue
        if name in HELD:
            lines.append(f"# {name} held: {HELD[name]}\n")
        lines.append(f"{name}=={version}\n")
    return LOCK_HEADER + "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    low = sub.add_parser("lower", help="the lower bounds of pyproject.toml, pinned")
    low.add_argument("--extras", default="", help="comma-separated optional groups to add")
    low.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    made = sub.add_parser("lock", help="constraints.txt from a pip --report file")
    made.add_argument("report", type=Path)
    args = parser.parse_args(argv)
    if args.command == "lock":
        sys.stdout.write(lock(args.report))
        return 0
    extras = [e for e in args.extras.split(",") if e]
    seen: set[str] = set()
    for req in requirements(args.pyproject, extras):
        if req.name.lower() not in seen:  # openvino is both a dependency and an extra
            seen.add(req.name.lower())
            print(lower_bound(req))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
