"""What the test suite costs, part by part, and what it will cost at twenty chapters.

Loaded as a pytest plugin (conftest.py), it writes every test's duration (setup + call + teardown) to
test-artifacts/durations.json. Then

    python -m utils.course.suitecost            # a markdown table for BENCHMARKS.md
    python -m utils.course.suitecost --chapters 20

sorts the tests into three parts and projects:
- per chapter: everything that belongs to one chapter (its notebook's execution and grading, its check tests, the
  generic check tests, the structure and stub tests of that chapter), recognised by `chNN` in the file name,
  `solutions/NN_` or a test id that starts with `NN_` / `NN:`. The projection adds, for every chapter not yet
  written, the mean cost of the chapters that are.
- toolkit: unit tests of utils/ modules (they grow with the chapters that add modules): scaled by chapter count.
- machinery: the grader, the sandbox, the build, the browser test (fixed, whatever the number of chapters).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path

from utils.course.notebooks import ROOT

MACHINERY = {"test_grade.py", "test_grade_chapters.py", "test_remote.py", "test_build.py", "test_colab.py",
             "test_nbtest.py", "test_browser.py", "test_untouched_chapters.py::test_an_untouched"}
CHAPTER_IN_FILE = re.compile(r"(?:_ch(\d\d)\.py|solutions/(\d\d)_)")
CHAPTER_IN_ID = re.compile(r"\[(\d\d)[_:]")

_durations: dict[str, float] = defaultdict(float)


def _artifacts() -> Path:
    return Path(os.environ.get("WORKBOOK_ARTIFACTS", ROOT / "test-artifacts"))


# --- the pytest plugin -------------------------------------------------------------------------------------


def pytest_runtest_logreport(report) -> None:
    _durations[report.nodeid] += report.duration


def pytest_sessionfinish(session) -> None:
    if not _durations:
        return
    folder = _artifacts()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "durations.json"
    # Runs of parts of the suite add up: a test run again replaces its earlier duration.
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update({nodeid: round(seconds, 3) for nodeid, seconds in _durations.items()})
    path.write_text(json.dumps(merged, indent=0, sort_keys=True) + "\n")


# --- the report --------------------------------------------------------------------------------------------


def part_of(nodeid: str) -> tuple[str, str | None]:
    """("chapter", "NN") / ("toolkit", None) / ("machinery", None) for a test id."""
    file = nodeid.split("::", 1)[0]
    if any(nodeid.startswith(f"tests/{name}") for name in MACHINERY):
        return "machinery", None
    match = CHAPTER_IN_FILE.search(file) or CHAPTER_IN_ID.search(nodeid)
    if match:
        return "chapter", next(group for group in match.groups() if group)
    return "toolkit", None


def summarise(durations: dict[str, float], chapters: int = 20) -> str:
    per_chapter: dict[str, float] = defaultdict(float)
    notebook: dict[str, float] = defaultdict(float)
    toolkit = machinery = 0.0
    for nodeid, seconds in durations.items():
        part, chapter = part_of(nodeid)
        if part == "chapter":
            per_chapter[chapter] += seconds
            if nodeid.startswith("solutions/"):
                notebook[chapter] += seconds
        elif part == "toolkit":
            toolkit += seconds
        else:
            machinery += seconds
    if not per_chapter:
        raise SystemExit("no chapter tests in the durations file: run the whole suite first")
    written = len(per_chapter)
    mean = statistics.mean(per_chapter.values())
    projected = machinery + toolkit * chapters / written + sum(per_chapter.values()) + mean * (chapters - written)
    measured = machinery + toolkit + sum(per_chapter.values())
    lines = ["| part | measured | of which the notebook (execution + grading) |", "|---|---|---|"]
    for chapter in sorted(per_chapter):
        lines.append(f"| chapter {chapter} | {per_chapter[chapter]:.0f} s | {notebook[chapter]:.0f} s |")
    lines += [f"| toolkit unit tests (utils/) | {toolkit:.0f} s | |",
              f"| course machinery (grader, sandbox, build, browser) | {machinery:.0f} s | |",
              f"| **all ({written} chapters)** | **{measured / 60:.1f} min** | |",
              "",
              f"Projection to {chapters} chapters: machinery as measured, toolkit tests scaled by "
              f"{chapters}/{written}, and each chapter not yet written at the mean of those that are "
              f"({mean:.0f} s): **{projected / 60:.1f} min**."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapters", type=int, default=20)
    parser.add_argument("--durations", type=Path, default=_artifacts() / "durations.json")
    args = parser.parse_args()
    if not args.durations.exists():
        raise SystemExit(f"{args.durations} does not exist: run the test suite first (./workbook test)")
    print(summarise(json.loads(args.durations.read_text()), args.chapters))


if __name__ == "__main__":
    main()
