"""An untouched learner notebook earns nothing, proved without running every chapter top to bottom.

Statically, for every chapter: each exercise's function, as the learner's notebook has it (the stub the build
wrote), is defined from its cell alone and handed to the check with hidden cases on; the check must report it
as not attempted. End to end, for one fast chapter: the untouched notebook is graded by the real grader.
"""

from __future__ import annotations

import ast
import math

import pytest
import torch

from tests.check_helpers import PREDATE_THE_STANDARD
from utils.checks import chapter_exercises
from utils.course import sandbox
from utils.course.checking import run_check
from utils.course.notebooks import ROOT, read

CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
FAST_CHAPTER = "00_orientation"


def _definitions(path) -> dict[str, ast.FunctionDef]:
    """Every top-level function the notebook's code cells define, by name (the last definition wins)."""
    found = {}
    for cell in read(path).cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:  # IPython magics; exercise cells have none
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[node.name] = node
    return found


def _stub_function(node: ast.FunctionDef):
    """The function alone: annotations dropped and defaults replaced by None, so nothing else of the notebook
    is needed to define it."""
    node = ast.fix_missing_locations(ast.parse(ast.unparse(node)).body[0])
    for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg]:
        if arg is not None:
            arg.annotation = None
    node.returns = None
    node.args.defaults = [ast.Constant(None) for _ in node.args.defaults]
    node.args.kw_defaults = [ast.Constant(None) if d is not None else None for d in node.args.kw_defaults]
    node.decorator_list = []
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module([ast.fix_missing_locations(node)], []), "<stub>", "exec"), namespace)
    return namespace[node.name]


CASES = [(path, entry) for path in CHAPTERS for entry in chapter_exercises(path.name[:2]).values()]


@pytest.mark.parametrize("path, entry", CASES, ids=[f"{p.stem}:{e.number}:{e.key}" for p, e in CASES])
def test_every_stub_is_reported_as_not_attempted(path, entry):
    definitions = _definitions(path)
    if entry.key in definitions:
        stub = _stub_function(definitions[entry.key])
    elif entry.chapter in PREDATE_THE_STANDARD:  # a value exercise, which the standard no longer has
        stub = Ellipsis
    else:
        pytest.fail(f"{path.name}: no function `{entry.key}` for {entry.label} (exercises are functions)")
    result = run_check(entry, stub, hidden=True)
    assert not result.passed and not result.attempted, f"the untouched stub got: {result.message}"


@pytest.mark.slow
@pytest.mark.skipif(not sandbox.available(), reason=str(sandbox.unavailable_reason()))
def test_an_untouched_notebook_graded_end_to_end_earns_nothing():
    from utils.course import grade

    [graded] = grade.grade_all([ROOT / "chapters" / f"{FAST_CHAPTER}.ipynb"], expected_chapter=FAST_CHAPTER[:2])
    assert graded.max_points > 0 and graded.points == 0, graded.rows
    assert all(row.message.startswith("not attempted yet") for row in graded.rows), graded.rows
