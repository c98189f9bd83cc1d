"""The package's shape: no import cycles (imports inside functions included), the library
never reaching for the CLI or the server, a light ``import graft``, and one frozen-feature
path, so ``graft scan`` and ``graft train`` audit the same pixels."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "graft"
#: the layers a user runs, which may import anything; nothing else may import them
APPLICATION = {
    "graft.cli",
    "graft.cliparse",
    "graft.serve",
    "graft.serve_requests",
    "graft.__main__",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """graft modules that ``path`` imports anywhere (functions included), except under
    ``if TYPE_CHECKING:`` (never run)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
        for n in ast.walk(node)
    }  # fmt: skip
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import x`
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_found() -> None:
    graph = _graph()
    assert "graft.features" in graph["graft.train"]
    assert "graft.split" in graph["graft.choose"]  # an import inside a function counts


def test_no_import_cycle_between_graft_modules() -> None:
    assert _cycles(_graph()) == []


def test_the_library_never_imports_the_cli_or_the_server() -> None:
    offenders = {
        module: sorted(deps & APPLICATION)
        for module, deps in _graph().items()
        if module not in APPLICATION and deps & APPLICATION
    }
    assert offenders == {}


def _fresh(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout


def test_import_graft_is_light_and_has_no_side_effects() -> None:
    out = _fresh(
        "import sys, graft, graft._malloc as m\n"
        "print('torch' in sys.modules, m._applied, graft.__version__)\n"
        "graft.TrainConfig\n"  # a public name still resolves (lazily)
        "print('torch' in sys.modules)\n"
    )
    assert out.split() == ["False", "False", "0.1.0", "False"]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["predict", "--help"]])
def test_help_runs_without_importing_torch(argv: list[str]) -> None:
    out = _fresh(
        "import sys\nfrom graft.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    assert "usage: graft" in out and out.strip().endswith("TORCH False")


def test_scan_and_train_audit_the_same_preprocessed_pixels(
    shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both go through graft.features; with trim on (the default) both see trimmed pixels."""
    import graft.features
    from graft.cli import main
    from graft.loading import ImageViews

    seen: dict[str, dict[str, torch.Tensor]] = {}
    real = graft.features.extract

    def spy(runner, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        # the clean pass (what the audit compares), not seeded views of any kind
        if dataset.seeds is None and not isinstance(dataset, ImageViews):
            for i, path in enumerate(dataset.paths):
                seen.setdefault(command, {})[str(path)] = dataset[i][0]
        return real(runner, dataset, *args, **kwargs)

    monkeypatch.setattr(graft.features, "extract", spy)
    command = "scan"
    assert main(["scan", str(shapes_dir), "--no-cache", "--plot", str(tmp_path / "c.png")]) == 0
    command = "train"
    args = ["--no-cache", "--epochs", "1", "--fine-tune-epochs", "0", "--workers", "0"]
    assert main(["train", str(shapes_dir), "--out", str(tmp_path / "run"), *args]) == 0
    assert seen["scan"].keys() == seen["train"].keys()
    for path, pixels in seen["scan"].items():
        assert torch.equal(pixels, seen["train"][path]), path
    # trim is on by default, so the audit saw trimmed pixels, not a plain resize of the file
    from graft.data import build_transform
    from graft.runtime import load_image

    plain = build_transform(128, (0.5,) * 3, (0.5,) * 3, "none", trim=False)
    assert any(
        not torch.equal(plain(load_image(path, 128)), pixels)
        for path, pixels in seen["scan"].items()
    )
