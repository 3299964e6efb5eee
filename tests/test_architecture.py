"""The architecture holds: no import cycle among llavactl's own modules (counting every import
statement), and docs/architecture.md's table of where each rule lives names what is there.

The graph is read from the source with ``ast``: imports at module level, inside functions and under
``TYPE_CHECKING`` alike, absolute and relative. An import inside a function is for heavy packages
(torch, transformers, ...), never a way to hide a cycle between llavactl's modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import llavactl

PACKAGE = Path(llavactl.__file__).parent

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The llavactl modules that ``path`` imports, wherever the statement is."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from llavactl import x` imports the module x; `from llavactl.x import y` imports x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import llavactl.data.store` names a module; an attribute's import names its module.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "llavactl":
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions_and_relative_ones() -> None:
    graph = import_graph()
    assert "llavactl.data.records" in graph["llavactl.data.source"]
    assert "llavactl.data.synth" in graph["llavactl.data.source"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]


def test_no_import_cycle_in_llavactl() -> None:
    found = cycles(import_graph())
    assert not found, f"import cycles among llavactl's modules: {found}"


DOC = PACKAGE.parent / "docs" / "architecture.md"
_CODE = re.compile(r"`([^`]+)`")
_NAME = re.compile(r"^[A-Za-z_][\w.]*(\(\))?$")


def table_rows() -> list[tuple[str, list[str]]]:
    """The "one place" column of docs/architecture.md's table: (the row, its backticked words)."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("## One rule, one place", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| what ")]
    return [(row, _CODE.findall(row.rstrip(" |").rsplit(" | ", 1)[1])) for row in rows]


def test_each_place_the_architecture_table_names_holds_what_it_says() -> None:
    rows = table_rows()
    assert len(rows) > 30
    for row, words in rows:
        named = [w for w in words if w.endswith(".py")]
        files = [PACKAGE.parent / w if w.startswith(("tests/", "benchmarks/")) else PACKAGE / w for w in named]
        assert named, f"a row of docs/architecture.md names no file:\n{row}"
        for word, path in zip(named, files, strict=True):
            assert path.is_file(), f"{word} named in docs/architecture.md is not a file:\n{row}"
        for word in words:
            if word.endswith(".py") or not _NAME.match(word):
                continue
            name = word.removesuffix("()").rpartition(".")[2]
            texts = [path.read_text(encoding="utf-8") for path in files]
            assert any(re.search(rf"\b{re.escape(name)}\b", text) for text in texts), (
                f"`{word}` is in none of {named} as docs/architecture.md says:\n{row}"
            )
