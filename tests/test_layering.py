"""The package's layers: lower packages never import the tools, plots or command line."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scgeneformer"
LOWER = ("data", "model", "pp", "train")
UPPER = ("tl", "pl", "cli", "analysis_cli", "pretrain_cli", "_demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules of the package that ``path`` imports (at module level only, if asked)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If):  # TYPE_CHECKING blocks never run
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scgeneformer"):
            found.add(node.module)
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_lower_packages_never_import_tools_plots_or_the_command_line():
    modules = all_modules()
    offending = []
    for name, path in modules.items():
        layer = name.split(".")[1] if name.count(".") else ""
        if layer not in LOWER:
            continue
        for target in imports(path, top_level_only=False):
            parts = target.split(".")
            if len(parts) > 1 and parts[1] in UPPER:
                offending.append(f"{name} -> {target}")
    assert not offending


def test_no_import_cycle_at_module_level():
    modules = all_modules()
    graph = {
        name: {t for t in imports(path, top_level_only=True) if t in modules and t != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules is how the namespaces are built.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_every_public_namespace_loads_from_the_top_level_package():
    # In a fresh interpreter, so that no earlier import has set the attribute already.
    code = (
        "import scgeneformer as sgf; "
        "print(sgf.data.TokenStore.__name__, sgf.datasets.synthetic_states.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TokenStore", "synthetic_states"]
