"""`worker.core.errors`: the docstring draws the real class tree, and `WIRE` maps every
class once to its wire code and retryability."""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import worker
from schemas.event import ErrorCode
from worker.core import errors
from worker.core.errors import WIRE, NodeError, error_code, is_retryable

ROOT = Path(__file__).resolve().parents[2]


def drawn_tree(doc: str) -> dict[str, str | None]:
    """Each class name in the docstring's drawing, with the name it hangs under.

    The drawing starts at a line holding one bare name (the root); branches are drawn
    with box characters, and the name's column gives its depth.
    """
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        if root := re.fullmatch(r"([A-Z]\w+)", line.strip()):
            parents[root.group(1)] = None
            stack = [(0, root.group(1))]
            continue
        branch = re.match(r"^([│├└─ ]+)([A-Z]\w+)", line)
        if not branch or not stack:
            continue
        depth, name = len(branch.group(1)), branch.group(2)
        while stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1]
        stack.append((depth, name))
    return parents


def real_tree() -> dict[str, str | None]:
    parents: dict[str, str | None] = {NodeError.__name__: None}
    todo = [NodeError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            parents[sub.__name__] = cls.__name__
            todo.append(sub)
    return parents


def import_every_worker_module() -> None:
    for info in pkgutil.walk_packages(worker.__path__, "worker."):
        if info.name != "worker.cli.__main__":
            importlib.import_module(info.name)


def test_drawn_tree_reads_nesting() -> None:
    doc = "Intro.\n\nRoot\n├── Left    l\n│   └── Deep    d\n└── Right   r\n"
    assert drawn_tree(doc) == {"Root": None, "Left": "Root", "Deep": "Left", "Right": "Root"}


def test_docstring_draws_the_class_tree() -> None:
    import_every_worker_module()
    assert errors.__doc__ is not None
    assert drawn_tree(errors.__doc__) == real_tree()


def test_every_node_error_is_defined_in_the_errors_module() -> None:
    import_every_worker_module()
    elsewhere: set[str] = set()
    todo = [NodeError]
    while todo:
        cls = todo.pop()
        if cls.__module__ != errors.__name__:
            elsewhere.add(f"{cls.__module__}.{cls.__name__}")
        todo.extend(cls.__subclasses__())
    assert not elsewhere


def test_wire_table_lists_every_class_once() -> None:
    import_every_worker_module()
    assert set(WIRE) == {getattr(errors, name) for name in real_tree()}


@pytest.mark.parametrize("cls", list(WIRE), ids=lambda c: c.__name__)
def test_instances_take_code_and_retryability_from_the_table(cls: type[NodeError]) -> None:
    exc = cls("why")
    assert (exc.code, exc.retryable) == WIRE[cls]
    assert (error_code(exc), is_retryable(exc)) == WIRE[cls]


def test_unexpected_exceptions_are_internal_and_final() -> None:
    assert error_code(ValueError("x")) == ErrorCode.INTERNAL
    assert not is_retryable(ValueError("x"))


def test_hardening_failures_are_runtime_start_errors_that_no_retry_fixes() -> None:
    assert issubclass(errors.IsolationError, errors.RuntimeStartError)
    assert issubclass(errors.ImageUnavailable, errors.RuntimeStartError)
    assert not errors.IsolationError("x").retryable
    assert errors.RuntimeStartError("x").retryable


def test_no_code_sets_wire_code_or_retryability_on_an_instance() -> None:
    """`.code = ...` or `.retryable = ...` on an exception would override the table."""
    offenders = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr in {"code", "retryable"}:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders


def test_no_class_overrides_the_table() -> None:
    import_every_worker_module()
    todo, overriding = list(NodeError.__subclasses__()), []
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if {"code", "retryable"} & set(vars(cls)):
            overriding.append(cls.__name__)
    assert not overriding, "put their wire code and retryability in WIRE"
