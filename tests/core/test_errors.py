"""`worker.core.errors`: the docstring draws the real class trees (the node's, and the
tools'), `WIRE` maps every node error class once to its wire code, and retryability is a
branch of the tree that no subclass turns around."""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import worker
from schemas.event import ErrorCode
from worker.core import errors
from worker.core.errors import (
    WIRE,
    Final,
    NodeError,
    Retryable,
    ToolError,
    error_code,
    is_retryable,
)

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


def real_tree(root: type[Exception] = NodeError) -> dict[str, str | None]:
    parents: dict[str, str | None] = {root.__name__: None}
    todo: list[type[Exception]] = [root]
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


def test_docstring_draws_the_class_trees() -> None:
    import_every_worker_module()
    assert errors.__doc__ is not None
    assert drawn_tree(errors.__doc__) == real_tree() | real_tree(ToolError)


def test_every_node_and_tool_error_is_defined_in_the_errors_module() -> None:
    import_every_worker_module()
    elsewhere: set[str] = set()
    todo: list[type[Exception]] = [NodeError, ToolError]
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
def test_instances_take_their_code_from_the_table_and_retryability_from_the_branch(
    cls: type[NodeError],
) -> None:
    exc = cls("why")
    assert (exc.code, error_code(exc)) == (WIRE[cls], WIRE[cls])
    assert exc.retryable is is_retryable(exc) is issubclass(cls, Retryable)


def test_every_error_below_the_root_is_on_one_branch() -> None:
    """A subclass cannot contradict its parent's retryability: there is no flag to turn."""
    import_every_worker_module()
    offbranch = [
        name
        for name in real_tree()
        if name not in ("NodeError", "Retryable", "Final")
        and issubclass(getattr(errors, name), Retryable) == issubclass(getattr(errors, name), Final)
    ]
    assert not offbranch


def test_client_and_tool_errors_are_not_node_errors() -> None:
    for cls in (errors.JobFailed, errors.NatsUnreachable, errors.ImageBuildError):
        assert issubclass(cls, ToolError) and not issubclass(cls, NodeError)


def test_unexpected_exceptions_are_internal_and_final() -> None:
    assert error_code(ValueError("x")) == ErrorCode.INTERNAL
    assert not is_retryable(ValueError("x"))


def test_hardening_failures_are_refusals_that_no_retry_fixes() -> None:
    """They were `RuntimeStartError`s (retryable) marked final, which the supervisor had to
    patch for the jobs it handed back; now they are a final branch of their own."""
    for cls in (errors.IsolationError, errors.ImageUnavailable):
        assert issubclass(cls, errors.RuntimeRefused) and not cls("x").retryable
        assert not issubclass(cls, errors.RuntimeFailure)
    assert errors.RuntimeStartError("x").retryable
    assert errors.ModelUnavailable("x").retryable
    assert not issubclass(errors.ModelUnavailable, errors.ModelInvalid)


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
    assert not overriding, "put their wire code in WIRE, their retryability in their branch"
