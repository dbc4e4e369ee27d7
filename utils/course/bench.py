"""Measure notebooks against the budget (AUTHORING.md: top to bottom in ≤ 4 minutes and ≤ 4 GB on 2 CPU cores).

    python -m utils.course.bench NOTEBOOK... [--threads 2] [--markdown] [--timeout SECONDS]

Each notebook runs like `python -m utils.build --execute` (fresh kernel, setup cell synced, stop at the first
error) but on a temporary copy in a scratch folder: the notebook itself is not modified. Reported: wall-clock
seconds from kernel start to the end of the last cell, and the kernel's peak resident memory (VmHWM of the
kernel process; processes the kernel starts are not counted). --threads N emulates CI's N cores: thread-count
variables for OpenMP/MKL/OpenBLAS (torch follows OMP_NUM_THREADS) and tokenizers, and on Linux the kernel is
pinned to N CPUs. --markdown prints a table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from utils.course.build import EXECUTE_TIMEOUT, BuildError, sync_setup_cell
from utils.course.notebooks import ROOT, Kernel, describe_cell, kernel_env, read, tags

THREAD_VARIABLES = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS"]


class BenchError(Exception):
    """The notebook failed; the message names the cell."""


@dataclass
class Measurement:
    notebook: str
    seconds: float
    peak_bytes: int
    threads: int | None

    def line(self) -> str:
        threads = f", {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else ""
        return f"{self.notebook}: {self.seconds:.1f} s, peak memory {self.peak_bytes / 2**30:.2f} GiB{threads}"

    def markdown_row(self) -> str:
        return (f"| {Path(self.notebook).stem} | {self.seconds:.0f} s | {self.peak_bytes / 2**30:.2f} GiB | "
                f"{self.threads or os.cpu_count()} | {platform.machine()} |")


MARKDOWN_HEADER = "| notebook | wall-clock | peak memory (kernel RSS) | CPU threads | machine |\n|---|---|---|---|---|"


def _peak_rss(pid: int | None) -> int | None:
    """VmHWM, the kernel's high-water mark of resident memory, in bytes (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _limit_threads(env: dict[str, str], threads: int) -> None:
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    env["TOKENIZERS_PARALLELISM"] = "false" if threads == 1 else "true"


def bench(path: str | Path, threads: int | None = None, timeout: int = EXECUTE_TIMEOUT) -> Measurement:
    """Run a copy of the notebook top to bottom; raise BenchError naming the cell if one fails."""
    path = Path(path)
    nb = read(path)
    if any("setup" in tags(cell) for cell in nb.cells):
        sync_setup_cell(nb, str(path))
    env = kernel_env(WORKBOOK_ROOT=str(ROOT))
    if threads:
        _limit_threads(env, threads)
    with tempfile.TemporaryDirectory(prefix="workbook-bench-") as scratch:
        shutil.copyfile(path, Path(scratch) / path.name)
        kernel = Kernel(nb, cwd=Path(scratch), timeout=timeout, allow_errors=False, env=env)
        start = time.perf_counter()
        with kernel.started():
            if threads and hasattr(os, "sched_setaffinity"):
                cpus = sorted(os.sched_getaffinity(0))[:threads]
                os.sched_setaffinity(kernel.pid, cpus)  # threads the kernel starts from now on inherit this
            for index in range(len(nb.cells)):
                try:
                    kernel.run_cell(index)
                except CellExecutionError as error:
                    raise BenchError(f"{path}: {describe_cell(nb, index)} raised {error.ename}: {error.evalue}") \
                        from None
                except CellTimeoutError:
                    raise BenchError(f"{path}: {describe_cell(nb, index)} ran past {timeout} s") from None
                except DeadKernelError:
                    raise BenchError(f"{path}: the kernel died while running {describe_cell(nb, index)}") from None
            seconds = time.perf_counter() - start
            peak = _peak_rss(kernel.pid)
    if peak is None:  # no /proc: the largest child reaped so far (the kernel has shut down by now)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return Measurement(str(path), seconds, peak, threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.course.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    parser.add_argument("--threads", type=int, metavar="N", help="emulate N CPU cores (CI has 2)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (BENCHMARKS.md)")
    parser.add_argument("--timeout", type=int, default=EXECUTE_TIMEOUT, metavar="SECONDS", help="per cell")
    args = parser.parse_args(argv)
    for notebook in args.notebooks:
        if not Path(notebook).is_file():
            parser.error(f"no such notebook: {notebook}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")

    failed = False
    if args.markdown:
        print(MARKDOWN_HEADER)
    for notebook in args.notebooks:
        try:
            measurement = bench(notebook, args.threads, args.timeout)
        except (BenchError, BuildError) as error:
            print(f"error: {error}", file=sys.stderr)
            failed = True
            continue
        print(measurement.markdown_row() if args.markdown else measurement.line(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
