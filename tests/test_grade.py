"""`python -m utils.grade`: grades come from the grader's own checks, in a scratch folder, whatever the notebook does.

The fast tests grade variants of tests/fixtures/99_demo.ipynb against tests/fixtures/demo_checks.py (chapter "99":
`add` 1 point, `answer` 2 points), so they need no model. The slow test round-trips the real chapters.
"""

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from utils.course import build, grade
from utils.course.notebooks import ROOT, read

FIXTURE = Path(__file__).parent / "fixtures" / "99_demo.ipynb"
CHECKS = "tests.fixtures.demo_checks"
TIMEOUT = 5  # s per cell and per check, for the notebooks that hang
GENEROUS = 120  # for the others: importing torch in a kernel on a busy 2-core machine can take 10 s
NO_TORCH = ("demo-02", "demo-05", "demo-08")  # the cells that import the checks (and so torch) and call them


def variant(source: Path, dest: Path, insert: dict[str, str] = {}, replace: dict[str, tuple[str, str]] = {},
            append: list[str] = (), drop: tuple[str, ...] = ()) -> Path:
    """A copy of a notebook with code cells inserted before given cell ids, text replaced, cells appended/dropped."""
    nb = read(source)
    cells = []
    for cell in nb.cells:
        if cell.id in insert:
            cells.append(nbformat.v4.new_code_cell(insert[cell.id]))
        if cell.id in replace:
            cell.source = cell.source.replace(*replace[cell.id])
        if cell.id not in drop:
            cells.append(cell)
    nb.cells = cells + [nbformat.v4.new_code_cell(source) for source in append]
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


FAKE_PASS = [
    'print("✅ Exercise 99.1 (add): passed")\nprint("✅ Exercise 99.2 (answer): passed")',
    'check.add = lambda f: print("✅ Exercise 99.1 (add): passed")\ncheck.add(add)',
    "import utils.course.checking\n"
    "utils.course.checking.run_check = lambda ex, answer, hidden: utils.course.checking.Result(ex, True, 'passed')\n"
    "for ex in utils.course.checking.REGISTRY['99'].values():\n"
    "    object.__setattr__(ex, 'check', lambda answer, hidden: None)",
]


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    """The fixture built like a real chapter, and variants of it, each in its own submission folder."""
    root = tmp_path_factory.mktemp("course")
    (root / "solutions").mkdir()
    shutil.copy(FIXTURE, root / "solutions")
    assert build.build(root) == 0
    solution, learner = root / "solutions" / FIXTURE.name, root / "chapters" / FIXTURE.name
    subs = tmp_path_factory.mktemp("submissions")
    paths = {  # the two that hang come first: they are graded with the short TIMEOUT, so nothing imports torch
        "timeout": variant(solution, subs / "timeout" / "99_demo.ipynb", insert={"demo-07": "while True:\n    pass"},
                           drop=NO_TORCH),
        # `add` hangs on a hidden case only; `answer` was renamed
        "tricky": variant(solution, subs / "tricky" / "99_demo.ipynb", drop=NO_TORCH, replace={
            "demo-04": ("total = a + b", "while b == 0.5:\n        pass\n    total = a + b"),
            "demo-07": ("answer =", "reply =")}),
        "solution": solution,
        "learner": learner,
        "wrong": variant(solution, subs / "wrong" / "99_demo.ipynb",
                         replace={"demo-04": ("a + b", "a - b"), "demo-07": ("6 * 7", "41")}),
        "cheat": variant(learner, subs / "cheat" / "99_demo.ipynb", append=FAKE_PASS),
        "files": variant(solution, subs / "files" / "99_demo.ipynb", append=[
            "import os, shutil\nfrom pathlib import Path\nPath('junk.txt').write_text('junk')\nos.mkdir('junk')\n"
            "for path in Path.cwd().iterdir():\n    if path.suffix == '.ipynb':\n        path.unlink()"]),
        "dies": variant(solution, subs / "dies" / "99_demo.ipynb", insert={"demo-08": "import os\nos._exit(1)"}),
        "no_chapter": subs / "no_chapter" / "notes.ipynb",
        "invalid": subs / "invalid" / "99_demo.ipynb",
    }
    paths["no_chapter"].parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), paths["no_chapter"])
    paths["invalid"].parent.mkdir()
    paths["invalid"].write_text('{"cells": [')  # a truncated upload
    return paths


@pytest.fixture(scope="module")
def graded(notebooks):
    """Every variant graded once, two at a time; also a snapshot of every submission folder before and after."""
    folders = {name: path.parent for name, path in notebooks.items()}
    before = {name: _snapshot(folder) for name, folder in folders.items()}
    names = list(notebooks)
    grades = grade.grade_all([notebooks[name] for name in names[:2]], timeout=TIMEOUT, jobs=2, checks_module=CHECKS)
    grades += grade.grade_all([notebooks[name] for name in names[2:]], timeout=GENEROUS, jobs=2, checks_module=CHECKS)
    after = {name: _snapshot(folder) for name, folder in folders.items()}
    return dict(zip(names, grades)), before, after


def _snapshot(folder: Path) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def results(grade_: grade.NotebookGrade) -> dict:
    return {row.key: (row.passed, row.points, row.message) for row in grade_.rows}


def test_solution_gets_full_marks(graded):
    solution = graded[0]["solution"]
    assert (solution.points, solution.max_points) == (3, 3)
    assert [(row.exercise, row.key, row.max_points) for row in solution.rows] == [("99.1", "add", 1), ("99.2", "answer", 2)]
    assert results(solution)["add"][2] == "passed (4 cases)"  # the hidden cases ran
    assert solution.failed_cells == []


def test_learner_version_gets_zero(graded):
    learner = graded[0]["learner"]
    assert (learner.points, learner.max_points) == (0, 3)
    assert "not attempted yet" in results(learner)["add"][2]
    assert [run.index + 1 for run in learner.failed_cells] == [11]  # `print(add(2, 3))` raises, and is recorded


def test_wrong_answers_fail_with_their_message(graded):
    wrong = results(graded[0]["wrong"])
    assert wrong["add"][:2] == (False, 0) and "Did you subtract instead of adding?" in wrong["add"][2]
    assert wrong["answer"][:2] == (False, 0) and "expected 42" in wrong["answer"][2]


def test_printed_pass_lines_and_monkeypatched_checks_earn_nothing(graded):
    cheat = graded[0]["cheat"]
    assert cheat.points == 0
    assert "not attempted yet" in results(cheat)["add"][2]
    assert [run.index + 1 for run in cheat.failed_cells] == [11]  # the cheating cells themselves ran fine


def test_timed_out_cell_is_interrupted_and_later_cells_still_graded(graded):
    timed_out = graded[0]["timeout"]
    assert [(run.index + 1, run.status) for run in timed_out.failed_cells] == [(6, "timeout")]
    assert timed_out.points == 3  # `answer` is defined in the cell after the infinite loop


def test_a_cell_that_kills_the_kernel_is_skipped_and_the_rest_graded(graded):
    dies = graded[0]["dies"]
    assert (dies.points, dies.max_points) == (3, 3)
    assert [(run.index + 1, run.status, run.evalue) for run in dies.failed_cells] == [(9, "died", "crashed the kernel")]
    assert "killed the kernel (skipped): 9" in grade.format_table(dies)


def test_a_cell_that_allocates_without_bound_is_killed_and_the_rest_graded(notebooks, tmp_path):
    hog = variant(notebooks["solution"], tmp_path / "hog" / "99_demo.ipynb", insert={
        "demo-07": "hog = []\nwhile True:\n    hog.append(bytearray(50 * 2**20))"})
    [graded_hog] = grade.grade_all([hog], timeout=GENEROUS, checks_module=CHECKS, memory_gb=1.5)
    assert (graded_hog.points, graded_hog.max_points) == (3, 3), graded_hog.rows
    [killed] = graded_hog.failed_cells
    assert killed.status == "died" and killed.evalue == "used more than 1.5 GiB of memory"
    assert "cells that killed the kernel (skipped): 8" in grade.format_table(graded_hog)


def test_check_that_hangs_on_a_hidden_case_fails_alone_and_a_missing_answer_is_named(graded):
    tricky = results(graded[0]["tricky"])
    assert tricky["add"] == (False, 0, f"the check ran past {TIMEOUT} s (does your code loop forever?)")
    assert tricky["answer"][2] == "`answer` is not defined in your notebook: did you rename it or skip its cell?"


def test_submission_folders_are_untouched(graded):
    grades, before, after = graded
    assert grades["files"].points == 3  # the notebook deleted and created files in its own cwd, the scratch copy
    assert before == after


def test_unreadable_notebooks_give_one_clear_row(graded):
    for name, expected in [("invalid", "cannot read the notebook (it is not valid JSON)"),
                           ("no_chapter", "cannot tell which chapter this is")]:
        [row] = graded[0][name].rows
        assert expected in row.message and row.points == 0 and not row.passed


def test_cli_jobs_1_matches_jobs_2_and_writes_json_and_csv(graded, notebooks, tmp_path):
    names = ["solution", "cheat", "invalid"]
    out_json, out_csv = tmp_path / "grades.json", tmp_path / "grades.csv"
    out_html = tmp_path / "grades.html"
    command = [sys.executable, "-m", "utils.grade", *(str(notebooks[name]) for name in names), "--jobs", "1",
               "--timeout", str(GENEROUS), "--checks-module", CHECKS, "--json", str(out_json), "--csv", str(out_csv),
               "--html", str(out_html)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "99.1 add ✓ 1/1 passed (4 cases)" in [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "3 notebooks: 3/6 points" in result.stdout

    expected = grade.rows([graded[0][name] for name in names])
    written = json.loads(out_json.read_text())
    assert written == expected
    assert list(written[0]) == grade.COLUMNS == ["notebook", "chapter", "exercise", "key", "passed", "points",
                                                 "max_points", "message"]
    with out_csv.open(newline="") as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == grade.COLUMNS
    totals = [row for row in table if row["exercise"] == "total"]
    assert [(row["notebook"], row["points"], row["max_points"], row["passed"]) for row in totals] == [
        (str(notebooks[name]), points, max_points, passed) for name, points, max_points, passed in [
            ("solution", "3", "3", "True"), ("cheat", "0", "3", "False"), ("invalid", "0", "0", "False")]]
    assert [row for row in table if row["exercise"] != "total"] == [
        {key: str(value) for key, value in row.items()} for row in expected]
    assert table[-1]["exercise"] == "total" and table[-1]["message"] == "0/0 points"
    report = out_html.read_text()
    assert report.count("<h3>") == 3 and ": 3/3 points</h3>" in report and ": 0/3 points</h3>" in report
    assert "cannot read the notebook" in report  # the invalid notebook is reported, not skipped


def test_class_summary_counts_passes_and_the_most_common_failure(graded):
    grades = [graded[0][name] for name in ("solution", "learner", "cheat", "wrong")]
    summary = {entry["key"]: entry for entry in grade.class_summary(grades)}
    assert (summary["add"]["passed"], summary["add"]["graded"]) == (1, 4)
    assert summary["add"]["most_common_failure"].startswith("not attempted yet")
    assert summary["add"]["most_common_failure_count"] == 2  # the untouched learner and the cheat
    report = grade.html_report(grades)
    assert report.index(">answer<") < report.index(">add<") or summary["answer"]["passed"] >= summary["add"]["passed"]
    assert "<script" not in report and "&lt;" not in report.split("<body>")[0]


def test_bad_usage_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "utils.grade", str(tmp_path / "missing.ipynb")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "no such notebook" in result.stderr and "missing.ipynb" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# The real chapters (minutes): every solution gets full marks, every learner notebook gets zero.
# ---------------------------------------------------------------------------------------------------------


def _chapters_with_checks(folder: str) -> list[Path]:
    return [path for path in sorted((ROOT / folder).glob("[0-9][0-9]_*.ipynb"))
            if importlib.util.find_spec(f"utils.checks.ch{path.name[:2]}") is not None]


@pytest.mark.slow
def test_real_chapters_round_trip():
    solutions, chapters = _chapters_with_checks("solutions"), _chapters_with_checks("chapters")
    if not solutions and not chapters:
        pytest.skip("no chapter with a check module yet")
    grades = grade.grade_all(solutions + chapters, jobs=2)
    for graded_ in grades[:len(solutions)]:
        failures = [f"{row.exercise} {row.key}: {row.message}" for row in graded_.rows if not row.passed]
        assert graded_.max_points > 0 and not failures, f"{graded_.notebook}: {failures}"
    for graded_ in grades[len(solutions):]:
        passed = [f"{row.exercise} {row.key}: {row.message}" for row in graded_.rows if row.passed]
        assert graded_.max_points > 0 and not passed, f"{graded_.notebook} earns points untouched: {passed}"


def test_parallel_kernels_share_the_cores_instead_of_oversubscribing_them(monkeypatch):
    """Two kernels each running torch on every core slow each other down several times over."""
    seen = []
    monkeypatch.setattr(grade, "grade_notebook",
                        lambda path, timeout, module, threads=None, *rest: seen.append(threads))
    monkeypatch.setattr(grade.os, "cpu_count", lambda: 4)
    grade.grade_all(["a.ipynb", "b.ipynb"], jobs=2)
    assert seen == [2, 2]
    seen.clear()
    grade.grade_all(["a.ipynb", "b.ipynb"], jobs=1)
    assert seen == [None, None]

    environments = []

    class RecordingKernel:
        def __init__(self, nb, cwd, timeout, allow_errors, env):
            environments.append(env)

        def started(self):
            raise RuntimeError("stop here")

    monkeypatch.setattr(grade, "Kernel", RecordingKernel)
    problem = grade._run(None, Path("."), Path("."), "99", CHECKS, 5, 1, threads=3)[2]
    assert "stop here" in problem and environments[0]["OMP_NUM_THREADS"] == "3"


def test_wrong_chapter_and_old_nbformat(tmp_path):
    """A notebook of another chapter is named as such; an nbformat-3 notebook is converted and graded."""
    solution = tmp_path / "course"
    (solution / "solutions").mkdir(parents=True)
    shutil.copy(FIXTURE, solution / "solutions")
    assert build.build(solution) == 0
    built = read(solution / "solutions" / FIXTURE.name)
    [wrong] = grade.grade_all([solution / "solutions" / FIXTURE.name], checks_module=CHECKS,
                              expected_chapter="01")
    assert wrong.points == 0 and "this is the notebook of chapter 99, but chapter 01 was asked for" in \
        wrong.rows[0].message
    old = tmp_path / "old" / "99_demo.ipynb"
    old.parent.mkdir()
    old.write_text(nbformat.writes(nbformat.convert(built, 3)), encoding="utf-8")
    assert '"nbformat": 3' in old.read_text()
    [graded_old] = grade.grade_all([old], timeout=GENEROUS, checks_module=CHECKS, expected_chapter="99")
    assert (graded_old.points, graded_old.max_points) == (3, 3), graded_old.rows
    result = subprocess.run([sys.executable, "-m", "utils.grade", str(old), "--chapter", "1"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--chapter takes two digits" in result.stderr


@pytest.mark.slow
def test_realistic_submissions_of_a_real_chapter(tmp_path):
    """Chapter 00 as learners hand it in: an exercise left unfinished between finished ones, answers wrong in
    plausible ways (the wrong axis, a missing term, tiling KV heads instead of interleaving them), and cells moved
    around. Each gets exactly the points it earned, with a message naming the mistake."""
    solution = ROOT / "solutions" / "00_orientation.ipynb"
    unfinished = variant(solution, tmp_path / "unfinished" / "00_orientation.ipynb", replace={
        "81c53da0": ("    tokens = model.to_tokens(prompt)", "    raise NotImplementedError\n    tokens = model.to_tokens(prompt)")})
    wrong = variant(solution, tmp_path / "wrong" / "00_orientation.ipynb", replace={
        "afdee97b": (' + cache[f"blocks.{layer}.hook_attn_out"]', ""),
        "e064da27": ("pattern[:, 1:, 0].mean(dim=-1)", "pattern[:, 1:, 0].mean(dim=0)"),
        "ce17d355": ("kv.repeat_interleave(group, dim=2)", "kv.repeat(1, 1, group, 1)")})
    reordered = tmp_path / "reordered" / "00_orientation.ipynb"
    nb = read(solution)
    moved = next(cell for cell in nb.cells if cell.get("id") == "ce17d355")  # Exercise 0.5 moved up to the top
    nb.cells.remove(moved)
    nb.cells.insert(2, moved)
    reordered.parent.mkdir()
    nbformat.write(nb, reordered)

    grades = dict(zip(["unfinished", "wrong", "reordered"],
                      grade.grade_all([unfinished, wrong, reordered], jobs=2, expected_chapter="00")))
    # Exercise 0.5's cell now runs before `import torch`: only it is lost, and the message says why.
    full = {row.key: row.max_points for row in grades["reordered"].rows}
    reordered_rows = results(grades["reordered"])
    assert grades["reordered"].points == sum(full.values()) - full["expand_kv_heads"], grades["reordered"].rows
    assert reordered_rows["expand_kv_heads"][2].startswith(
        "`expand_kv_heads` is not defined: cell 3, which defines it, raised NameError: name 'torch' is not defined")

    unfinished_rows = results(grades["unfinished"])
    assert [key for key, (passed, _, _) in unfinished_rows.items() if not passed] == ["head_ablation_drop"]
    assert "not attempted yet" in unfinished_rows["head_ablation_drop"][2]
    assert grades["unfinished"].points == sum(full.values()) - full["head_ablation_drop"]

    wrong_rows = results(grades["wrong"])
    assert sorted(key for key, (passed, _, _) in wrong_rows.items() if not passed) == [
        "bos_attention", "expand_kv_heads", "reconstruct_resid_post"]
    for key in ("bos_attention", "expand_kv_heads", "reconstruct_resid_post"):
        message = wrong_rows[key][2]
        assert message and "Traceback" not in message and len(message) < 600, (key, message)
    assert "shape" in wrong_rows["bos_attention"][2]
    assert "interleave" in wrong_rows["expand_kv_heads"][2] or "h // group" in wrong_rows["expand_kv_heads"][2]
    assert "attn_out" in wrong_rows["reconstruct_resid_post"][2] or "attention" in wrong_rows["reconstruct_resid_post"][2]
