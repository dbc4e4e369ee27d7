"""Notebook I/O and kernel driving shared by `utils.build`, `utils.grade` and `utils.bench`.

Reading and writing go through `read` / `dumps` so every tool produces byte-identical files (nbformat, indent 1,
sorted keys, trailing newline). `Kernel` runs a notebook cell by cell in a fresh kernel and records, for each
cell, whether it raised or timed out, so a caller can decide to stop (the build) or carry on (the grader).
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbformat import NotebookNode

ROOT = Path(__file__).resolve().parents[2]  # the course checkout: utils/course/notebooks.py -> ../../..
TIMEOUT_NAME = "CellTimeout"  # the ename nbclient reports for a cell we interrupted on timeout


def read(path: str | os.PathLike) -> NotebookNode:
    """Read a notebook as nbformat 4. Raises on invalid JSON or a file that is not a notebook."""
    return nbformat.read(str(path), as_version=4)


def dumps(nb: NotebookNode) -> str:
    """The exact text every tool writes: nbformat's own JSON layout plus a trailing newline."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def write_if_changed(nb: NotebookNode, path: Path) -> bool:
    """Write only when the text differs, so unchanged files keep their mtime. Returns whether it wrote."""
    text = dumps(nb)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")
    return True


def tags(cell: NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def kernel_env(**overrides: str) -> dict[str, str]:
    """The environment for a kernel: ours, with the repository importable and hashing deterministic."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONHASHSEED"] = "0"
    env.update(overrides)
    return env


@dataclass
class CellRun:
    index: int  # position in the notebook, 0-based; people see index + 1
    status: str  # "ok", "error", "timeout", or "died" (the grader: the cell killed the kernel)
    ename: str = ""
    evalue: str = ""


@dataclass
class Kernel:
    """A fresh python3 kernel (this interpreter's) running cells of `nb` in `cwd`.

    allow_errors=False makes `run_cell` raise nbclient's CellExecutionError on the first error; with
    allow_errors=True a cell that raises or runs past `timeout` (it is interrupted) is recorded and the kernel
    carries on. A dead kernel raises nbclient's DeadKernelError either way.
    """

    nb: NotebookNode
    cwd: Path
    timeout: int
    allow_errors: bool
    env: dict[str, str] = field(default_factory=kernel_env)
    runs: list[CellRun] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._replies: dict[int, dict] = {}
        self.client = NotebookClient(
            self.nb,
            timeout=self.timeout,
            kernel_name="python3",
            allow_errors=self.allow_errors,
            interrupt_on_timeout=self.allow_errors,
            # With interrupt_on_timeout alone nbclient waits for the interrupted cell forever; this makes it
            # report the timeout as an error and move on.
            error_on_timeout={"ename": TIMEOUT_NAME, "evalue": f"the cell ran past {self.timeout} s and was "
                              f"interrupted", "traceback": []} if self.allow_errors else None,
            shutdown_kernel="immediate",  # a graceful shutdown costs seconds and we keep nothing of the kernel
            record_timing=False,  # timestamps in cell metadata would make every run a diff
            resources={"metadata": {"path": str(self.cwd)}},
            on_cell_executed=self._record_reply,
        )

    def _record_reply(self, cell: NotebookNode, cell_index: int, execute_reply: dict) -> None:
        self._replies[cell_index] = execute_reply

    @contextmanager
    def started(self) -> Iterator["Kernel"]:
        """Start the kernel (its python is `sys.executable`), yield, then shut it down."""
        client = self.client
        client.reset_execution_trackers()
        # The kernel's own stderr only carries ipykernel's startup warnings; cell output comes over zmq.
        with client.setup_kernel(env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            info = client.wait_for_reply(client.kc.kernel_info())
            if info and "language_info" in info["content"]:
                self.nb.metadata["language_info"] = info["content"]["language_info"]
            yield self
            client.set_widgets_metadata()

    @property
    def pid(self) -> int | None:
        provisioner = getattr(self.client.km, "provisioner", None)
        return getattr(provisioner, "pid", None)

    def run_cell(self, index: int) -> CellRun:
        """Execute cell `index` of the notebook and record what happened."""
        self._replies.pop(index, None)
        self.client.execute_cell(self.nb.cells[index], index, execution_count=self.client.code_cells_executed + 1)
        content = self._replies.get(index, {}).get("content", {})
        if content.get("status") != "error":
            run = CellRun(index, "ok")
        else:
            ename = content.get("ename", "")
            run = CellRun(index, "timeout" if ename == TIMEOUT_NAME else "error", ename, content.get("evalue", ""))
        self.runs.append(run)
        return run

    def run_extra(self, source: str, timeout: int) -> tuple[CellRun, NotebookNode]:
        """Execute code that is not in the notebook (nbclient wants it in nb.cells while it runs)."""
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        saved, self.client.timeout = self.client.timeout, timeout
        try:
            run = self.run_cell(len(self.nb.cells) - 1)
        finally:
            self.client.timeout = saved
            self.nb.cells.pop()
            self.runs.pop()
        return run, cell

    def responsive(self, seconds: int = 30) -> bool:
        """After a timeout: did the interrupt take? (A cell stuck in C code may ignore it.)"""
        return self.run_extra("pass", seconds)[0].status == "ok"


def describe_cell(nb: NotebookNode, index: int) -> str:
    """'cell 7 (`def logit_lens(model, cache)...`)': how messages name a cell."""
    source = nb.cells[index].source.strip().splitlines() if 0 <= index < len(nb.cells) else []
    first = source[0] if source else ""
    first = first if len(first) <= 50 else first[:47] + "..."
    return f"cell {index + 1}" + (f" (`{first}`)" if first else "")


__all__ = ["ROOT", "read", "dumps", "write_if_changed", "tags", "kernel_env", "Kernel", "CellRun", "describe_cell",
           "DeadKernelError"]
