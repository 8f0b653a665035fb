"""The import graph (docs/design.md §4): no cycles, at module or package level, and the data
path (dns, policy) uses only config, metrics, logs and the dependency-free dnsname. Read from
the source with ast: imports under `if TYPE_CHECKING:` are for the type checker and do not
count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tiktokguard"


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("tiktokguard"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tiktokguard"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = _imports(ast.parse(path.read_text()))
    return graph


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        for other in imported:
            if package_of(module) != package_of(other):
                packages.setdefault(package_of(module), set()).add(package_of(other))
    return packages


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    stack: list[str] = []
    on_stack: set[str] = set()
    seen: set[str] = set()

    def dfs(node: str) -> None:
        seen.add(node)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in seen:
                dfs(nxt)
        stack.pop()
        on_stack.discard(node)

    for node in sorted(graph):
        if node not in seen:
            dfs(node)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_round_about() -> None:
    assert cycles(module_graph()) == []


def test_no_package_cycles() -> None:
    assert cycles(package_graph(module_graph())) == []


def test_the_data_path_uses_only_config_metrics_logs_and_dnsname() -> None:
    allowed = {"tiktokguard.dns": {"tiktokguard.config", "tiktokguard.metrics",
                                   "tiktokguard.logs", "tiktokguard.policy",
                                   "tiktokguard.dnsname"},
               "tiktokguard.policy": {"tiktokguard.dnsname"}}
    packages = package_graph(module_graph())
    for package, uses in allowed.items():
        assert packages.get(package, set()) <= uses, (package, packages[package] - uses)
