"""The pytest plugin that tests the solution notebooks: each one is executed once per run, and that one run
serves both the comparison of outputs and the grade.

For solutions/NN_name.ipynb it collects one item per code cell and one `grade` item. The first item to run
executes the whole notebook in the grader's own kernel machinery (a sandboxed kernel when bubblewrap is
available, as the grader uses; utils/course/judge.py) on a scratch copy; then, with the kernel still alive, it
grades the notebook's answers with the real grader (hidden cases on), exactly as a learner's notebook is graded.
Each cell item compares that cell's fresh text outputs with the stored ones:

- stdout, the text/plain form of results and displays, and errors are compared; stderr and rich outputs (HTML,
  plotly, widgets) are not;
- a cell tagged `nbval-ignore-output` is run but not compared (plots, widgets, progress bars);
- a cell tagged `approx-numbers` compares its numbers within 10 % or 2 units of the last printed digit, the
  rest of its text exactly (numbers from training inside the notebook, whose last digit depends on the CPU);
- a cell tagged `chaotic-numbers` compares its text with every number masked (outcomes of short training runs
  whose timing itself changes between CPUs, such as the epoch at which a run groks: the prose says so, and the
  cell prints the property that held on every machine, which is compared as text);
- before comparing, the patterns in tests/nbval_sanitize.cfg are replaced (memory addresses, tqdm bars).

The `grade` item fails unless every exercise of the chapter passes. The run's time and peak memory per notebook
are printed at the end of the session and written to test-artifacts/notebooks.json.
"""

from __future__ import annotations

import configparser
import copy
import difflib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from utils.course import sandbox
from utils.course.notebooks import ROOT, read, tags

CELL_TIMEOUT = 600
MEMORY_LIMIT = 8 * 2**30  # a hard stop; the budget (4 GB) is reported, not enforced here
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_measurements: dict[str, dict] = {}


def _sanitizers() -> list[tuple[re.Pattern, str]]:
    if not SANITIZE.is_file():
        return []
    parser = configparser.ConfigParser(interpolation=None)  # the patterns contain % signs
    parser.read(SANITIZE, encoding="utf-8")
    return [(re.compile(parser[section]["regex"]), parser[section]["replace"]) for section in parser.sections()]


def output_text(cell) -> str:
    """The text of a code cell's outputs that the tests compare."""
    parts = []
    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "stream" and output.get("name") == "stdout":
            parts.append(output.get("text", ""))
        elif kind in ("execute_result", "display_data") and "text/plain" in output.get("data", {}):
            text = output["data"]["text/plain"]
            parts.append(("".join(text) if isinstance(text, list) else text) + "\n")
        elif kind == "error":
            parts.append(f"{output.get('ename')}: {output.get('evalue')}\n")
    return "".join(parts)


def sanitize(text: str, patterns) -> str:
    for pattern, replacement in patterns:
        text = pattern.sub(replacement, text)
    return text


def same_but_numbers(stored: str, fresh: str) -> bool:
    """Same text once every number is masked."""
    return NUMBER.sub("#", stored) == NUMBER.sub("#", fresh)


def numbers_close(stored: str, fresh: str) -> bool:
    """Same text once numbers are set aside, and each number within 10 % or 2 units of its last printed digit."""
    if not same_but_numbers(stored, fresh):
        return False
    for want, got in zip(NUMBER.findall(stored), NUMBER.findall(fresh)):
        decimals = len(want.split(".")[1].split("e")[0].split("E")[0]) if "." in want else 0
        want_value, got_value = float(want), float(got)
        if abs(want_value - got_value) > max(0.1 * abs(want_value), 2 * 10.0 ** -decimals) + 1e-12:
            return False
    return True


class SolutionNotebook(pytest.File):
    def collect(self):
        nb = read(self.path)
        self.stored = nb
        self.run = None
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                yield CellItem.from_parent(self, name=f"cell {index + 1}", index=index)
        yield GradeItem.from_parent(self, name="grade")

    def execute(self):
        """Run the notebook once (the first item that needs it triggers this) and grade it; cache the results."""
        if self.run is not None:
            return self.run
        from utils.course import judge

        chapter = self.path.name[:2]
        exercises = judge.chapter_exercises(chapter) if (ROOT / "utils" / "checks" / f"ch{chapter}.py").exists() else []
        fresh = copy.deepcopy(self.stored)
        for cell in fresh.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        scratch = Path(tempfile.mkdtemp(prefix="wbt-"))
        work = scratch / "notebook"
        work.mkdir()
        shutil.copyfile(self.path, work / self.path.name)
        started = time.monotonic()
        threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None
        results, error, peak, cpu = {}, None, 0, 0.0
        try:
            with judge.executed(fresh, work, scratch, CELL_TIMEOUT, MEMORY_LIMIT, threads, sandbox.available()) as run:
                seconds, cpu = time.monotonic() - started, run.kernel.cpu_seconds()
                peak = run.kernel.watchdog.peak if run.kernel.watchdog else 0
                if exercises:
                    session = judge.KernelSession(run.kernel, scratch / "rpc")
                    results = judge.grade_answers(session, exercises, judge.DEFAULT_TIMEOUT)
        except Exception as failure:  # noqa: BLE001 - reported by every item of this notebook
            error, seconds = f"{type(failure).__name__}: {failure}", time.monotonic() - started
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _measurements[self.path.name] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                                         "peak_gib": round(peak / 2**30, 2),
                                         "grading_seconds": round(time.monotonic() - started - seconds, 1),
                                         "sandboxed": sandbox.available()}
        self.run = {"fresh": fresh, "results": results, "error": error, "exercises": exercises}
        return self.run


class CellItem(pytest.Item):
    def __init__(self, *, index: int, **kwargs):
        super().__init__(**kwargs)
        self.index = index
        self.add_marker(pytest.mark.slow)

    def runtest(self):
        run = self.parent.execute()
        if run["error"]:
            raise NotebookFailure(f"the notebook could not be run: {run['error']}")
        stored_cell, fresh_cell = self.parent.stored.cells[self.index], run["fresh"].cells[self.index]
        errors = [o for o in fresh_cell.outputs if o.get("output_type") == "error"]
        if errors and not any(o.get("output_type") == "error" for o in stored_cell.outputs):
            raise NotebookFailure(f"the cell raised {errors[0].get('ename')}: {errors[0].get('evalue')}")
        if "nbval-ignore-output" in tags(stored_cell):
            return
        patterns = _sanitizers()
        want, got = sanitize(output_text(stored_cell), patterns), sanitize(output_text(fresh_cell), patterns)
        cell_tags = tags(stored_cell)
        if want == got or ("approx-numbers" in cell_tags and numbers_close(want, got)) or \
                ("chaotic-numbers" in cell_tags and same_but_numbers(want, got)):
            return
        diff = "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), "stored", "this run", lineterm=""))
        raise NotebookFailure(f"the output differs from the stored one:\n{diff[:4000]}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, NotebookFailure):
            source = self.parent.stored.cells[self.index].source
            return f"{self.path.name}, {self.name}:\n{source[:600]}\n---\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.name}"


class GradeItem(pytest.Item):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_marker(pytest.mark.slow)

    def runtest(self):
        run = self.parent.execute()
        if run["error"]:
            raise NotebookFailure(f"the notebook could not be run: {run['error']}")
        failures = [f"Exercise {exercise.number} ({exercise.key}): {run['results'].get(exercise.key, (False, 'no result'))[1]}"
                    for exercise in run["exercises"] if not run["results"].get(exercise.key, (False,))[0]]
        if failures:
            raise NotebookFailure("the grader does not give the solution full marks:\n" + "\n".join(failures))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, NotebookFailure):
            return f"{self.path.name}: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::grade"


class NotebookFailure(AssertionError):
    pass


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".ipynb" and file_path.parent.name == "solutions" and re.match(r"\d\d_", file_path.name):
        return SolutionNotebook.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter):
    if not _measurements:
        return
    terminalreporter.section("solution notebooks (executed once each: outputs compared, then graded)")
    for name, measured in sorted(_measurements.items()):
        terminalreporter.write_line(f"{name}: {measured['seconds']:.0f} s to run ({measured['cpu_seconds']:.0f} CPU-s), "
                                    f"{measured['grading_seconds']:.0f} s to grade, peak memory "
                                    f"{measured['peak_gib']:.2f} GiB")
    folder = Path(os.environ.get("WORKBOOK_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notebooks.json").write_text(json.dumps(_measurements, indent=1, sort_keys=True) + "\n")
