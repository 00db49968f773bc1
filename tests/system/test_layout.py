"""The package layout holds: no import cycle, `schemas/` and the in-container runtime stand
alone, the process backend does not need Docker, and no module is a grab bag by name.

Imports are read with `ast`, at module top and inside functions alike, so a cycle hidden in
a function-local import fails here too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "schemas", "containers")
GRAB_BAG_NAMES = {"utils", "util", "manager", "managers", "helpers", "helper", "misc", "common"}
KNOWN_BAD_EDGES = {
    # The engines package imports its engines lazily and they import its protocol back:
    # the Engine protocol and EngineError want a module of their own.
    ("containers.runtime.engines", "containers.runtime.engines.echo"),
    ("containers.runtime.engines", "containers.runtime.engines.vllm"),
}
"""Edges the rewrite in flight removes; each one fails `test_known_bad_edges_still_exist`
once it is gone, so the list only shrinks."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[module_name(path)] = path
    return modules


MODULES = project_modules()


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name `name` imports, resolved against its package for relative imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                names.add(submodule if submodule in MODULES else base)
    return names


def project_imports(name: str) -> set[str]:
    """The project modules `name` imports (a name inside a module counts as the module)."""
    found = set()
    for imported in imported_names(name, MODULES[name]):
        parts = imported.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()
        if parts and ".".join(parts) != name:
            found.add(".".join(parts))
    return found


IMPORTS = {name: project_imports(name) for name in MODULES}
GRAPH = {
    name: {d for d in deps if (name, d) not in KNOWN_BAD_EDGES} for name, deps in IMPORTS.items()
}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt) == GREY:
                return [*stack[stack.index(nxt) :], nxt]
            if color.get(nxt) == WHITE and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        color[node] = BLACK
        return None

    for node in sorted(graph):
        if color[node] == WHITE and (cycle := visit(node)):
            return cycle
    return None


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_walk_sees_the_packages_and_their_imports() -> None:
    assert {"worker.node.agent", "worker.runtime.process", "schemas.frames"} <= set(MODULES)
    assert "containers.runtime.process" in MODULES
    assert "worker.core.errors" in GRAPH["worker.node.agent"]


@pytest.mark.parametrize("edge", sorted(KNOWN_BAD_EDGES), ids="->".join)
def test_known_bad_edges_still_exist(edge: tuple[str, str]) -> None:
    importer, imported = edge
    assert imported in IMPORTS[importer], f"{edge} is gone: drop it from KNOWN_BAD_EDGES"


def test_find_cycle_reports_a_cycle_through_function_level_imports(tmp_path: Path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    late = tmp_path / "late.py"
    late.write_text("def f():\n    from worker.node import agent\n    import schemas.frames\n")
    assert {"worker.node.agent", "schemas.frames"} <= imported_names("late", late)


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", ["schemas", "containers.runtime"])
def test_shared_language_imports_nothing_from_the_agent(package: str) -> None:
    offenders = {
        f"{name} -> {dep}"
        for name, deps in GRAPH.items()
        if name == package or name.startswith(package + ".")
        for dep in deps
        if dep == "worker" or dep.startswith("worker.")
    }
    assert not offenders, sorted(offenders)


def test_process_backend_does_not_need_the_docker_backend() -> None:
    assert "worker.runtime.container" not in reachable("worker.runtime.process")
    docker_imports = {
        n for n in imported_names("worker.runtime.process", MODULES["worker.runtime.process"])
    }
    assert not any(n == "docker" or n.startswith("docker.") for n in docker_imports)


KNOWN_TEST_IMPORTS: set[tuple[str, str]] = set()


def test_imports_between_tests() -> None:
    """Tests share code through tests/support/, never by importing a test module (or the
    conftest). Listed exceptions must still exist, so the list only shrinks."""
    found = set()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        name = module_name(path)
        for imported in imported_names(name, path):
            target = imported.split(".")[:2]
            if target[0] == "tests" and len(target) == 2 and target[1] != "support":
                found.add((name, ".".join(target)))
            elif imported.split(".")[0] in {"conftest"} or imported.startswith("test_"):
                found.add((name, imported))
    assert found == KNOWN_TEST_IMPORTS


def test_no_module_is_named_for_a_grab_bag() -> None:
    bad = [name for name in MODULES if name.rpartition(".")[2] in GRAB_BAG_NAMES]
    assert not bad, f"name the concept instead: {bad}"


TEST_FOLDERS = {
    # a folder of tests per package of the node, plus the tests of the whole system and of
    # the test harness itself
    *(p.name for p in (ROOT / "worker").iterdir() if (p / "__init__.py").exists()),
    "schemas",
    "containers",
    "client",
    "system",
    "harness",
}


def test_tests_live_in_folders_that_mirror_the_packages() -> None:
    """A newcomer finds the tests of `worker/jobs/` in `tests/jobs/`: no test file at the top
    of `tests/`, none in a folder that names no package, and no two test files whose names
    suggest the same module."""
    tests = ROOT / "tests"
    assert not sorted(tests.glob("test_*.py")), "put each test file in its package's folder"
    stray = {p.parent.name for p in tests.rglob("test_*.py")} - TEST_FOLDERS
    assert not stray, f"test folders that mirror no package: {sorted(stray)}"
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), "two test files share a name"
