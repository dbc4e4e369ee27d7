"""How much the learner writes: exercises and reference-solution lines per chapter, counted from the notebooks.

    python -m utils.course.stats            # a markdown table for BENCHMARKS.md
    python -m utils.course.stats --check    # exit 1 if a chapter built to the standard falls short of it

A solution line is a line between `# BEGIN SOLUTION` and `# END SOLUTION` that is not blank, not a comment and
not part of a docstring. The standard (AUTHORING.md): at least 8 exercises per chapter on average, and at least 3
exercises per chapter whose reference solution is 10 or more such lines.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

from utils.course.build import EXERCISE_HEADING, HEADING, MARKER
from utils.course.notebooks import ROOT, read

MIN_AVERAGE_EXERCISES = 8
LONG_SOLUTION_LINES = 10
MIN_LONG_SOLUTIONS = 3


@dataclass
class ChapterStats:
    chapter: str
    name: str
    lines: dict[str, int]  # exercise number -> reference solution lines

    @property
    def exercises(self) -> int:
        return len(self.lines)

    @property
    def long_solutions(self) -> int:
        return sum(n >= LONG_SOLUTION_LINES for n in self.lines.values())


def _code_lines(block: str) -> int:
    """Lines of real logic in a block of Python: no blank lines, comments or docstrings."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(block)).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return sum(1 for line in block.splitlines() if line.strip() and not line.strip().startswith("#"))
    layout = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    docstrings: set[int] = set()
    previous = None
    for token in tokens:  # a string that is a statement on its own is a docstring
        if token.type == tokenize.STRING and (previous is None or previous.type in layout):
            docstrings.update(range(token.start[0], token.end[0] + 1))
        if token.type != tokenize.COMMENT:
            previous = token
    return len({token.start[0] for token in tokens if token.type not in layout} - docstrings)


def solution_blocks(source: str) -> list[str]:
    blocks, current = [], None
    for line in source.split("\n"):
        marker = MARKER.match(line)
        if marker and marker.group(2) == "BEGIN":
            current = []
        elif marker and current is not None:
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def chapter_stats(path: Path) -> ChapterStats:
    nb = read(path)
    lines: dict[str, int] = {}
    number = None
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.split("\n"):
                if HEADING.match(line):
                    match = EXERCISE_HEADING.match(line)
                    number = match.group(1) if match else None
        elif number is not None:
            blocks = solution_blocks(cell.source)
            if blocks:
                lines[number] = lines.get(number, 0) + sum(_code_lines(block) for block in blocks)
    return ChapterStats(path.name[:2], path.stem, lines)


def course_stats(root: Path = ROOT) -> list[ChapterStats]:
    return [chapter_stats(path) for path in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb"))]


def markdown(stats: list[ChapterStats]) -> str:
    rows = ["| chapter | exercises | reference lines | median per exercise | exercises with ≥ 10 lines |",
            "|---|---|---|---|---|"]
    for chapter in stats:
        values = list(chapter.lines.values()) or [0]
        rows.append(f"| {chapter.name} | {chapter.exercises} | {sum(values)} | {statistics.median(values):g} | "
                    f"{chapter.long_solutions} |")
    if stats:
        rows.append(f"| **all** | {sum(c.exercises for c in stats)} ({sum(c.exercises for c in stats) / len(stats):.1f} "
                    f"per chapter) | {sum(sum(c.lines.values()) for c in stats)} | "
                    f"{statistics.median([n for c in stats for n in c.lines.values()] or [0]):g} | "
                    f"{sum(c.long_solutions for c in stats)} |")
    return "\n".join(rows)


def shortfalls(stats: list[ChapterStats], exempt: set[str] = frozenset()) -> list[str]:
    """What falls short of the standard, among the chapters not in `exempt`."""
    judged = [c for c in stats if c.chapter not in exempt]
    problems = [f"{c.name}: {c.long_solutions} exercises with ≥ {LONG_SOLUTION_LINES} solution lines "
                f"(the standard asks for {MIN_LONG_SOLUTIONS})" for c in judged if c.long_solutions < MIN_LONG_SOLUTIONS]
    if judged and sum(c.exercises for c in judged) / len(judged) < MIN_AVERAGE_EXERCISES:
        problems.append(f"{sum(c.exercises for c in judged) / len(judged):.1f} exercises per chapter on average "
                        f"(the standard asks for {MIN_AVERAGE_EXERCISES})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.course.stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a chapter falls short of the standard")
    args = parser.parse_args(argv)
    stats = course_stats()
    print(markdown(stats))
    if args.check:
        problems = shortfalls(stats)
        for problem in problems:
            print(f"short of the standard: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
