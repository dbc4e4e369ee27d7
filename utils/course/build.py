"""Build the learner's notebooks from the solution notebooks.

    python -m utils.build                                  # sync solutions/, (re)write chapters/
    python -m utils.build --check                          # change nothing; exit 1 if anything is stale
    python -m utils.build --execute solutions/01_x.ipynb   # run it in place (nbclient), then build

For every solutions/NN_name.ipynb the build
  1. writes `utils.course.colab.setup_cell_source()` into the code cell tagged `setup`,
  2. replaces any output over 100 KB (circuitsvis inlines ~1.3 MB of JavaScript) by a one-line note,
  3. sets the notebook metadata `workbook: {chapter: "NN", name: "NN_name"}`,
  4. writes chapters/NN_name.ipynb: `solution-only` cells removed, every `# BEGIN SOLUTION` ... `# END SOLUTION`
     block replaced by a stub, outputs and execution counts cleared.
The output depends only on the input, so `--check` can compare files byte for byte.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import re
import sys
from pathlib import Path

from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbformat import NotebookNode

from utils.course.colab import COLAB_LINK_PREFIX, setup_cell_source
from utils.course.notebooks import ROOT, Kernel, describe_cell, dumps, kernel_env, read, tags, write_if_changed

LARGE = 100 * 1024  # bytes; bigger outputs stay out of git
EXECUTE_TIMEOUT = 900  # seconds per cell
MARKER = re.compile(r"^(\s*)# (BEGIN|END) SOLUTION\s*$")
HEADING = re.compile(r"^#{1,3}\s")  # a new section or exercise: `####` and deeper are inside an exercise
EXERCISE_HEADING = re.compile(r"^###\s+Exercise\s+(\d+(?:\.\d+)*)")


class BuildError(Exception):
    """A problem in a solution notebook; the message names the file and cell."""


# ---------------------------------------------------------------------------------------------------------
# The solution notebook: setup cell, large outputs, metadata, cell ids.
# ---------------------------------------------------------------------------------------------------------


def sync_setup_cell(nb: NotebookNode, where: str) -> None:
    setup = [cell for cell in nb.cells if cell.cell_type == "code" and "setup" in tags(cell)]
    if not setup:
        raise BuildError(f"{where}: no setup cell. Tag the first code cell `setup` (cell metadata "
                         f'"tags": ["setup"]); the build writes its source. See AUTHORING.md.')
    if len(setup) > 1:
        raise BuildError(f"{where}: {len(setup)} cells are tagged `setup`; keep exactly one.")
    setup[0].source = setup_cell_source()


def _size(value) -> int:
    text = value if isinstance(value, str) else "".join(value) if isinstance(value, list) else json.dumps(value)
    return len(text.encode("utf-8"))


def _shrink(output: NotebookNode) -> NotebookNode:
    """A display whose non-text data is over LARGE becomes a note saying so. Streams and errors are kept."""
    if output.output_type not in ("display_data", "execute_result"):
        return output
    big = {mime: _size(value) for mime, value in output.get("data", {}).items() if mime != "text/plain"}
    big = {mime: size for mime, size in big.items() if size > LARGE}
    if not big:
        return output
    what = ", ".join(f"{round(size / 1024)} KB of {mime.split('/')[-1]}" for mime, size in big.items())
    output.data = {"text/plain": f"[large output ({what}) omitted from the repository; run the cell to see it]"}
    output.metadata = {}
    return output


def strip_large_outputs(nb: NotebookNode) -> None:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [_shrink(output) for output in cell.outputs]
    # ipywidgets keep every widget's state in the notebook metadata (tqdm bars); drop it when it bloats.
    if "widgets" in nb.metadata and _size(nb.metadata["widgets"]) > LARGE:
        del nb.metadata["widgets"]


def set_metadata(nb: NotebookNode, path: Path) -> None:
    nb.metadata.setdefault("workbook", {})
    nb.metadata["workbook"].update({"chapter": path.name[:2], "name": path.stem})


def ensure_cell_ids(nb: NotebookNode) -> None:
    """nbformat 4.5 wants cell ids; give missing or duplicate ones a deterministic id (nbformat's are random)."""
    nb.nbformat_minor = max(nb.nbformat_minor, 5)
    seen = set()
    for index, cell in enumerate(nb.cells):
        if not cell.get("id") or cell.id in seen:
            cell.id = hashlib.sha1(f"{index}:{cell.source}".encode()).hexdigest()[:12]
        seen.add(cell.id)


# ---------------------------------------------------------------------------------------------------------
# The learner's notebook.
# ---------------------------------------------------------------------------------------------------------


def _target_names(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _target_names(element)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []  # attributes and subscripts assign into an existing object


def assigned_names(source: str) -> list[str]:
    """Names a block of top-level code assigns (also inside if/for/with), in order, not those inside defs."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            names.extend(name for name in _target_names(target) if name not in names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return names


def _stub(block: list[str], indent: str, number: str | None, where: str) -> list[str]:
    if indent:  # inside a function (or a loop): the learner writes the body
        label = f"Exercise {number}: write your code here" if number else "Write your code here"
        return [f'{indent}raise NotImplementedError("{label}")']
    try:
        names = assigned_names("\n".join(block))
    except SyntaxError as error:
        raise BuildError(f"{where}: the solution block is not valid Python ({error.msg}, line {error.lineno} of "
                         f"the block), so the names it assigns cannot be found.") from None
    return [f"{name} = ...  # YOUR CODE HERE" for name in names] or ["# YOUR CODE HERE"]


def stub_solutions(source: str, number: str | None, where: str) -> str:
    """Replace every `# BEGIN SOLUTION` ... `# END SOLUTION` block of a code cell by its stub."""
    out: list[str] = []
    block: list[str] | None = None
    indent, begin = "", 0
    for lineno, line in enumerate(source.split("\n"), start=1):
        marker = MARKER.match(line)
        if not marker:
            (out if block is None else block).append(line)
        elif marker.group(2) == "BEGIN":
            if block is not None:
                raise BuildError(f"{where}, line {lineno}: nested `# BEGIN SOLUTION` (the block opened on line "
                                 f"{begin} is not closed yet); add `# END SOLUTION` before it.")
            block, indent, begin = [], marker.group(1), lineno
        else:
            if block is None:
                raise BuildError(f"{where}, line {lineno}: `# END SOLUTION` without a `# BEGIN SOLUTION` before it.")
            out.extend(_stub(block, indent, number, where))
            block = None
    if block is not None:
        raise BuildError(f"{where}, line {begin}: `# BEGIN SOLUTION` has no matching `# END SOLUTION`.")
    return "\n".join(out)


def learner_version(nb: NotebookNode, where: str) -> NotebookNode:
    """The chapter notebook: solution-only cells gone, solutions stubbed, no outputs."""
    chapter = copy.deepcopy(nb)
    chapter.metadata.pop("widgets", None)
    chapter.cells = []
    number = None  # of the exercise whose heading we are under
    for index, cell in enumerate(nb.cells):
        at = f"{where}, cell {index + 1}"
        if cell.cell_type == "markdown":
            fenced = False  # a `# comment` in a fenced code block is not a heading
            for line in cell.source.split("\n"):
                if MARKER.match(line):
                    raise BuildError(f"{at}: solution markers belong in code cells, not in a markdown cell.")
                fenced ^= line.lstrip().startswith("```")
                if not fenced and HEADING.match(line):
                    exercise = EXERCISE_HEADING.match(line)
                    number = exercise.group(1) if exercise else None
        if "solution-only" in tags(cell):
            continue
        cell = copy.deepcopy(cell)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.source = stub_solutions(cell.source, number, at)
            cell.outputs = []
            cell.execution_count = None
        chapter.cells.append(cell)
    return chapter


# ---------------------------------------------------------------------------------------------------------
# The whole build.
# ---------------------------------------------------------------------------------------------------------


def _where(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def solution_paths(root: Path = ROOT) -> list[Path]:
    return sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb"))


def build_texts(solution: Path, root: Path = ROOT) -> tuple[str, str]:
    """The text the solution notebook and its chapter should have. Raises BuildError."""
    where = _where(solution, root)
    try:
        nb = read(solution)
    except Exception as error:  # invalid JSON or not a notebook
        raise BuildError(f"{where}: cannot be read as a notebook ({type(error).__name__}: {error})") from None
    sync_setup_cell(nb, where)
    strip_large_outputs(nb)
    set_metadata(nb, solution)
    ensure_cell_ids(nb)
    return dumps(nb), dumps(learner_version(nb, where))


COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/main/")


def readme_with_colab_links(text: str) -> str:
    """The README with every "Open in Colab" link pointing at REPO_URL (utils/course/colab.py), so a fork edits one line."""
    return COLAB_LINK.sub(COLAB_LINK_PREFIX, text)


def build(root: Path = ROOT, check: bool = False) -> int:
    """Write (or with check=True, only compare) every solution and chapter. Prints what it did; returns 0 or 1."""
    expected: dict[Path, str] = {}
    errors: list[str] = []
    for solution in solution_paths(root):
        try:
            expected[solution], expected[root / "chapters" / solution.name] = build_texts(solution, root)
        except BuildError as error:
            errors.append(str(error))
    readme = root / "README.md"
    if readme.exists():
        expected[readme] = readme_with_colab_links(readme.read_text(encoding="utf-8"))
    orphans = [path for path in sorted((root / "chapters").glob("*.ipynb"))
               if not (root / "solutions" / path.name).exists()]
    for message in errors:
        print(f"error: {message}", file=sys.stderr)

    changed = [path for path, text in expected.items()
               if not path.exists() or path.read_text(encoding="utf-8") != text]
    if check:
        for path in changed:
            why = ("missing" if not path.exists() else "its Colab links do not point at REPO_URL in utils/course/colab.py"
                   if path.name == "README.md" else "out of date" if path.parent.name == "chapters" else
                   "the build would update its setup cell, large outputs or metadata")
            print(f"stale: {_where(path, root)} ({why})")
        for path in orphans:
            print(f"stale: {_where(path, root)} (no solutions/{path.name} to build it from)")
        if changed or orphans:
            print("Run `python -m utils.build` and commit solutions/ and chapters/.")
            return 1
        if errors:
            return 1
        print(f"build --check: OK ({_count(solution_paths(root))}, chapters up to date)")
        return 0

    for path in changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(expected[path], encoding="utf-8", newline="\n")
        print(f"wrote {_where(path, root)}")
    for path in orphans:  # its solution was renamed or deleted
        path.unlink()
        print(f"deleted {_where(path, root)} (no solutions/{path.name})")
    print(f"build: {_count(solution_paths(root))}, {len(changed) + len(orphans)} files changed"
          + (f", {len(errors)} errors" if errors else ""))
    return 1 if errors else 0


def execute(solution: Path, root: Path = ROOT) -> None:
    """Run a solution notebook top to bottom in its own folder and save it with its outputs. Raises BuildError."""
    where = _where(solution, root)
    nb = read(solution)
    sync_setup_cell(nb, where)  # run the setup code the build is about to write
    kernel = Kernel(nb, cwd=solution.resolve().parent, timeout=EXECUTE_TIMEOUT, allow_errors=False,
                    env=kernel_env(WORKBOOK_ROOT=str(ROOT)))  # the course this build belongs to
    with kernel.started():
        for index, cell in enumerate(nb.cells):
            print(f"\r{where}: running cell {index + 1}/{len(nb.cells)}", end="", file=sys.stderr, flush=True)
            try:
                kernel.run_cell(index)
            except CellExecutionError as error:
                raise BuildError(f"{where}: {describe_cell(nb, index)} raised {error.ename}: {error.evalue}\n"
                                 f"{_strip_ansi(str(error))}") from None
            except CellTimeoutError:
                raise BuildError(f"{where}: {describe_cell(nb, index)} ran past {EXECUTE_TIMEOUT} s.") from None
            except DeadKernelError:
                raise BuildError(f"{where}: the kernel died while running {describe_cell(nb, index)} (out of "
                                 f"memory? a crash in native code?).") from None
    print(file=sys.stderr)
    write_if_changed(nb, solution)
    print(f"executed {where}")


def _count(solutions: list[Path]) -> str:
    return f"{len(solutions)} solution notebook{'' if len(solutions) == 1 else 's'}"


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 listing stale files")
    parser.add_argument("--execute", nargs="+", metavar="NOTEBOOK", type=Path,
                        help="execute these solution notebooks in place first, then build")
    args = parser.parse_args(argv)
    if args.check and args.execute:
        parser.error("--check and --execute do not go together")
    for path in args.execute or []:
        if not path.is_file():
            parser.error(f"no such notebook: {path}")
    try:
        for path in args.execute or []:
            execute(path)
    except BuildError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    return build(check=args.check)


if __name__ == "__main__":
    sys.exit(main())
