"""`python -m utils.grade`: a grade comes only from the judge's own checks, whatever the notebook does.

The tests grade variants of tests/fixtures/99_demo.ipynb against tests/fixtures/demo_checks.py (chapter "99":
`add` 1 point, `answer` 2 points, `centre` 1 point), so they need no model. Besides honest mistakes (a wrong
answer, an unfinished exercise, a cell that hangs or crashes), they hand in one hostile submission per kind of
attack a learner could try from inside their kernel: credit by tampering (fake pass lines, patched checks,
patched comparison libraries, a fake grading agent, rewritten cell machinery, forged replies, reading the
caller's frames, handing in the course's own reference), and damage (rewriting the course, the model cache or
another learner's submission, a process left behind to rewrite the report, killing the grader, a flood of
output, a fork bomb, the network, terminal escapes and spreadsheet formulas in the report). Each must get exactly
the credit it earned, and nothing outside its own scratch folder may change.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from utils.course import build, grade, judge, sandbox
from utils.course.notebooks import ROOT, read

FIXTURE = Path(__file__).parent / "fixtures" / "99_demo.ipynb"
CHECKS = "tests.fixtures.demo_checks"
TIMEOUT = 5  # s per cell and per check, for the notebooks that hang
GENEROUS = 120  # for the others: importing torch in a kernel on a busy 2-core machine can take 10 s
NO_TORCH = ("demo-02", "demo-05", "demo-08", "demo-13", "demo-14")  # cells that import torch or the checks
FULL = 4

if not sandbox.available() and os.environ.get("CI"):
    pytest.fail(f"CI must test the sandboxed grader: {sandbox.unavailable_reason()} (.ci/run installs bubblewrap)",
                pytrace=False)
needs_sandbox = pytest.mark.skipif(not sandbox.available(), reason=str(sandbox.unavailable_reason()))


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
]
PATCHED_CHECKS = ("import utils.course.checking as c\n"
                  "c.run_check = lambda ex, answer, hidden: c.Result(ex, True, 'passed')\n"
                  "for ex in c.REGISTRY['99'].values():\n"
                  "    object.__setattr__(ex, 'check', lambda answer, hidden: None)")
# `centre` wrong (returns its input), and every comparison a check could use made to say "equal"
PATCHED_COMPARISON = ("import torch, builtins\n"
                      "torch.allclose = lambda *a, **k: True\ntorch.equal = lambda *a, **k: True\n"
                      "torch.Tensor.__eq__ = lambda *a: True\ntorch.Tensor.__ne__ = lambda *a: False\n"
                      "builtins.abs = lambda x: 0\n"
                      "def centre(x):\n    return x\n"
                      "def add(a, b):\n    return 0")
FAKE_AGENT = ("import sys, types, json\n"
              "fake = types.ModuleType('utils.course.agent')\n"
              "def serve(path, namespace):\n"
              "    reply = {'answers': {k: {'defined': True, 'callable': True} for k in ('add', 'answer', 'centre')},\n"
              "             'result': 3, 'passed': True, 'verdict': 'passed', 'points': 99}\n"
              "    open(path + '.reply.json', 'w').write(json.dumps(reply))\n"
              "fake.serve = serve\n"
              "sys.modules['utils.course.agent'] = fake")
CELL_MACHINERY = ("ip = get_ipython()\n"
                  "ip.input_transformers_post.append(lambda lines: ['print(\"✅ Exercise 99.1 (add): passed\")\\n'])\n"
                  "ip.events.register('post_run_cell', lambda result: print('✅ passed'))")
FORGER = ("import threading, glob, json, os\n"
          "def forge():\n"
          "    while True:\n"
          "        for path in glob.glob('../rpc/*.json'):\n"
          "            if not path.endswith('.reply.json'):\n"
          "                try:\n"
          "                    open(path[:-5] + '.reply.json', 'w').write(json.dumps({'result': 3, 'answers': {}}))\n"
          "                except OSError:\n"
          "                    pass\n"
          "threading.Thread(target=forge, daemon=True).start()")
FRAME_WALKER = ("import sys\n"
                "def add(a, b):\n"
                "    frame, seen = sys._getframe(1), []\n"
                "    while frame is not None:\n"
                "        for name in ('expected', 'reference', '_reference_add'):\n"
                "            if name in frame.f_locals or name in frame.f_globals:\n"
                "                found = frame.f_locals.get(name, frame.f_globals.get(name))\n"
                "                return found(a, b) if callable(found) else found\n"
                "        frame = frame.f_back\n"
                "    return None")
ALIASED = "add = check._reference_add\ncentre = check._reference_centre"
WRAPPED = ("from tests.fixtures.demo_checks import _reference_add as _r\n"
           "def add(a, b):\n    return _r(a, b)\n"
           "def centre(x, _ref=check._reference_centre):\n    return _ref(x) + 0")


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """The fixture built like a real chapter: (solution, learner notebook)."""
    root = tmp_path_factory.mktemp("course")
    (root / "solutions").mkdir()
    shutil.copy(FIXTURE, root / "solutions")
    assert build.build(root) == 0
    return root / "solutions" / FIXTURE.name, root / "chapters" / FIXTURE.name


@pytest.fixture(scope="module")
def listener():
    """A TCP server on loopback that records whether anything connected to it (nothing inside a sandbox may)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connected = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
                connected.append(True)
                connection.close()
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], connected
    stop.set()
    server.close()


@pytest.fixture(scope="module")
def notebooks(course, listener, tmp_path_factory):
    """Every variant, each in its own submission folder."""
    solution, learner = course
    port, _ = listener
    subs = tmp_path_factory.mktemp("submissions")
    marker = subs / "lingering-wrote-this"
    victim = subs / "victim" / "99_demo.ipynb"
    vandal_targets = [ROOT / "utils" / "checks" / "__init__.py", ROOT / "README.md", victim]
    from utils.models import cache_dir

    vandalism = ("import os, shutil, pathlib\n"
                 f"for target in {[str(p) for p in vandal_targets]!r} + [{str(cache_dir())!r}]:\n"
                 "    for attempt in (lambda: pathlib.Path(target).write_text('vandalised'),\n"
                 "                    lambda: os.remove(target), lambda: shutil.rmtree(target)):\n"
                 "        try:\n            attempt()\n        except Exception as error:\n"
                 "            print(type(error).__name__)")
    lingering = ("import subprocess\n"
                 f"subprocess.Popen(['sh', '-c', 'sleep 3; echo pwned > {marker}'], start_new_session=True)\n"
                 "import os\n"
                 "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                 f"        import time; time.sleep(4); open({str(marker)!r}, 'w').write('pwned'); os._exit(0)\n"
                 "    os._exit(0)")
    paths = {  # the two that hang come first: they are graded with the short TIMEOUT, so nothing imports torch
        "timeout": variant(solution, subs / "timeout" / "99_demo.ipynb", insert={"demo-07": "while True:\n    pass"},
                           drop=NO_TORCH),
        # `add` hangs on a hidden case only; `answer` was renamed
        "tricky": variant(solution, subs / "tricky" / "99_demo.ipynb", drop=NO_TORCH, replace={
            "demo-04": ("total = a + b", "while b == 0.5:\n        pass\n    total = a + b"),
            "demo-07": ("answer =", "reply =")}),
        "solution": solution,
        "learner": learner,
        "victim": variant(solution, victim),
        "wrong": variant(solution, subs / "wrong" / "99_demo.ipynb", replace={
            "demo-04": ("a + b", "a - b"), "demo-07": ("6 * 7", "41"),
            "demo-13": ("x - x.mean(dim=-1, keepdim=True)", "x - x.mean()")}),
        "files": variant(solution, subs / "files" / "99_demo.ipynb", append=[
            "import os, shutil\nfrom pathlib import Path\nPath('junk.txt').write_text('junk')\nos.mkdir('junk')\n"
            "for path in Path.cwd().iterdir():\n    if path.suffix == '.ipynb':\n        path.unlink()"]),
        "dies": variant(solution, subs / "dies" / "99_demo.ipynb", insert={"demo-08": "import os\nos._exit(1)"}),
        "no_chapter": subs / "no_chapter" / "notes.ipynb",
        "invalid": subs / "invalid" / "99_demo.ipynb",
        # credit by tampering inside the kernel: all start from the untouched learner notebook
        "fake_pass": variant(learner, subs / "fake_pass" / "99_demo.ipynb", append=FAKE_PASS),
        "patched_checks": variant(learner, subs / "patched_checks" / "99_demo.ipynb", append=[PATCHED_CHECKS]),
        "patched_comparison": variant(learner, subs / "patched_comparison" / "99_demo.ipynb",
                                      append=[PATCHED_COMPARISON]),
        "fake_agent": variant(learner, subs / "fake_agent" / "99_demo.ipynb", append=[FAKE_AGENT]),
        "cell_machinery": variant(learner, subs / "cell_machinery" / "99_demo.ipynb", append=[CELL_MACHINERY]),
        "forger": variant(learner, subs / "forger" / "99_demo.ipynb", append=[FORGER]),
        "frame_walker": variant(learner, subs / "frame_walker" / "99_demo.ipynb", append=[FRAME_WALKER]),
        "aliased": variant(learner, subs / "aliased" / "99_demo.ipynb", append=[ALIASED]),
        "wrapped": variant(learner, subs / "wrapped" / "99_demo.ipynb", append=[WRAPPED]),
        # damage: all start from the solution, so each should still get full marks
        "vandal": variant(solution, subs / "vandal" / "99_demo.ipynb", append=[vandalism]),
        "lingering": variant(solution, subs / "lingering" / "99_demo.ipynb", append=[lingering]),
        "grader_killer": variant(solution, subs / "grader_killer" / "99_demo.ipynb", append=[
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)"]),
        "flood": variant(solution, subs / "flood" / "99_demo.ipynb", append=[
            "import sys\nfor i in range(3000):\n    sys.stdout.write('x' * 100_000 + '\\n')"]),
        "fork_bomb": variant(solution, subs / "fork_bomb" / "99_demo.ipynb", append=[
            "import subprocess\nsleepers = [subprocess.Popen(['sleep', '60']) for _ in range(400)]"]),
        "network": variant(solution, subs / "network" / "99_demo.ipynb", append=[
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            f"    print('connected')\nexcept OSError as error:\n    print('no network:', error)"]),
        "escapes": variant(learner, subs / "=HYPERLINK(1)" / "=cmd|' calc'!A0.ipynb", append=[
            "def add(a, b):\n    raise ValueError('\\x1b[2J\\x1b]0;pwned\\x07\\x1b[31m=HYPERLINK(\"http://x\")\\u202e')"]),
    }
    paths["no_chapter"].parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), paths["no_chapter"])
    paths["invalid"].parent.mkdir()
    paths["invalid"].write_text('{"cells": [')  # a truncated upload
    return paths, marker, vandal_targets


def _fingerprint(paths: list[Path]) -> dict:
    out = {}
    for path in paths:
        if path.is_dir():
            out.update(_fingerprint(sorted(p for p in path.rglob("*") if p.is_file())))
        elif path.exists():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def graded(notebooks):
    """Every variant graded once, two at a time; plus fingerprints of every submission and of the course."""
    paths, marker, vandal_targets = notebooks
    if not sandbox.available():
        pytest.skip(str(sandbox.unavailable_reason()))
    from utils.models import cache_dir

    watched = [path.parent for path in paths.values()] + vandal_targets + [cache_dir(), ROOT / "utils"]
    before = _fingerprint(watched)
    names = list(paths)
    grades = grade.grade_all([paths[name] for name in names[:2]], timeout=TIMEOUT, jobs=2, checks_module=CHECKS)
    grades += grade.grade_all([paths[name] for name in names[2:]], timeout=GENEROUS, jobs=2, checks_module=CHECKS)
    time.sleep(6)  # longer than the lingering processes would wait before writing
    after = _fingerprint(watched)
    return dict(zip(names, grades)), before, after, marker


def results(grade_) -> dict:
    return {row.key: (row.passed, row.points, row.message) for row in grade_.rows}


@needs_sandbox
def test_solution_gets_full_marks_and_the_untouched_notebook_zero(graded):
    solution, learner = graded[0]["solution"], graded[0]["learner"]
    assert (solution.points, solution.max_points) == (FULL, FULL)
    assert [(row.exercise, row.key, row.max_points) for row in solution.rows] == [
        ("99.1", "add", 1), ("99.2", "answer", 2), ("99.3", "centre", 1)]
    assert results(solution)["add"][2] == "passed (4 cases)"  # the hidden cases ran
    assert solution.failed_cells == []
    assert (learner.points, learner.max_points) == (0, FULL)
    assert all("not attempted yet" in message for _, _, message in results(learner).values())


@needs_sandbox
def test_wrong_answers_fail_with_their_message(graded):
    wrong = results(graded[0]["wrong"])
    assert wrong["add"][:2] == (False, 0) and "Did you subtract instead of adding?" in wrong["add"][2]
    assert wrong["answer"][:2] == (False, 0) and "expected 42" in wrong["answer"][2]
    assert wrong["centre"][:2] == (False, 0) and "each row" in wrong["centre"][2]


@needs_sandbox
@pytest.mark.parametrize("name", ["fake_pass", "patched_checks", "patched_comparison", "fake_agent",
                                  "cell_machinery", "forger", "frame_walker"])
def test_tampering_inside_the_kernel_earns_nothing(graded, name):
    hostile = graded[0][name]
    assert hostile.max_points == FULL and hostile.points == 0, hostile.rows


@needs_sandbox
def test_a_fake_agent_or_forged_replies_are_read_as_the_learners_own_answers(graded):
    assert "expected 3" in results(graded[0]["fake_agent"])["add"][2] or \
        "returned 3" in results(graded[0]["fake_agent"])["add"][2]
    assert not results(graded[0]["patched_comparison"])["centre"][0]


@needs_sandbox
@pytest.mark.parametrize("name", ["aliased", "wrapped"])
def test_the_course_reference_earns_nothing(graded, name):
    rows = results(graded[0][name])
    for key in ("add", "centre"):
        passed, points, message = rows[key]
        assert (passed, points) == (False, 0) and "reference implementation" in message, rows


@needs_sandbox
@pytest.mark.parametrize("name", ["vandal", "lingering", "flood", "network", "files"])
def test_damage_attempts_change_nothing_and_the_work_is_still_graded(graded, name):
    hostile = graded[0][name]
    assert hostile.points == FULL, hostile.rows


@needs_sandbox
def test_nothing_outside_the_scratch_folder_changed_and_nothing_was_left_running(graded):
    grades, before, after, marker = graded
    assert before == after  # the course, the model cache, every submission (the victim's too)
    assert not marker.exists(), "a process started by a notebook outlived its grading"
    leftovers = subprocess.run(["pgrep", "-f", "lingering-wrote-this"], capture_output=True, text=True).stdout
    assert not leftovers.strip()
    assert grades["victim"].points == FULL


@needs_sandbox
def test_a_notebook_cannot_reach_the_network(graded, listener):
    _, connected = listener
    assert graded[0]["network"].points == FULL and not connected


@needs_sandbox
def test_a_notebook_cannot_signal_the_grader(graded):
    """Inside its process namespace the kernel's parent is the sandbox's init, which ignores it, and `kill -1`
    reaches nothing outside: the grader carries on and grades the rest."""
    killer = graded[0]["grader_killer"]
    assert killer.points == FULL, killer.rows
    assert [run.status for run in killer.failed_cells] in (["error"], ["died"])


@needs_sandbox
def test_a_fork_bomb_is_stopped_and_the_rest_graded(graded):
    bomb = graded[0]["fork_bomb"]
    assert bomb.points == FULL, bomb.rows
    [killed] = bomb.failed_cells
    assert killed.status == "died" and "processes" in killed.evalue


@needs_sandbox
def test_a_flood_of_output_is_capped(graded, notebooks, tmp_path):
    paths = notebooks[0]
    result = tmp_path / "flood.json"
    subprocess.run([sys.executable, "-m", "utils.course.judge", str(paths["flood"]), "--result", str(result),
                    "--checks-module", CHECKS, "--timeout", str(GENEROUS)], cwd=ROOT, check=True)
    assert result.stat().st_size < 20_000  # 300 MB printed; the grade keeps none of it


@needs_sandbox
def test_escapes_and_formulas_never_reach_a_terminal_or_a_spreadsheet(graded, notebooks, tmp_path):
    escapes = graded[0]["escapes"]
    message = results(escapes)["add"][2]
    assert "ValueError" in message and "\x1b" not in message and "\u202e" not in message and "\x07" not in message
    table = grade.format_table(escapes)
    assert "\x1b" not in table
    out_csv = tmp_path / "grades.csv"
    command = [sys.executable, "-m", "utils.grade", str(notebooks[0]["escapes"]), "--checks-module", CHECKS,
               "--timeout", str(GENEROUS), "--csv", str(out_csv), "--html", str(tmp_path / "grades.html")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    with out_csv.open(newline="") as file:
        cells = [value for row in csv.DictReader(file) for value in row.values()]
    assert cells and not any(value[:1] in "=+-@" for value in cells if value), cells
    assert "<script" not in (tmp_path / "grades.html").read_text()


@needs_sandbox
def test_timed_out_cell_is_interrupted_and_later_cells_still_graded(graded):
    timed_out = graded[0]["timeout"]
    assert [(run.index + 1, run.status) for run in timed_out.failed_cells] == [(6, "timeout")]
    assert timed_out.points == 3  # `add` and `answer`; `centre` needs torch, whose cells this variant dropped


@needs_sandbox
def test_a_cell_that_kills_the_kernel_is_skipped_and_the_rest_graded(graded):
    dies = graded[0]["dies"]
    assert (dies.points, dies.max_points) == (FULL, FULL)
    assert [(run.index + 1, run.status, run.evalue) for run in dies.failed_cells] == [(9, "died", "crashed the kernel")]
    assert "killed the kernel (skipped): 9" in grade.format_table(dies)


@needs_sandbox
def test_a_cell_that_allocates_without_bound_is_killed_and_the_rest_graded(course, tmp_path):
    hog = variant(course[0], tmp_path / "hog" / "99_demo.ipynb", insert={
        "demo-07": "hog = []\nwhile True:\n    hog.append(b'x' * (50 * 2**20))"})
    [graded_hog] = grade.grade_all([hog], timeout=GENEROUS, checks_module=CHECKS, memory_gb=1.5)
    assert (graded_hog.points, graded_hog.max_points) == (FULL, FULL), graded_hog.rows
    [killed] = graded_hog.failed_cells
    assert killed.status == "died" and killed.evalue == "used more than 1.5 GiB of memory"
    assert "cells that killed the kernel (skipped): 8" in grade.format_table(graded_hog)


@needs_sandbox
def test_check_that_hangs_on_a_hidden_case_fails_alone_and_a_missing_answer_is_named(graded):
    tricky = results(graded[0]["tricky"])
    assert tricky["add"] == (False, 0, f"the check ran past {TIMEOUT} s (does your code loop forever?)")
    assert tricky["answer"][2] == "`answer` is not defined in your notebook: did you rename it or skip its cell?"


@needs_sandbox
def test_unreadable_notebooks_give_one_clear_row(graded):
    for name, expected in [("invalid", "cannot read the notebook (it is not valid JSON)"),
                           ("no_chapter", "cannot tell which chapter this is")]:
        [row] = graded[0][name].rows
        assert expected in row.message and row.points == 0 and not row.passed


@needs_sandbox
def test_cli_jobs_1_matches_jobs_2_and_writes_json_and_csv(graded, notebooks, tmp_path):
    paths = notebooks[0]
    names = ["solution", "fake_pass", "invalid"]
    out_json, out_csv, out_html = tmp_path / "grades.json", tmp_path / "grades.csv", tmp_path / "grades.html"
    command = [sys.executable, "-m", "utils.grade", *(str(paths[name]) for name in names), "--jobs", "1",
               "--timeout", str(GENEROUS), "--checks-module", CHECKS, "--json", str(out_json), "--csv", str(out_csv),
               "--html", str(out_html)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "99.1 add ✓ 1/1 passed (4 cases)" in [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "3 notebooks: 4/8 points" in result.stdout

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
        (str(paths[name]), points, max_points, passed) for name, points, max_points, passed in [
            ("solution", "4", "4", "True"), ("fake_pass", "0", "4", "False"), ("invalid", "0", "0", "False")]]
    assert [row for row in table if row["exercise"] != "total"] == [
        {key: str(value) for key, value in row.items()} for row in expected]
    report = out_html.read_text()
    assert report.count("<h3>") == 3 and ": 4/4 points</h3>" in report and ": 0/4 points</h3>" in report
    assert "cannot read the notebook" in report  # the invalid notebook is reported, not skipped


@needs_sandbox
def test_class_summary_counts_passes_and_the_most_common_failure(graded):
    grades = [graded[0][name] for name in ("solution", "learner", "fake_pass", "wrong")]
    summary = {entry["key"]: entry for entry in grade.class_summary(grades)}
    assert (summary["add"]["passed"], summary["add"]["graded"]) == (1, 4)
    assert summary["add"]["most_common_failure"].startswith("not attempted yet")
    assert summary["add"]["most_common_failure_count"] == 2  # the untouched learner and the fake pass lines
    report = grade.html_report(grades)
    assert "<script" not in report and "&lt;" not in report.split("<body>")[0]


def test_bad_usage_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "utils.grade", str(tmp_path / "missing.ipynb")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "no such notebook" in result.stderr and "missing.ipynb" in result.stderr


def test_no_sandbox_is_refused_unless_asked_for(monkeypatch, tmp_path, course):
    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "bubblewrap (bwrap) is not installed. (hint)")
    monkeypatch.setattr(sandbox, "available", lambda: False)
    assert grade.main([str(course[0]), "--checks-module", CHECKS]) == 2


def test_parallel_kernels_share_the_cores_instead_of_oversubscribing_them(monkeypatch):
    """Two kernels each running torch on every core slow each other down several times over."""
    seen = []
    monkeypatch.setattr(grade, "grade_notebook", lambda path, timeout, module, threads=None, *rest: seen.append(threads))
    monkeypatch.setattr(grade.os, "cpu_count", lambda: 4)
    grade.grade_all(["a.ipynb", "b.ipynb"], jobs=2)
    assert seen == [2, 2]
    seen.clear()
    grade.grade_all(["a.ipynb", "b.ipynb"], jobs=1)
    assert seen == [None, None]
    env = judge.kernel_environment(Path(os.environ.get("TMPDIR", "/tmp")), threads=3)
    assert env["OMP_NUM_THREADS"] == "3" and env["HF_HUB_OFFLINE"] == "1"


@needs_sandbox
def test_wrong_chapter_and_old_nbformat(tmp_path, course):
    """A notebook of another chapter is named as such; an nbformat-3 notebook is converted and graded."""
    solution = course[0]
    [wrong] = grade.grade_all([solution], checks_module=CHECKS, expected_chapter="01")
    assert wrong.points == 0 and "this is the notebook of chapter 99, but chapter 01 was asked for" in \
        wrong.rows[0].message
    old = tmp_path / "old" / "99_demo.ipynb"
    old.parent.mkdir()
    old.write_text(nbformat.writes(nbformat.convert(read(solution), 3)), encoding="utf-8")
    assert '"nbformat": 3' in old.read_text()
    [graded_old] = grade.grade_all([old], timeout=GENEROUS, checks_module=CHECKS, expected_chapter="99")
    assert (graded_old.points, graded_old.max_points) == (FULL, FULL), graded_old.rows
    result = subprocess.run([sys.executable, "-m", "utils.grade", str(old), "--chapter", "1"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--chapter takes two digits" in result.stderr


def test_clean_and_spreadsheet_safe():
    assert grade.clean("a\x1b[31mb\x1b]0;title\x07c\u202ed\x00e\nf") == "abc d e f"
    assert grade.clean("x" * 1000, cap=10) == "x" * 9 + "…"
    assert [grade.spreadsheet_safe(v) for v in ["=1+1", "+1", "-1", "@SUM(A1)", "ok", 3]] == [
        "'=1+1", "'+1", "'-1", "'@SUM(A1)", "ok", 3]
