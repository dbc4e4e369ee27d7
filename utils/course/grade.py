"""Grade learners' notebooks: each one runs in its own sandboxed kernel, and is graded by a fresh judge process.

    python -m utils.grade NOTEBOOK... [--json FILE] [--csv FILE] [--html FILE] [--timeout SECONDS] [--jobs N]
                                     [--chapter NN] [--memory-gb GB] [--no-sandbox]

For every notebook this starts `python -m utils.course.judge` (utils/course/judge.py), a process of its own that
never runs learner code: it copies the notebook into a scratch folder, runs it in a kernel inside a bubblewrap
sandbox (read-only course, venv and model cache; no network; its own process namespace; memory and time
limits), then runs the chapter's checks with hidden cases *in the judge*, calling the learner's functions in the
kernel with plain data in and plain data out. The verdicts and messages are made in the judge, so nothing the
notebook does in its kernel can give it credit it did not earn, and nothing it does can touch another notebook,
the course, or this process. Every string that came from a notebook is cleaned before it reaches the terminal,
the CSV or the HTML report.
Exit status: 0 once every notebook is graded (failed exercises included), 2 on bad usage or when no sandbox can
be made (then --no-sandbox grades without one, for notebooks you trust).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import html
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from utils.course import sandbox
from utils.course.judge import (DEFAULT_MEMORY_GB, DEFAULT_TIMEOUT, MESSAGE_CAP, CellRun, NotebookGrade, Row,
                                notebook_chapter)
from utils.course.notebooks import ROOT, read

COLUMNS = ["notebook", "chapter", "exercise", "key", "passed", "points", "max_points", "message"]
JUDGE_SLACK = 120  # seconds a judge may take beyond its notebook's cells and checks (imports, model load)

# ---------------------------------------------------------------------------------------------------------
# Strings from notebooks are untrusted: what a report may show of them.
# ---------------------------------------------------------------------------------------------------------

_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)?|\x1b[@-_]")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text, cap: int = MESSAGE_CAP) -> str:
    """One line of printable text: no terminal escapes, control or direction-override characters, at most `cap`
    characters."""
    text = _CONTROLS.sub(" ", _ESCAPES.sub("", str(text)))
    text = " ".join(text.split())
    return text if len(text) <= cap else text[:cap - 1] + "…"


def spreadsheet_safe(value):
    """A CSV cell a spreadsheet will not run as a formula (OWASP: prefix =, +, -, @, tab and CR with ')."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _cleaned(grade: NotebookGrade) -> NotebookGrade:
    rows = [dataclasses.replace(row, message=clean(row.message), key=clean(row.key, 80), exercise=clean(row.exercise, 20))
            for row in grade.rows]
    failed = [dataclasses.replace(run, ename=clean(run.ename, 80), evalue=clean(run.evalue, 200), status=clean(run.status, 10))
              for run in grade.failed_cells]
    return NotebookGrade(clean(grade.notebook, 300), clean(grade.chapter, 4), rows, failed)


# ---------------------------------------------------------------------------------------------------------
# Grading: one judge process per notebook.
# ---------------------------------------------------------------------------------------------------------


def _judge_time_limit(path: Path, timeout: int) -> int:
    try:
        cells = sum(cell.cell_type == "code" for cell in read(path).cells)
    except Exception:
        cells = 0
    return timeout * (cells + 20) + JUDGE_SLACK


def grade_notebook(path: str | Path, timeout: int = DEFAULT_TIMEOUT, checks_module: str | None = None,
                   threads: int | None = None, expected_chapter: str | None = None,
                   memory_gb: float = DEFAULT_MEMORY_GB, sandboxed: bool = True, hide: list[Path] = ()) -> NotebookGrade:
    """Grade one notebook in a fresh judge process; never raises for a problem with the notebook."""
    label = str(path)
    with tempfile.TemporaryDirectory(prefix="wbj-") as folder:
        result = Path(folder) / "grade.json"
        command = [sys.executable, "-m", "utils.course.judge", str(path), "--result", str(result), "--label", label,
                   "--timeout", str(timeout), "--memory-gb", str(memory_gb)]
        command += ["--chapter", expected_chapter] if expected_chapter else []
        command += ["--threads", str(threads)] if threads else []
        command += ["--checks-module", checks_module] if checks_module else []
        command += [] if sandboxed else ["--no-sandbox"]
        command += ["--hide", *map(str, hide)] if hide else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if threads:
            env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=_judge_time_limit(Path(path), timeout))
        except subprocess.TimeoutExpired:
            return NotebookGrade(label, "", [_whole_row(path, "not graded: the grader ran out of time on it")])
        if done.returncode != 0 or not result.is_file():
            tail = clean(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
            return NotebookGrade(label, "", [_whole_row(path, f"not graded: the grader failed on it ({tail})")])
        return _cleaned(NotebookGrade.from_json(json.loads(result.read_text(encoding="utf-8"))))


def _whole_row(path, message: str) -> Row:
    return Row(str(path), "", "", "", False, 0, 0, message)


def grade_all(paths: list[str | Path], timeout: int = DEFAULT_TIMEOUT, jobs: int = 1,
              checks_module: str | None = None, expected_chapter: str | None = None,
              memory_gb: float = DEFAULT_MEMORY_GB, sandboxed: bool = True, hide: list[Path] = ()) -> list[NotebookGrade]:
    """Grade notebooks, `jobs` at a time, in input order. Every notebook of the batch (and `hide`) is unreadable
    inside every sandbox, so no submission can read or copy another."""
    hide = [*map(Path, paths), *hide]
    # Kernels that together ask for more threads than there are cores slow each other down several times over
    # (their thread pools spin waiting for each other), so each kernel gets its share of the cores.
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 and len(paths) > 1 else None

    def one(path):
        return grade_notebook(path, timeout, checks_module, threads, expected_chapter, memory_gb, sandboxed, hide)

    if threads is None:
        return [one(path) for path in paths]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, paths))


# ---------------------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------------------


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
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run the notebooks without a sandbox (macOS, Windows; only for notebooks you trust)")
    parser.add_argument("--checks-module", help=argparse.SUPPRESS)  # tests: a fixture module instead of chNN
    args = parser.parse_args(argv)
    for notebook in args.notebooks:
        if not Path(notebook).is_file():
            parser.error(f"no such notebook: {notebook}")
    if args.timeout < 1 or args.jobs < 1 or args.memory_gb <= 0:
        parser.error("--timeout and --jobs must be at least 1, and --memory-gb positive")
    if args.chapter is not None and not re.fullmatch(r"\d\d", args.chapter):
        parser.error(f"--chapter takes two digits, e.g. --chapter 01 (got {args.chapter!r})")

    if not args.no_sandbox and not sandbox.available():
        print(f"error: {sandbox.unavailable_reason()}", file=sys.stderr)
        return 2
    if args.no_sandbox:
        print("warning: grading WITHOUT a sandbox (--no-sandbox): the notebooks' code runs with your permissions "
              "and can read and change your files. Use this only for notebooks you trust.", file=sys.stderr)
    reports = [path for path in (args.json, args.csv, args.html) if path is not None]
    grades = grade_all(args.notebooks, args.timeout, args.jobs, args.checks_module, args.chapter, args.memory_gb,
                       not args.no_sandbox, hide=reports)
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
            writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in csv_rows(grades))
    if args.html:
        args.html.write_text(html_report(grades), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
