"""How the package is laid out, checked so that it holds without anyone policing it: no module imports
another in a circle, no function grows past what a reader holds at once, no module past what a reader
finishes, and the step boundary stays a pure decision table."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dist_llama"
LONGEST_FUNCTION = 60  # lines, def to last line
LONGEST_MODULE = 450  # lines
# What the step boundary (boundary.py) decides with must come in as values or functions: it does no I/O,
# handles no signal and starts nothing.
NOT_IN_THE_BOUNDARY = {"signal", "subprocess", "psutil", "threading", "os", "time", "torch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, from every import statement: those inside functions and under
    `if TYPE_CHECKING:` too, since a circle there is a circle in the design. The Hub release's code is data
    that runs inside a release folder, not a package module."""
    files = {path: module_name(path) for path in PACKAGE.rglob("*.py") if "hub_release" not in path.parts}
    modules = set(files.values())
    graph = {}
    for path, name in files.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                imported |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        graph[name] = (imported & modules) - {name}
    return graph


def test_no_module_imports_another_in_a_circle():
    graph = import_graph()
    assert graph["dist_llama.session.runner"] >= {"dist_llama.session.stages", "dist_llama.session.summary"}
    assert "dist_llama.boundary" in graph["dist_llama.run"] and "dist_llama.run" in graph["dist_llama.train"]
    done, path = set(), []

    def visit(module: str) -> None:
        path.append(module)
        for imported in sorted(graph[module]):
            assert imported not in path, " -> ".join(path[path.index(imported) :] + [imported])
            if imported not in done:
                visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)


def test_no_function_is_longer_than_a_reader_holds_at_once():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_module_is_longer_than_a_reader_finishes():
    long = [
        f"{path.relative_to(REPO)} ({lines} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > LONGEST_MODULE
    ]
    assert not long, long


def test_the_step_boundary_imports_nothing_that_acts():
    tree = ast.parse((PACKAGE / "boundary.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            imported.add((node.module or "").split(".")[0])
    assert "dist_llama" in imported, "the check must see the module's imports"
    assert not imported & NOT_IN_THE_BOUNDARY, imported & NOT_IN_THE_BOUNDARY
