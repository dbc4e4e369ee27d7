"""Grade one notebook: run it in a sandboxed kernel, then run the chapter's checks in this process.

    python -m utils.course.judge NOTEBOOK --result FILE [--chapter NN] [--timeout S] [--memory-gb GB]
                                 [--threads N] [--no-sandbox] [--hide PATH ...]

`python -m utils.grade` starts one of these per notebook (a fresh process each, so one submission cannot touch
the grading of another), and `utils/course/nbtest.py` uses the same functions on the solution notebooks.

This process never runs learner code. The notebook runs in a kernel inside a bubblewrap sandbox (see
sandbox.py) on a scratch copy; when it has run, each check runs *here* with the hidden cases, and calls the
learner's function through `KernelSession`, which sends the arguments to the kernel as plain data and reads the
result back as plain data (remote.py, agent.py). The reference results, the comparison and the message are
made here, so nothing the learner's code does inside its kernel can change a verdict: it can only change what
its own functions return.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import nbformat
import torch

from utils.course import checking, sandbox
from utils.course.checking import LearnerError, ReferenceUsed
from utils.course.notebooks import ROOT, CellRun, DeadKernelError, Kernel, kernel_env, read
from utils.course.remote import (DecodeError, EncodeError, Encoder, RemoteAnswer, RemoteHandle, read_message,
                                 tripwire_names, write_message)

DEFAULT_TIMEOUT = 300  # seconds per cell, and per check
DEFAULT_MEMORY_GB = 8.0  # per kernel; every solution notebook stays under 4 GB
MAX_KERNEL_RESTARTS = 3  # cells that kill the kernel, skipped one by one before the grader gives up
OUTPUT_CAP = 8 * 2**20  # bytes of a notebook's output the grader keeps
MESSAGE_CAP = 600  # characters of a message that reach a report


class CheckTimedOut(BaseException):  # not an Exception: a check's own `except Exception` must not swallow it
    pass


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
    failed_cells: list[CellRun] = field(default_factory=list)  # cells that raised, timed out or killed the kernel

    @property
    def points(self) -> int:
        return sum(row.points for row in self.rows)

    @property
    def max_points(self) -> int:
        return sum(row.max_points for row in self.rows)

    def to_json(self) -> dict:
        return {"notebook": self.notebook, "chapter": self.chapter, "rows": [asdict(row) for row in self.rows],
                "failed_cells": [asdict(run) for run in self.failed_cells]}

    @classmethod
    def from_json(cls, data: dict) -> "NotebookGrade":
        return cls(data["notebook"], data["chapter"], [Row(**row) for row in data["rows"]],
                   [CellRun(**run) for run in data["failed_cells"]])


# ---------------------------------------------------------------------------------------------------------
# Calling the learner's functions in their kernel.
# ---------------------------------------------------------------------------------------------------------


def _left_by_the_learner(tensor, hook):  # stands for a hook the learner's function left on the kernel's model
    return None


class KernelSession:
    """Requests to the agent in a running kernel (one at a time), with a deadline per check."""

    def __init__(self, kernel: Kernel, folder: Path):
        self.kernel, self.folder = kernel, folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.deadline = float("inf")
        self._count = 0

    def _request(self, message_for: callable) -> tuple[Any, Any, Encoder]:
        self._count += 1
        path = self.folder / f"{self._count}-{secrets.token_hex(4)}"
        encoder = Encoder()
        write_message(path, message_for(encoder), encoder)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise CheckTimedOut()
        code = f"__import__('utils.course.agent', fromlist=['serve']).serve({str(path)!r}, globals())"
        run, _ = self.kernel.run_extra(code, max(1, int(remaining)))
        if run.status == "timeout":
            raise CheckTimedOut()
        reply_path = Path(str(path) + ".reply")
        try:
            reply, tensors = read_message(reply_path)
        except DecodeError as error:
            raise LearnerError("GradingError", f"the grader could not read your function's result ({error})") from None
        finally:
            for leftover in self.folder.glob(path.name + "*"):
                leftover.unlink(missing_ok=True)
        if not isinstance(reply, dict):
            raise LearnerError("GradingError", "the kernel sent back something that is not a reply")
        from utils.course.remote import Decoder

        decoder = Decoder(tensors, trusted=False, handle=self._handle, known=encoder.objects)
        return reply, decoder, encoder

    def _handle(self, data: dict) -> RemoteHandle:
        return RemoteHandle(self, int(data.get("$handle", 0)), str(data.get("type", "object"))[:60],
                            bool(data.get("callable")))

    def describe(self, keys: list[str]) -> dict[str, Any]:
        """What the notebook defined under each exercise key: a RemoteAnswer, a value, or None (undefined)."""
        reply, decoder, _ = self._request(lambda encoder: {"op": "describe", "keys": list(keys)})
        if "error" in reply:
            raise LearnerError("GradingError", f"the kernel could not describe the answers "
                                               f"({str(reply['error'].get('message', ''))[:200]})")
        answers = reply.get("answers") if isinstance(reply.get("answers"), dict) else {}
        out: dict[str, Any] = {}
        for key in keys:
            info = answers.get(key)
            if not isinstance(info, dict) or not info.get("defined"):
                out[key] = None
            elif info.get("callable"):
                out[key] = ("callable", str(info.get("type", "function"))[:60])
            else:
                out[key] = ("value", decoder.decode(info.get("value")))
        return out

    def call(self, target: dict, args: tuple, kwargs: dict, tripwires: list[str] | None = None) -> Any:
        def message(encoder: Encoder) -> dict:
            return {"op": "call", "target": target, "args": encoder.encode(list(args), "the arguments"),
                    "kwargs": encoder.encode(dict(kwargs), "the keyword arguments"),
                    "rng": encoder.encode(torch.get_rng_state()), "grad": torch.is_grad_enabled(),
                    "tripwires": tripwires or []}

        reply, decoder, encoder = self._request(message)
        self._apply_side_effects(reply, decoder, encoder)
        if reply.get("reference_used"):
            raise ReferenceUsed("your answer is, wraps or calls the course's own reference implementation of this "
                                "exercise, which earns no credit: write it yourself")
        error = reply.get("error")
        if isinstance(error, dict):
            kind, text = str(error.get("type", "Exception"))[:80], str(error.get("message", ""))
            if kind == "NotImplementedError":
                raise NotImplementedError(text)
            raise LearnerError.raised(kind, text, str(error.get("where", ""))[:200])
        if "result" not in reply:
            raise LearnerError("GradingError", "the kernel sent back no result")
        return decoder.decode(reply["result"])

    @staticmethod
    def _apply_side_effects(reply: dict, decoder, encoder: Encoder) -> None:
        """What the learner's function did to its arguments happens to the check's copies too."""
        for item in reply.get("mutated") or []:
            try:
                index, value = item
                original, value = encoder.originals[int(index)], decoder.decode(value)
                if isinstance(original, torch.Tensor) and isinstance(value, torch.Tensor):
                    if original.shape == value.shape:
                        original.copy_(value.to(original.dtype))
                    else:
                        original.data = value.to(original.dtype)
            except (ValueError, TypeError, IndexError, DecodeError, RuntimeError):
                continue
        for item in reply.get("hooks") or []:
            try:
                index, names = item
                model = encoder.objects[int(index)]
                for name in names[:64]:
                    if isinstance(name, str) and name in model.hook_dict:
                        model.hook_dict[name].add_hook(_left_by_the_learner)
            except (ValueError, TypeError, IndexError, AttributeError):
                continue
        try:
            state = decoder.decode(reply.get("rng"))
            if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.shape == torch.get_rng_state().shape:
                torch.set_rng_state(state)
        except (DecodeError, RuntimeError):
            pass


def grade_answers(session: KernelSession, exercises: list, timeout: int) -> dict[str, tuple[bool, str]]:
    """Run every check (hidden cases on) against the learner's answers in the kernel; key -> (passed, message)."""
    checking.set_hidden_seed(secrets.randbits(31))
    try:
        session.deadline = time.monotonic() + timeout
        answers = session.describe([exercise.key for exercise in exercises])
    except (CheckTimedOut, LearnerError) as error:
        why = f"the kernel did not answer ({error})" if isinstance(error, LearnerError) else "the kernel stopped responding"
        return {exercise.key: (False, f"not graded: {why}") for exercise in exercises}
    results = {}
    for exercise in exercises:
        described = answers.get(exercise.key)
        if described is None:
            results[exercise.key] = (False, f"`{exercise.key}` is not defined in your notebook: did you rename it or "
                                            f"skip its cell?")
            continue
        kind, value = described
        answer = RemoteAnswer(session, exercise.key, value, tripwire_names(exercise.reference)) if kind == "callable" \
            else value
        session.deadline = time.monotonic() + timeout
        try:
            result = checking.run_check(exercise, answer, hidden=True)
            results[exercise.key] = (result.passed, result.message)
        except CheckTimedOut:
            results[exercise.key] = (False, f"the check ran past {timeout} s (does your code loop forever?)")
        except EncodeError as error:  # a check that breaks the grader's rules: the course's bug, not the learner's
            results[exercise.key] = (False, f"not graded: the check cannot run in the grader ({error})")
        if not session.kernel.responsive(30):
            for rest in exercises[exercises.index(exercise) + 1:]:
                results[rest.key] = (False, "not graded: the kernel stopped responding")
            break
    return results


# ---------------------------------------------------------------------------------------------------------
# Running the notebook.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Execution:
    kernel: Kernel
    failed: list[CellRun]  # cells that raised, timed out or killed the kernel (and were skipped), in order
    scratch: Path


def kernel_environment(scratch: Path, threads: int | None) -> dict[str, str]:
    """The kernel's environment: offline, its home and caches in the scratch folder, no learner startup files."""
    home = scratch / "home"
    home.mkdir(exist_ok=True)
    env = kernel_env(WORKBOOK_ROOT=str(ROOT), HOME=str(home), IPYTHONDIR=str(scratch / "ipython"),
                     JUPYTER_RUNTIME_DIR=str(scratch / "runtime"), MPLCONFIGDIR=str(scratch / "mpl"),
                     HF_HOME=str(scratch / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     HF_HUB_DISABLE_TELEMETRY="1", TMPDIR="/tmp" if sandbox.available() else str(scratch))
    from utils.models import cache_dir

    env["WORKBOOK_CACHE_DIR"] = str(cache_dir())  # mounted read-only in the sandbox
    if threads:
        env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return env


@contextmanager
def executed(nb: nbformat.NotebookNode, work: Path, scratch: Path, timeout: int, memory_limit: int | None,
             threads: int | None, sandboxed: bool, hide: list[Path] = (), on_cell=None) -> Iterator[Execution]:
    """Run the notebook (in `work`, a folder inside `scratch`) cell by cell and yield the live kernel.

    A cell that raises or times out is recorded and the rest still run. A cell that kills the kernel (over
    `memory_limit`, or a crash) is recorded and skipped, and the notebook runs again in a fresh kernel without
    it. on_cell(index, run) is called after each cell of the final run.
    """
    env = kernel_environment(scratch, threads)
    if sandboxed:
        # The sandbox mounts the model cache read-only: on a machine where SmolLM2 was never loaded, make it here.
        from utils.models import ensure_smollm2_cache

        ensure_smollm2_cache()
    failed: list[CellRun] = []
    skipped: set[int] = set()
    for _ in range(MAX_KERNEL_RESTARTS + 1):
        prefix = sandbox.command(scratch, work, hide) if sandboxed else None
        kernel = Kernel(nb, cwd=work, timeout=timeout, allow_errors=True, env=env, sandbox=prefix, scratch=scratch,
                        memory_limit=memory_limit, output_cap=OUTPUT_CAP)
        failed = [run for run in failed if run.status == "died"]  # a rerun records the others afresh
        index, live = -1, False
        try:
            with kernel.started():
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code" or index in skipped:
                        continue
                    run = kernel.run_cell(index)
                    if run.status != "ok":
                        failed.append(run)
                    if on_cell is not None:
                        on_cell(index, run)
                    if run.status == "timeout" and not kernel.responsive():
                        raise _Unresponsive(index)
                live = True
                yield Execution(kernel, sorted(failed, key=lambda run: run.index), scratch)
                return
        except DeadKernelError:
            if live:  # the kernel died while being graded, not while running a cell
                raise
            why = kernel.killed_because or "crashed the kernel"
            if index < 0 or index in skipped:
                raise
            failed.append(CellRun(index, "died", "KernelDied", why))
            skipped.add(index)
    raise _TooManyRestarts()


class _Unresponsive(Exception):
    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


class _TooManyRestarts(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# One notebook, start to finish.
# ---------------------------------------------------------------------------------------------------------


def notebook_chapter(nb: nbformat.NotebookNode, path: Path) -> str | None:
    """"NN" from the metadata `workbook.chapter`, else from the file name's `NN_` prefix."""
    chapter = str(nb.get("metadata", {}).get("workbook", {}).get("chapter", ""))
    if re.fullmatch(r"\d\d", chapter):
        return chapter
    prefix = re.match(r"(\d\d)_", path.name)
    return prefix.group(1) if prefix else None


def chapter_exercises(chapter: str, checks_module: str | None = None) -> list:
    """The Exercise objects of a chapter, in order, from its check module (or from `checks_module`)."""
    import importlib

    importlib.import_module(checks_module or f"utils.checks.ch{chapter}")
    return list(checking.REGISTRY.get(chapter, {}).values())


def _notebook_row(label: str, chapter: str, message: str, max_points: int = 0) -> Row:
    return Row(label, chapter, "", "", False, 0, max_points, message)


def grade_notebook(path: str | Path, timeout: int = DEFAULT_TIMEOUT, checks_module: str | None = None,
                   threads: int | None = None, expected_chapter: str | None = None,
                   memory_gb: float = DEFAULT_MEMORY_GB, sandboxed: bool = True, hide: list[Path] = (),
                   label: str | None = None) -> NotebookGrade:
    """Grade one notebook; never raises for a problem with the notebook (that becomes a row)."""
    label, path = label or str(path), Path(path)
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

    scratch = Path(tempfile.mkdtemp(prefix="wbg-"))  # short: Unix socket paths live in it
    try:
        work = scratch / "notebook"
        work.mkdir()
        shutil.copyfile(path, work / path.name)
        failed, results, problem = [], {}, None
        try:
            with executed(nb, work, scratch, timeout, int(memory_gb * 2**30), threads, sandboxed, hide) as run:
                failed = run.failed
                results = grade_answers(KernelSession(run.kernel, scratch / "rpc"), exercises, timeout)
        except _Unresponsive as stuck:
            problem = f"not graded: cell {stuck.index + 1} ran past {timeout} s and the kernel did not respond to the interrupt"
        except _TooManyRestarts:
            problem = f"not graded: the kernel died {MAX_KERNEL_RESTARTS + 1} times"
        except DeadKernelError:
            problem = "not graded: the checks crashed the kernel"
        except sandbox.SandboxUnavailable:
            raise
        except Exception as error:  # e.g. the kernel would not start
            problem = f"not graded: the grader could not run the notebook ({type(error).__name__}: {error})"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.course.judge", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--result", type=Path, required=True, help="where to write the grade (JSON)")
    parser.add_argument("--label", help="the notebook's name in the report (default: its path)")
    parser.add_argument("--chapter")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT)
    parser.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_GB)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-sandbox", action="store_true")
    parser.add_argument("--hide", type=Path, nargs="*", default=[])
    parser.add_argument("--checks-module")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    grade = grade_notebook(args.notebook, args.timeout, args.checks_module, args.threads, args.chapter,
                           args.memory_gb, not args.no_sandbox, args.hide, args.label)
    args.result.write_text(json.dumps(grade.to_json(), ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
