"""Notebook I/O and kernel driving shared by `utils.build`, `utils.grade` and `utils.bench`.

Reading and writing go through `read` / `dumps` so every tool produces byte-identical files (nbformat, indent 1,
sorted keys, trailing newline). `Kernel` runs a notebook cell by cell in a fresh kernel and records, for each
cell, whether it raised or timed out, so a caller can decide to stop (the build) or carry on (the grader).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import nbformat
import psutil
from jupyter_core.utils import run_sync
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbformat import NotebookNode

ROOT = Path(__file__).resolve().parents[2]  # the course checkout: utils/course/notebooks.py -> ../../..
KERNEL_STDERR = None if os.environ.get("WORKBOOK_DEBUG_KERNEL") else subprocess.DEVNULL  # startup warnings only
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


class CappedClient(NotebookClient):
    """nbclient, keeping at most `output_cap` bytes of a notebook's output (a flood of output from a learner's
    cell must not balloon the grader's memory): later output is dropped, with one note saying so."""

    output_cap: int | None = None

    def process_message(self, msg: dict, cell: NotebookNode, cell_index: int):
        if self.output_cap is not None and msg["msg_type"] not in ("status", "execute_input"):
            size = sum(len(str(value)) for value in msg["content"].values())
            self.output_bytes = getattr(self, "output_bytes", 0) + size
            if self.output_bytes > self.output_cap:
                if not getattr(self, "output_truncated", False):
                    self.output_truncated = True
                    cell.outputs.append(nbformat.v4.new_output(
                        "stream", name="stderr", text=f"[output beyond {self.output_cap // 2**20} MB dropped]\n"))
                return None
        return super().process_message(msg, cell, cell_index)


def _tree_usage(pid: int) -> tuple[int, int]:
    """(resident bytes, number of processes) of process `pid` and all its descendants; (0, 0) once it has gone."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total, len(processes)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class MemoryWatchdog:
    """Kills process `pid` (a kernel, or the sandbox holding it) once it and its descendants use more than
    `limit` bytes of resident memory, or number more than `max_processes` (a fork bomb); polls from a thread.
    `fired` says why it killed, or is empty."""

    def __init__(self, pid: int | None, limit: int | None, every: float = 0.1, max_processes: int = 256,
                 folder: Path | None = None, folder_limit: int = 2 * 2**30):
        self.pid, self.limit, self.every, self.max_processes = pid, limit, every, max_processes
        self.folder, self.folder_limit = folder, folder_limit  # the sandbox's writable folder, and its cap
        self.fired = ""
        self.peak = 0  # the largest resident memory seen, in bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "MemoryWatchdog":
        if self.pid and self.limit:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        polls = 0
        while not self._stop.wait(self.every):
            polls += 1
            rss, count = _tree_usage(self.pid)
            self.peak = max(self.peak, rss)
            written = _folder_bytes(self.folder) if self.folder is not None and polls % 10 == 0 else 0
            if rss > self.limit or count > self.max_processes or written > self.folder_limit:
                self.fired = (f"used more than {self.limit / 2**30:.1f} GiB of memory" if rss > self.limit else
                              f"started more than {self.max_processes} processes" if count > self.max_processes else
                              f"wrote more than {self.folder_limit / 2**30:.1f} GiB of files")
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                return


@dataclass
class Kernel:
    """A fresh python3 kernel (this interpreter's, started by an explicit command: no kernelspec lookup) running
    cells of `nb` in `cwd`.

    allow_errors=False makes `run_cell` raise nbclient's CellExecutionError on the first error; with
    allow_errors=True a cell that raises or runs past `timeout` (it is interrupted) is recorded and the kernel
    carries on. A dead kernel raises nbclient's DeadKernelError either way.

    sandbox: a command prefix (utils.course.sandbox.command) to start the kernel inside; the kernel then talks
    over Unix sockets in `scratch` (the sandbox has no network) and is interrupted by a message.
    memory_limit: bytes; the kernel (with everything it started) is killed past it, and the cell raises
    DeadKernelError. output_cap: bytes of output kept (None: all).
    """

    nb: NotebookNode
    cwd: Path
    timeout: int
    allow_errors: bool
    env: dict[str, str] = field(default_factory=kernel_env)
    runs: list[CellRun] = field(default_factory=list)
    sandbox: list[str] | None = None
    scratch: Path | None = None
    memory_limit: int | None = None
    output_cap: int | None = None

    def __post_init__(self) -> None:
        self._replies: dict[int, dict] = {}
        self.watchdog: MemoryWatchdog | None = None
        self.client = CappedClient(
            self.nb,
            km=self._kernel_manager(),
            timeout=self.timeout,
            allow_errors=self.allow_errors,
            interrupt_on_timeout=self.allow_errors,
            # With interrupt_on_timeout alone nbclient waits for the interrupted cell forever; this makes it
            # report the timeout as an error and move on.
            error_on_timeout={"ename": TIMEOUT_NAME, "evalue": f"the cell ran past {self.timeout} s and was "
                              f"interrupted", "traceback": []} if self.allow_errors else None,
            record_timing=False,  # timestamps in cell metadata would make every run a diff
            resources={"metadata": {"path": str(self.cwd)}},
            on_cell_executed=self._record_reply,
        )
        self.client.output_cap = self.output_cap

    def _kernel_manager(self) -> AsyncKernelManager:
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        if self.sandbox is None:
            km = AsyncKernelManager()
            spec = KernelSpec(argv=argv, display_name="Python 3", language="python")
        else:
            if self.scratch is None:
                raise ValueError("a sandboxed kernel needs its scratch folder for its sockets")
            km = AsyncKernelManager(transport="ipc", ip=str(self.scratch / "kernel"))
            km.connection_file = str(self.scratch / "kernel.json")
            spec = KernelSpec(argv=[*self.sandbox, *argv], display_name="Python 3 (sandboxed)", language="python",
                              interrupt_mode="message")
        km._kernel_spec = spec  # an explicit command: a notebook's metadata cannot choose another kernel
        return km

    def _record_reply(self, cell: NotebookNode, cell_index: int, execute_reply: dict) -> None:
        self._replies[cell_index] = execute_reply

    @contextmanager
    def started(self) -> Iterator["Kernel"]:
        """Start the kernel, yield, then kill it (and, sandboxed, everything it started)."""
        client = self.client
        client.reset_execution_trackers()
        try:
            # The kernel's own stderr only carries ipykernel's startup warnings; cell output comes over zmq.
            with client.setup_kernel(env=self.env, stdout=subprocess.DEVNULL, stderr=KERNEL_STDERR):
                with MemoryWatchdog(self.pid, self.memory_limit, folder=self.scratch) as self.watchdog:
                    info = client.wait_for_reply(client.kc.kernel_info())
                    if info and "language_info" in info["content"]:
                        self.nb.metadata["language_info"] = info["content"]["language_info"]
                    yield self
                    client.set_widgets_metadata()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Kill the kernel now (a sandbox dies with everything in it); safe to call twice."""
        client, km = self.client, self.client.km
        try:
            if km is not None and km.has_kernel:
                run_sync(km.shutdown_kernel)(now=True)
        except Exception:  # it had already died
            pass
        if client.kc is not None:
            client.kc.stop_channels()
            client.kc = None
        if km is not None:
            run_sync(km.cleanup_resources)()

    @property
    def pid(self) -> int | None:
        provisioner = getattr(self.client.km, "provisioner", None)
        return getattr(provisioner, "pid", None)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the kernel and everything it started have used so far: a cost measure that,
        unlike wall-clock time, barely depends on what else the machine is doing."""
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except (psutil.Error, ValueError, TypeError):
            return 0.0
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
            except psutil.Error:
                pass
        return total

    @property
    def killed_because(self) -> str:
        """Why the watchdog killed the kernel ("used more than 8.0 GiB of memory"), or "" if it did not."""
        return self.watchdog.fired if self.watchdog else ""

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
           "DeadKernelError", "MemoryWatchdog"]
