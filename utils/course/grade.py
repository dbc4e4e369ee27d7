"""Grade learners' notebooks: run each in a fresh kernel, then run the chapter's checks (with hidden cases) on
the answers the notebook left in that kernel.

    python -m utils.grade NOTEBOOK... [--json FILE] [--csv FILE] [--html FILE] [--timeout SECONDS] [--jobs N]
                                     [--chapter NN] [--memory-gb GB]

How a grade is made, and why it is hard to fake:
  - the submission is copied into a fresh scratch folder and executed there (cwd = that folder), so nothing is
    written next to it; a cell that raises or runs past --timeout is interrupted and the rest still run;
  - then the grader appends its own cell. It drops every `utils*` module from `sys.modules` (a learner's
    monkeypatching of the checks is discarded), imports the chapter's checks afresh, runs every check with
    hidden=True on the object named `exercise.key` in the notebook's globals, and prints one line: a random
    nonce made for this run + the results as JSON. Only that cell's output is read, and only that line, so text
    the notebook printed ("✅ Exercise 1.2 ... passed") earns nothing.
Exit status: 0 once every notebook is graded (failed exercises included), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import html
import importlib
import json
import os
import re
import secrets
import signal
import shutil
import sys
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import nbformat

from utils.course.notebooks import ROOT, CellRun, DeadKernelError, Kernel, kernel_env, read

DEFAULT_TIMEOUT = 300  # seconds per cell, and per check
DEFAULT_MEMORY_GB = 8.0  # per kernel; every solution notebook stays under 4 GB
MAX_KERNEL_RESTARTS = 3  # cells that kill the kernel, skipped one by one before the grader gives up
COLUMNS = ["notebook", "chapter", "exercise", "key", "passed", "points", "max_points", "message"]


@dataclass
class Row:
    notebook: str
    chapter: str
    exercise: str  # its number, "1.2"; "" on a row about the whole notebook
    key: str
    passed: bool
    points: int
    max_points: int
    message: str


@dataclass
class NotebookGrade:
    notebook: str
    chapter: str
    rows: list[Row]
    failed_cells: list[CellRun] = field(default_factory=list)  # cells that raised or timed out

    @property
    def points(self) -> int:
        return sum(row.points for row in self.rows)

    @property
    def max_points(self) -> int:
        return sum(row.max_points for row in self.rows)


# The grader's own last cell. It runs in the learner's kernel, so it imports what it needs inside a function
# (the notebook may have rebound `json` or `sys`) and leaves no names behind.
GRADING_CELL = '''\
def _workbook_grade(nonce, chapter, module, timeout, namespace):
    import importlib, json, signal, sys

    class CheckTimedOut(BaseException):  # not an Exception: run_check must not swallow it
        pass

    def on_alarm(signum, frame):
        raise CheckTimedOut()

    results, report = [], {}
    try:
        for name in [n for n in list(sys.modules) if n == "utils" or n.startswith("utils.") or n == module]:
            del sys.modules[name]
        importlib.import_module(module)
        checking = importlib.import_module("utils.course.checking")
        if module == "utils.checks.ch" + chapter:
            exercises = importlib.import_module("utils.checks").chapter_exercises(chapter)
        else:
            exercises = checking.REGISTRY.get(chapter, {})
        for key, exercise in exercises.items():
            if key not in namespace:
                results.append({"key": key, "passed": False, "message": f"`{key}` is not defined in your "
                                f"notebook: did you rename it or skip its cell?"})
                continue
            alarm = hasattr(signal, "SIGALRM")
            try:
                if alarm:
                    previous = signal.signal(signal.SIGALRM, on_alarm)
                    signal.setitimer(signal.ITIMER_REAL, timeout)
            except ValueError:  # not the main thread: no per-check time limit
                alarm = False
            try:
                result = checking.run_check(exercise, namespace[key], hidden=True)
                results.append({"key": key, "passed": bool(result.passed), "message": str(result.message)})
            except CheckTimedOut:
                results.append({"key": key, "passed": False, "message": f"the check ran past {timeout} s "
                                f"(does your code loop forever?)"})
            finally:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, previous)
    except BaseException as error:
        report["error"] = f"{type(error).__name__}: {error}"
    report["results"] = results
    print(nonce, json.dumps(report), flush=True)
'''


def notebook_chapter(nb: nbformat.NotebookNode, path: Path) -> str | None:
    """"NN" from the metadata `workbook.chapter`, else from the file name's `NN_` prefix."""
    chapter = str(nb.get("metadata", {}).get("workbook", {}).get("chapter", ""))
    if re.fullmatch(r"\d\d", chapter):
        return chapter
    prefix = re.match(r"(\d\d)_", path.name)
    return prefix.group(1) if prefix else None


def chapter_exercises(chapter: str, checks_module: str | None = None) -> list:
    """The Exercise objects of a chapter, in order, from its check module (or from `checks_module`)."""
    from utils.course.checking import REGISTRY
    importlib.import_module(checks_module or f"utils.checks.ch{chapter}")
    return list(REGISTRY.get(chapter, {}).values())


def _notebook_row(label: str, chapter: str, message: str, max_points: int = 0) -> Row:
    return Row(label, chapter, "", "", False, 0, max_points, message)


def grade_notebook(path: str | Path, timeout: int = DEFAULT_TIMEOUT, checks_module: str | None = None,
                   threads: int | None = None, expected_chapter: str | None = None,
                   memory_gb: float = DEFAULT_MEMORY_GB) -> NotebookGrade:
    """Grade one notebook; never raises for a problem with the notebook (that becomes a row).

    checks_module: the module that registers the chapter's checks (default `utils.checks.chNN`); tests pass a
    fixture module instead. threads: CPU threads for the kernel's torch (default: torch's own choice).
    expected_chapter: "NN"; a notebook of another chapter is not run, and its row says so.
    memory_gb: a cell whose kernel grows past this is killed and skipped; the rest of the notebook is graded.
    """
    label, path = str(path), Path(path)
    try:
        nb = read(path)
    except Exception as error:
        reason = "it is not valid JSON" if isinstance(error, json.JSONDecodeError) or "JSON" in str(error) \
            else f"{type(error).__name__}: {error}"
        return NotebookGrade(label, "", [_notebook_row(label, "", f"not graded: cannot read the notebook ({reason})."
                                                       " Was the file saved completely?")])
    chapter = notebook_chapter(nb, path)
    if chapter is None:
        return NotebookGrade(label, "", [_notebook_row(
            label, "", "not graded: cannot tell which chapter this is (no `workbook.chapter` in the notebook "
                       "metadata and the file name does not start with `NN_`).")])
    if expected_chapter is not None and chapter != expected_chapter:
        return NotebookGrade(label, chapter, [_notebook_row(
            label, chapter, f"not graded: this is the notebook of chapter {chapter}, but chapter {expected_chapter} "
                            f"was asked for (--chapter {expected_chapter}). Was the wrong file handed in?")])
    module = checks_module or f"utils.checks.ch{chapter}"
    try:
        exercises = chapter_exercises(chapter, checks_module)
    except ModuleNotFoundError as error:
        return NotebookGrade(label, chapter, [_notebook_row(
            label, chapter, f"not graded: no checks for chapter {chapter} ({error}).")])
    except Exception as error:  # a bug in the check module: say so for every notebook, don't crash the batch
        return NotebookGrade(label, chapter, [_notebook_row(
            label, chapter, f"not graded: {module} failed to import ({type(error).__name__}: {error}).")])
    if not exercises:
        return NotebookGrade(label, chapter, [_notebook_row(
            label, chapter, f"not graded: {module} registers no exercises for chapter {chapter}.")])

    with tempfile.TemporaryDirectory(prefix="workbook-grade-") as scratch:
        work = Path(scratch) / "notebook"
        work.mkdir()
        shutil.copyfile(path, work / path.name)
        failed, results, problem = _run(nb, work, Path(scratch) / "ipython", chapter, module, timeout, len(exercises),
                                       threads, int(memory_gb * 2**30))

    rows = []
    died = " ".join(f"Cell {run.index + 1} {run.evalue} and was skipped." for run in failed if run.status == "died")
    for exercise in exercises:
        passed, message = results.get(exercise.key, (False, problem or "no result from the checks"))
        if not passed and "is not defined in your notebook" in message:
            message = _why_undefined(nb, exercise.key, failed) or message
        if died and not passed:
            message = f"{message} ({died})"
        rows.append(Row(label, chapter, exercise.number, exercise.key, passed, exercise.points if passed else 0,
                        exercise.points, message))
    return NotebookGrade(label, chapter, rows, failed)


def _why_undefined(nb, name: str, failed: list[CellRun]) -> str | None:
    """When an answer is missing because the cell defining it failed (e.g. it was moved above the imports it
    needs), say which cell and what it raised, instead of suggesting it was renamed."""
    defines = re.compile(rf"^(def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*(:[^=]*)?=[^=]", re.M)
    for run in failed:
        cell = nb.cells[run.index]
        if cell.cell_type == "code" and defines.search(cell.source):
            what = {"timeout": "ran past the time limit", "died": f"{run.evalue} and was skipped"}.get(
                run.status, f"raised {run.ename}: {run.evalue}")
            return (f"`{name}` is not defined: cell {run.index + 1}, which defines it, {what}. Run your notebook "
                    f"top to bottom (Restart Kernel and Run All) and fix the first error.")
    return None


class MemoryWatchdog:
    """Kills the kernel (process `pid`) once its resident memory passes `limit` bytes; polls from a thread."""

    def __init__(self, pid: int | None, limit: int | None, every: float = 0.1):
        self.pid, self.limit, self.every = pid, limit, every
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "MemoryWatchdog":
        if self.pid and self.limit:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self._stop.wait(self.every):
            try:
                kib = int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1))
            except (OSError, AttributeError, ValueError):  # no /proc (not Linux) or the kernel has gone
                return
            if kib * 1024 > self.limit:
                self.fired = True
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                return


def _run(nb, work: Path, ipython_dir: Path, chapter: str, module: str, timeout: int, n_checks: int,
         threads: int | None = None, memory_limit: int | None = None):
    """Execute the notebook, then the grading cell. Returns (failed cells, {key: (passed, message)}, problem).

    A cell that kills the kernel (it used more than `memory_limit` bytes, or crashed the process) is recorded,
    and the notebook is run again in a fresh kernel without it, so the other exercises are still graded.
    """
    env = kernel_env(WORKBOOK_ROOT=str(ROOT), IPYTHONDIR=str(ipython_dir))  # no learner startup files, no history
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch reads it at import
    failed: list[CellRun] = []
    skipped: set[int] = set()
    for _ in range(MAX_KERNEL_RESTARTS + 1):
        kernel = Kernel(nb, cwd=work, timeout=timeout, allow_errors=True, env=env)
        index, watchdog = -1, None
        failed = [run for run in failed if run.status == "died"]  # a rerun records the others afresh
        try:
            with kernel.started(), MemoryWatchdog(kernel.pid, memory_limit) as watchdog:
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code" or index in skipped:
                        continue
                    run = kernel.run_cell(index)
                    if run.status != "ok":
                        failed.append(run)
                    if run.status == "timeout" and not kernel.responsive():
                        return failed, {}, (f"not graded: cell {index + 1} ran past {timeout} s and the kernel did "
                                            f"not respond to the interrupt")
                nonce = secrets.token_hex(16)
                call = (f"\n_workbook_grade({nonce!r}, {chapter!r}, {module!r}, {timeout!r}, globals())\n"
                        f"del _workbook_grade")
                index = len(nb.cells)
                # each check has its own alarm inside; this limit is only for a kernel that stops responding
                run, grading = kernel.run_extra(GRADING_CELL + call, timeout * (n_checks + 1) + 60)
        except DeadKernelError:
            why = (f"used more than {memory_limit / 2**30:.1f} GiB of memory" if watchdog and watchdog.fired
                   else "crashed the kernel")
            if index >= len(nb.cells):
                return failed, {}, f"not graded: the checks {why}"
            failed.append(CellRun(index, "died", "KernelDied", why))
            skipped.add(index)
            continue
        except Exception as error:  # e.g. the kernel would not start
            return failed, {}, f"not graded: the grader could not run the notebook ({type(error).__name__}: {error})"
        if run.status == "timeout":
            return failed, {}, "not graded: the checks stopped responding"
        return sorted(failed, key=lambda run: run.index), *_parse(grading, nonce)
    return failed, {}, f"not graded: the kernel died {MAX_KERNEL_RESTARTS + 1} times"


def _parse(grading_cell, nonce: str):
    text = "".join(output.get("text", "") for output in grading_cell.outputs
                   if output.output_type == "stream" and output.name == "stdout")
    lines = [line[len(nonce) + 1:] for line in text.splitlines() if line.startswith(nonce + " ")]
    if len(lines) != 1:
        why = "no result line" if not lines else "more than one result line (tampering?)"
        return {}, f"not graded: the checks printed {why}"
    try:
        report = json.loads(lines[0])
        results = {item["key"]: (item["passed"] is True, str(item["message"])) for item in report["results"]}
    except (ValueError, KeyError, TypeError) as error:
        return {}, f"not graded: unreadable result line ({error})"
    problem = f"not graded: the checks crashed ({report['error']})" if report.get("error") else None
    return results, problem


def grade_all(paths: list[str | Path], timeout: int = DEFAULT_TIMEOUT, jobs: int = 1,
              checks_module: str | None = None, expected_chapter: str | None = None,
              memory_gb: float = DEFAULT_MEMORY_GB) -> list[NotebookGrade]:
    """Grade notebooks, `jobs` at a time, in input order. The work is in the kernels (one process each), so a
    thread per notebook is enough to drive them, and needs no `if __name__ == "__main__"` guard in the caller."""
    if jobs <= 1 or len(paths) <= 1:
        return [grade_notebook(path, timeout, checks_module, None, expected_chapter, memory_gb) for path in paths]
    # Kernels that together ask for more threads than there are cores slow each other down several times over
    # (their thread pools spin waiting for each other), so each kernel gets its share of the cores.
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(grade_notebook, paths, repeat(timeout), repeat(checks_module), repeat(threads),
                             repeat(expected_chapter), repeat(memory_gb)))


def rows(grades: list[NotebookGrade]) -> list[dict]:
    """Every row as a dict with the columns in COLUMNS, for JSON and CSV."""
    return [dataclasses.asdict(row) for grade in grades for row in grade.rows]


def csv_rows(grades: list[NotebookGrade]) -> list[dict]:
    """Each notebook's rows followed by its total: a row with exercise "total" and the points summed."""
    out = []
    for grade_ in grades:
        out += rows([grade_])
        out.append({"notebook": grade_.notebook, "chapter": grade_.chapter, "exercise": "total", "key": "",
                    "passed": grade_.max_points > 0 and grade_.points == grade_.max_points,
                    "points": grade_.points, "max_points": grade_.max_points,
                    "message": f"{grade_.points}/{grade_.max_points} points"})
    return out


def _short(message: str, width: int = 90) -> str:
    message = " ".join(message.split())
    return message if len(message) <= width else message[:width - 1] + "…"


def format_table(grade: NotebookGrade) -> str:
    head = f"{grade.notebook}" + (f"  (chapter {grade.chapter})" if grade.chapter else "")
    table = [("exercise", "key", "pass", "points", "message")]
    table += [(row.exercise, row.key, "✓" if row.passed else "✗", f"{row.points}/{row.max_points}",
               _short(row.message)) for row in grade.rows]
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    lines = [head] + ["  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[4]
                      for line in table]
    raised = [str(run.index + 1) for run in grade.failed_cells if run.status == "error"]
    timed_out = [str(run.index + 1) for run in grade.failed_cells if run.status == "timeout"]
    killed = [str(run.index + 1) for run in grade.failed_cells if run.status == "died"]
    if raised or timed_out or killed:
        lines.append("  cells that " + " · ".join(filter(None, [
            raised and f"raised an error: {', '.join(raised)}", timed_out and f"timed out: {', '.join(timed_out)}",
            killed and f"killed the kernel (skipped): {', '.join(killed)}"])))
    lines.append(f"  total: {grade.points}/{grade.max_points}")
    return "\n".join(lines)


def class_summary(grades: list[NotebookGrade]) -> list[dict]:
    """Per exercise, in chapter order: how many notebooks passed it and its most common failure message."""
    summary: dict[tuple[str, str, str], dict] = {}
    for grade_ in grades:
        for row in grade_.rows:
            if not row.key:  # a row about a notebook that could not be graded at all
                continue
            entry = summary.setdefault((row.chapter, row.exercise, row.key), {
                "chapter": row.chapter, "exercise": row.exercise, "key": row.key, "passed": 0, "graded": 0,
                "failures": Counter()})
            entry["graded"] += 1
            entry["passed"] += row.passed
            if not row.passed:
                entry["failures"][row.message] += 1
    out = []
    for entry in summary.values():
        failures = entry.pop("failures")
        message, count = failures.most_common(1)[0] if failures else ("", 0)
        out.append({**entry, "most_common_failure": message, "most_common_failure_count": count})
    return out


def html_report(grades: list[NotebookGrade]) -> str:
    """A self-contained page: the class summary (hardest exercises first), then each learner's results."""
    def cell(text) -> str:
        return f"<td>{html.escape(str(text))}</td>"

    summary = sorted(class_summary(grades), key=lambda entry: (entry["passed"] / entry["graded"], entry["chapter"],
                                                               entry["exercise"]))
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Workbook grades</title><style>"
             "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin-bottom:2em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             ".pass{background:#e6f4e6} .fail{background:#fbe9e9}</style></head><body>",
             f"<h1>Grades: {len(grades)} notebook{'s' if len(grades) != 1 else ''}</h1>",
             "<h2>Class summary (hardest first)</h2><table><tr><th>chapter</th><th>exercise</th><th>key</th>"
             "<th>passed</th><th>most common failure</th></tr>"]
    for entry in summary:
        failure = (f"{entry['most_common_failure']} ({entry['most_common_failure_count']}×)"
                   if entry["most_common_failure_count"] else "")
        parts.append("<tr>" + cell(entry["chapter"]) + cell(entry["exercise"]) + cell(entry["key"])
                     + cell(f"{entry['passed']}/{entry['graded']}") + cell(failure) + "</tr>")
    parts.append("</table><h2>Learners</h2>")
    for grade_ in grades:
        parts.append(f"<h3>{html.escape(grade_.notebook)}: {grade_.points}/{grade_.max_points} points</h3>"
                     "<table><tr><th>exercise</th><th>key</th><th>status</th><th>points</th><th>message</th></tr>")
        for row in grade_.rows:
            status = "passed" if row.passed else "failed"
            parts.append(f"<tr class='{'pass' if row.passed else 'fail'}'>" + cell(row.exercise) + cell(row.key)
                         + cell(status) + cell(f"{row.points}/{row.max_points}") + cell(row.message) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write every row as a JSON list")
    parser.add_argument("--csv", metavar="FILE", type=Path,
                        help="write every row as CSV, with a total row (exercise 'total') after each notebook")
    parser.add_argument("--html", metavar="FILE", type=Path,
                        help="write a report: class summary (hardest exercises first), then each learner's results")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"per cell and per check (default {DEFAULT_TIMEOUT})")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="notebooks graded in parallel")
    parser.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_GB, metavar="GB",
                        help=f"per notebook: a cell that grows the kernel past this is killed and skipped, and the "
                             f"rest is graded (default {DEFAULT_MEMORY_GB:g})")
    parser.add_argument("--chapter", metavar="NN", help="the chapter being graded: a notebook of another chapter "
                                                       "gets a row saying so instead of a grade")
    parser.add_argument("--checks-module", help=argparse.SUPPRESS)  # tests: a fixture module instead of chNN
    args = parser.parse_args(argv)
    for notebook in args.notebooks:
        if not Path(notebook).is_file():
            parser.error(f"no such notebook: {notebook}")
    if args.timeout < 1 or args.jobs < 1 or args.memory_gb <= 0:
        parser.error("--timeout and --jobs must be at least 1, and --memory-gb positive")
    if args.chapter is not None and not re.fullmatch(r"\d\d", args.chapter):
        parser.error(f"--chapter takes two digits, e.g. --chapter 01 (got {args.chapter!r})")

    grades = grade_all(args.notebooks, args.timeout, args.jobs, args.checks_module, args.chapter, args.memory_gb)
    for grade in grades:
        print(format_table(grade), end="\n\n")
    if len(grades) > 1:
        print(f"{len(grades)} notebooks: {sum(g.points for g in grades)}/{sum(g.max_points for g in grades)} points")
    if args.json:
        args.json.write_text(json.dumps(rows(grades), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.csv:
        with args.csv.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(csv_rows(grades))
    if args.html:
        args.html.write_text(html_report(grades), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
