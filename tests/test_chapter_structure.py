"""What every chapter promises a learner, checked on each solution notebook (the learner's copy is built from it).

A chapter opens with its title, what the learner will be able to do and how long it takes; every exercise states
its difficulty, importance and time, and is followed by a check cell; sections end with a prediction to make
before computing; the chapter links its sources and ends with a replication table; cells that draw plots,
widgets or progress bars are tagged so nbval does not compare their (run-dependent) output.
"""

from __future__ import annotations

import re

import nbformat
import pytest

from tests.check_helpers import PREDATE_THE_STANDARD
from utils.checks import chapter_exercises
from utils.course import stats
from utils.course.nbtest import output_text
from utils.course.notebooks import ROOT, tags

SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
EXERCISE_HEADING = re.compile(r"^### Exercise (\d+)\.(\d+) — \S", re.M)
DIFFICULTY_LINE = re.compile(r"^> Difficulty: [🔴⚪]{5} · Importance: [🔵⚪]{5} · About \d+ minutes", re.M)
TIME_ESTIMATE = re.compile(r"(?i)\btime\b\W{0,4}\s*(about\s*)?\d+(\.\d+)?(\s*[–-]\s*\d+(\.\d+)?)?\s*hours?")
DRAWS = re.compile(r"\b(heatmap|lines|attention_view)\(|\.show\(\)|widgets\.interact|\btqdm\(")


def _notebook(path):
    return nbformat.read(path, as_version=4)


def _markdown(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "markdown"]


@pytest.fixture(params=SOLUTIONS, ids=[path.stem for path in SOLUTIONS])
def chapter(request):
    return request.param.stem[:2], _notebook(request.param)


def test_opens_with_title_goals_and_time(chapter):
    number, nb = chapter
    opening = _markdown(nb)[0]
    assert re.match(rf"# {number} — \S", opening), f"the first markdown cell must start '# {number} — Title'"
    assert "By the end you will be able to" in opening, "the opening must say what the learner will be able to do"
    assert TIME_ESTIMATE.search(opening), "the opening must say how long the chapter takes (e.g. 'Time: about 2 hours')"


def test_every_exercise_states_difficulty_and_time_and_is_checked(chapter):
    number, nb = chapter
    headings = [(cell_index, match) for cell_index, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
                for match in EXERCISE_HEADING.finditer(cell.source)]
    registered = {exercise.number for exercise in chapter_exercises(number).values()}
    assert {f"{m.group(1)}.{m.group(2)}" for _, m in headings} == registered, \
        "every exercise in utils/checks must have a '### Exercise N.M — Title' heading, and only those"
    for cell_index, match in headings:
        exercise = f"{match.group(1)}.{match.group(2)}"
        assert int(match.group(1)) == int(number), f"Exercise {exercise} is numbered for another chapter"
        assert DIFFICULTY_LINE.search(nb.cells[cell_index].source[match.end():]), \
            f"Exercise {exercise}: add '> Difficulty: 🔴🔴⚪⚪⚪ · Importance: 🔵🔵🔵⚪⚪ · About 10 minutes'"
        later_code = [cell.source for cell in nb.cells[cell_index + 1:] if cell.cell_type == "code"]
        assert any("check." in source for source in later_code[:3]), f"Exercise {exercise} has no check cell"


def test_sections_end_with_a_prediction_and_sources_are_linked(chapter):
    _, nb = chapter
    text = "\n".join(_markdown(nb))
    sections = len(re.findall(r"^## ", text, re.M))
    predictions = len(re.findall(r"(?i)predict", text))
    assert predictions >= max(1, sections // 2), \
        f"{sections} sections but only {predictions} 'predict before you compute' questions"
    assert re.search(r"https?://(arxiv\.org|transformer-circuits\.pub|[\w.-]+)/", text), "link the original work"


def test_ends_with_a_replication_table(chapter):
    _, nb = chapter
    replication = [index for index, cell in enumerate(nb.cells)
                   if cell.cell_type == "markdown" and re.search(r"^#+ .*Replication", cell.source, re.M)]
    assert replication, "the chapter must end with a '## Replication' section"
    table_cells = [cell for cell in nb.cells[replication[-1]:] if cell.cell_type == "code"]
    assert any("| " in output_text(cell) for cell in table_cells), \
        "the replication section must show a table computed by the notebook (utils.report.replication_table)"


def test_cells_that_draw_are_not_compared_by_nbval(chapter):
    _, nb = chapter
    untagged = [index + 1 for index, cell in enumerate(nb.cells)
                if cell.cell_type == "code" and DRAWS.search(cell.source) and "nbval-ignore-output" not in tags(cell)
                and not re.match(r"\s*(import|from)\s", cell.source.split("\n")[0] if cell.source else "")
                and any(output.get("output_type") in ("display_data", "execute_result") for output in cell.outputs)]
    assert not untagged, f"cells {untagged} draw a figure, widget or progress bar: tag them nbval-ignore-output"


def _standard(chapter):
    number, _ = chapter
    if number in PREDATE_THE_STANDARD:
        pytest.skip(f"chapter {number} predates the standard (AUTHORING.md)")


def test_every_exercise_has_tiered_hints(chapter):
    _standard(chapter)
    number, nb = chapter
    for cell_index, cell in enumerate(nb.cells):
        for match in EXERCISE_HEADING.finditer(cell.source if cell.cell_type == "markdown" else ""):
            text = cell.source[match.end():]
            for later in nb.cells[cell_index + 1:]:  # the hints may sit in markdown cells before the code
                if later.cell_type != "markdown":
                    break
                text += later.source
            hints = re.findall(r"<details>\s*<summary>\s*(Hint[^<]*)</summary>", text)
            assert len(hints) >= 2, (f"Exercise {match.group(1)}.{match.group(2)}: give at least two tiered hints "
                                     f"(<details><summary>Hint 1: the idea</summary>, then Hint 2: shapes and calls)")


def test_each_answer_is_defined_in_one_cell_only(chapter):
    """The grader grades the object of the exercise's name: no later cell may rebind it (use or_reference)."""
    number, nb = chapter
    for key in chapter_exercises(number):
        defines = re.compile(rf"^(def|class)\s+{re.escape(key)}\b|^{re.escape(key)}\s*(:[^=]*)?=[^=]", re.M)
        cells = [index + 1 for index, cell in enumerate(nb.cells) if cell.cell_type == "code" and defines.search(cell.source)]
        assert len(cells) == 1, f"`{key}` is defined in cells {cells}; define it once, in its exercise cell"


def test_depth_meets_the_standard(chapter):
    _standard(chapter)
    number, _ = chapter
    counted = stats.chapter_stats(next(path for path in SOLUTIONS if path.name.startswith(number)))
    assert counted.long_solutions >= stats.MIN_LONG_SOLUTIONS, (
        f"{counted.long_solutions} exercises have reference solutions of >= {stats.LONG_SOLUTION_LINES} lines: "
        f"{counted.lines} (the standard asks for {stats.MIN_LONG_SOLUTIONS})")


def test_the_course_averages_enough_exercises_per_chapter():
    problems = [p for p in stats.shortfalls(stats.course_stats(), exempt=PREDATE_THE_STANDARD) if "average" in p]
    assert not problems, problems
