"""The fault points: every point the code reaches is registered, and injection only names registered points."""

import ast
from pathlib import Path

import pytest

from lora_cli import faults
from lora_cli.atomic import write_text

PACKAGE = Path(__file__).resolve().parent.parent / "lora_cli"


def _points_in_the_code() -> set[str]:
    """Names passed to faults.point (an f-string's fixed prefix + `*`)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if (owner, called) != ("faults", "point") and called != "fault_point":
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                names.add(arg.value)
            elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
                names.add(arg.values[0].value + "*")
    return names


def test_every_point_the_code_reaches_is_registered_and_every_registered_point_is_reached():
    reached = _points_in_the_code()
    assert reached == set(faults.POINTS), (reached ^ set(faults.POINTS))


def test_an_unregistered_point_cannot_be_injected():
    with pytest.raises(ValueError, match="'train:nope' is not a fault point"), faults.inject("train:nope", print):
        pass


def test_an_injected_action_sees_the_points_value_and_stops_when_the_block_ends(tmp_path):
    seen = []
    with faults.inject("file:*", seen.append):
        write_text(tmp_path / "a.txt", "x")
    write_text(tmp_path / "b.txt", "y")
    assert seen == [None] and (tmp_path / "a.txt").read_text() == "x"
    assert faults.point("train:eval-loss", 1.5) == 1.5
    with faults.inject("train:eval-loss", lambda loss: loss * 2):
        assert faults.point("train:eval-loss", 1.5) == 3.0


def test_an_action_that_raises_fails_the_write_at_that_point_and_leaves_no_file(tmp_path):
    def fail(_):
        raise OSError(5, "Input/output error")

    with faults.inject("file:a.txt", fail), pytest.raises(Exception, match="Could not write"):
        write_text(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []
