"""The package's shape: no import cycle (imports inside functions included), no module over the
house's 300 lines, imports down the layers only, and the code's map (docs/development.md) naming
every module and only modules that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kalm_lightning"
MAP = PACKAGE.parent / "docs" / "development.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports(path, set(files)) - {name} for name, path in files.items()}
    # a package's __init__ importing its own submodules is how packages re-export: not an arrow back
    for name in graph:
        graph[name] = {
            m
            for m in graph[name]
            if not (files[name].name == "__init__.py" and m.startswith(name + "."))
        }
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_package_module_is_over_300_lines() -> None:
    """The library and the localizer study's package (experiments/bench/bench.py is a script
    that runs from its path alone, on a machine with only the package installed)."""
    study = PACKAGE.parent / "experiments" / "localizers"
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in [*PACKAGE.rglob("*.py"), *study.rglob("*.py")]
        if (n := len(p.read_text().splitlines())) > 300
    }
    assert not long


def test_the_map_of_the_code_names_every_module_and_only_those_that_exist() -> None:
    text = MAP.read_text()
    section = text[text.index("### Where each idea lives") :]
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", section))
    named = {p for p in named if not p.startswith("experiments/")}  # scripts, not the package
    assert named, "the map names no module"
    missing = sorted(p for p in named if not (PACKAGE / p).is_file())
    assert not missing
    listed = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    unmapped = sorted(listed - named - {"conf/__init__.py"})
    assert not unmapped, f"modules docs/development.md's map does not name: {unmapped}"


# The layers, from the top: the command layer and entry points (the package's own modules but
# the base ones), tasks/, stages/, then training/ beside evaluation/ (neither imports the other),
# models/ beside data/, and the base (runs, settings, errors, progress) that every layer may use.
BASE = {"runs", "settings", "errors", "progress"}
BELOW = {
    "tasks": {"stages", "training", "evaluation", "models", "data", "base"},
    "stages": {"training", "evaluation", "models", "data", "base"},
    "training": {"models", "data", "base"},
    "evaluation": {"models", "data", "base"},
    "models": {"models", "data", "base"},
    "data": {"data", "base"},
    "base": {"base"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in BELOW:
        return parts[1]
    return "base" if len(parts) == 2 and parts[1] in BASE else "command"


def test_imports_go_down_the_layers_only() -> None:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    upward = []
    for name, path in files.items():
        if layer(name) == "command":
            continue
        allowed = BELOW[layer(name)] | {layer(name)}
        upward += [
            f"{name} -> {m}"
            for m in imports(path, set(files))
            if m != "kalm_lightning" and layer(m) not in allowed
        ]
    assert not upward
