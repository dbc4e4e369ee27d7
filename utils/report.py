"""Tables a person reads: rendered as a table in Jupyter, and as stable pipe-separated text for the tests.

    replication_table([
        ("Predictions sharpen over depth", "KL falls from 17.7 to 0.0 nats", "Same shape; ..."),
        ...
    ])

The last expression of a cell shows it rendered (Markdown); its text/plain form, which the notebook tests
compare, is the same table as pipe-separated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

REPLICATION_COLUMNS = ("the paper", "this notebook", "where they differ")


def _cell(value) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


@dataclass
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence]
    title: str = ""

    def __post_init__(self) -> None:
        for index, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"row {index} has {len(row)} cells, the table has {len(self.columns)} columns "
                                 f"({', '.join(self.columns)})")

    def _lines(self) -> list[str]:
        lines = ["| " + " | ".join(_cell(c) for c in self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in self.rows]
        return ([f"**{self.title}**", ""] if self.title else []) + lines

    def _repr_markdown_(self) -> str:
        return "\n".join(self._lines())

    def __repr__(self) -> str:
        return "\n".join(self._lines())


def table(rows: Sequence[Sequence], columns: Sequence[str], title: str = "") -> Table:
    """Any table: `columns` names, then one sequence of cells per row."""
    return Table(list(columns), [list(row) for row in rows], title)


def replication_table(rows: Sequence[Sequence], title: str = "Replication") -> Table:
    """The chapter's closing table: (the paper's result, what this notebook computed, where they differ) per row."""
    return table(rows, REPLICATION_COLUMNS, title)
