"""What pip is told: pyproject.toml states ranges (a lower bound each, no exact pins), the
lock (constraints.txt) pins every one of them inside its range, and every package graft
imports is declared. scripts/check_install.sh (`make check-install`, run by CI) installs
the lower bounds into a fresh environment and runs graft from there."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = sorted(PROJECT["optional-dependencies"])
#: imported only where its package is already there: IPython by graft.notebook, inside a
#: notebook's kernel
PRESENT_WHEN_USED = {"IPython"}


def load_script() -> object:
    spec = importlib.util.spec_from_file_location("constraints", ROOT / "scripts/constraints.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared() -> list[Requirement]:
    texts = PROJECT["dependencies"] + [
        r for e in EXTRAS for r in PROJECT["optional-dependencies"][e]
    ]
    return [Requirement(t) for t in texts]


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def test_python_3_11_and_3_12_are_supported() -> None:
    supported = SpecifierSet(PROJECT["requires-python"])
    assert "3.11.7" in supported and "3.12.1" in supported


def test_every_dependency_has_a_lower_bound_and_no_exact_pin() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/constraints.py"),
            "lower",
            "--extras",
            ",".join(EXTRAS),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    names = {canonicalize_name(r.name) for r in declared()}
    assert {canonicalize_name(line.split("==")[0]) for line in out} == names
    assert "torch==2.14.*" in out  # the lowest minor release, at a patch release on disk


@pytest.mark.parametrize(
    ("text", "message"),
    [("numpy==2.4.6", "pins"), ("numpy<3", "no single lower bound"), ("numpy", "lower bound")],
)
def test_a_missing_lower_bound_or_an_exact_pin_is_refused(text: str, message: str) -> None:
    script = load_script()
    with pytest.raises(SystemExit, match=message):
        script.lower_bound(Requirement(text))  # type: ignore[attr-defined]


def test_the_lock_writes_why_a_pin_is_held_above_it(tmp_path: Path) -> None:
    script = load_script()
    report = tmp_path / "report.json"
    installs = [("numpy", "2.4.6"), ("ml_dtypes", "0.6.0"), ("graft", "0.1.0")]
    report.write_text(
        json.dumps({"install": [{"metadata": {"name": n, "version": v}} for n, v in installs]})
    )
    lines = script.lock(report).splitlines()  # type: ignore[attr-defined]
    at = lines.index("ml_dtypes==0.6.0")
    assert lines[at - 1].startswith("# ml_dtypes held: ") and "import" in lines[at - 1]
    assert "numpy==2.4.6" in lines and not any(line.startswith("graft==") for line in lines)
    held = (ROOT / "constraints.txt").read_text().splitlines()
    assert held[held.index("ml_dtypes==0.6.0") - 1] == lines[at - 1]


def test_the_lock_pins_every_dependency_inside_its_range() -> None:
    pins = locked()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"
        )


def imported_packages() -> dict[str, set[str]]:
    """Top-level third-party modules graft's code imports -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "graft").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                # graft_runtime: graft/runtime.py itself, as an export folder names it
                if top not in sys.stdlib_module_names and top not in ("graft", "graft_runtime"):
                    found.setdefault(top, set()).add(path.name)
    return found


def test_every_package_graft_imports_is_declared() -> None:
    names = {canonicalize_name(r.name) for r in declared()}
    owners = packages_distributions()
    missing = {}
    for module, files in imported_packages().items():
        if module in PRESENT_WHEN_USED or module == "__future__":
            continue
        dists = {canonicalize_name(d) for d in owners.get(module, [module])}
        if not dists & names:
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
