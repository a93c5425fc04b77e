"""The package's shape: imports flow one way, commands sit on top, the top level holds packages.

An AST walk over every module of ``lmm/`` and ``data_prep/`` collects each import, at module
level and inside functions alike, as an edge between modules (``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg``). A cycle anywhere is a failure that
names its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lmm", "data_prep")
# Top-level modules of lmm/ besides packages: the entry point and the few shared leaves.
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "constants.py", "errors.py", "registry.py"}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files else base)
            for target in targets:
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_reports_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_lmm_and_data_prep():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_command_modules():
    graph = import_graph()
    offenders = sorted(
        f"{src} -> {dst}"
        for src, dsts in graph.items()
        if not src.startswith("lmm.commands") and src != "lmm.__main__"
        for dst in dsts
        if dst.startswith("lmm.commands")
    )
    assert offenders == []


def test_no_library_module_defines_main():
    """``main()`` (argparse + exit status) lives in ``lmm/commands`` and ``data_prep`` only; the
    lmms-eval adapter's module is loaded by lmms-eval, never imported by lmm's own code."""
    graph = import_graph()
    imported = {dst for dsts in graph.values() for dst in dsts}
    offenders = []
    for name, path in module_files().items():
        if name.startswith(("lmm.commands", "data_prep")) or name == "lmm.__main__":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if (
            any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
            and name in imported
        ):
            offenders.append(name)
    assert offenders == []


def test_lmm_top_level_holds_packages_and_a_few_shared_modules():
    loose = {p.name for p in (REPO / "lmm").glob("*.py")}
    assert loose <= TOP_LEVEL_MODULES, sorted(loose - TOP_LEVEL_MODULES)
