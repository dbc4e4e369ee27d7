"""`python -m utils.build`: solution notebook -> learner notebook, the setup cell, large outputs, `--check`."""

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from utils.course import bench, build, colab
from utils.course.colab import setup_cell_source
from utils.course.notebooks import ROOT, read

FIXTURE = Path(__file__).parent / "fixtures" / "99_demo.ipynb"
BIG_HTML = "<div>" + "x" * 200_000 + "</div>"  # ~195 KB, over the 100 KB limit


@pytest.fixture
def root(tmp_path):
    """A scratch course folder holding the fixture solution with outputs, one of them oversize."""
    (tmp_path / "solutions").mkdir()
    nb = read(FIXTURE)
    cells = {cell.id: cell for cell in nb.cells}
    cells["demo-05"].outputs = [nbformat.v4.new_output("stream", name="stdout", text="✅ Exercise 99.1 (add): passed\n")]
    cells["demo-05"].execution_count = 4
    cells["demo-11"].outputs = [
        nbformat.v4.new_output("display_data", data={"text/html": BIG_HTML, "text/plain": "<HTML>"}),
        nbformat.v4.new_output("execute_result", data={"text/plain": "5"}, execution_count=9),
    ]
    nbformat.write(nb, tmp_path / "solutions" / FIXTURE.name)
    return tmp_path


def built(root):
    assert build.build(root) == 0
    return read(root / "solutions" / FIXTURE.name), read(root / "chapters" / FIXTURE.name)


def by_id(nb):
    return {cell.id: cell for cell in nb.cells}


def test_function_block_becomes_a_stub_keeping_signature_and_docstring(root):
    _, chapter = built(root)
    source = by_id(chapter)["demo-04"].source
    assert source == ('def add(a, b):\n    """Return a + b."""\n'
                      '    raise NotImplementedError("Exercise 99.1: write your code here")')
    namespace = {}
    exec(source, namespace)
    with pytest.raises(NotImplementedError, match="Exercise 99.1"):
        namespace["add"](1, 2)


def test_top_level_block_becomes_one_line_per_assigned_name(root):
    _, chapter = built(root)
    assert by_id(chapter)["demo-07"].source == "answer = ...  # YOUR CODE HERE"


def test_stub_names_and_exercise_number():
    source = ("x = 1\n# BEGIN SOLUTION\na, (b, *c) = 1, (2, 3)\nd: int = 4\nif a:\n    e = 5\n"
              "def helper():\n    hidden = 6\nobj.attr = 7\na += 1\n# END SOLUTION\ny = 2")
    assert build.stub_solutions(source, "3.1", "here") == (
        "x = 1\na = ...  # YOUR CODE HERE\nb = ...  # YOUR CODE HERE\nc = ...  # YOUR CODE HERE\n"
        "d = ...  # YOUR CODE HERE\ne = ...  # YOUR CODE HERE\ny = 2")
    assert build.stub_solutions("# BEGIN SOLUTION\nprint(1)\n# END SOLUTION", None, "here") == "# YOUR CODE HERE"
    inside = "for i in range(3):\n    # BEGIN SOLUTION\n    total += i\n    # END SOLUTION"
    assert build.stub_solutions(inside, None, "here") == ('for i in range(3):\n'
                                                          '    raise NotImplementedError("Write your code here")')


def test_exercise_number_comes_from_the_nearest_exercise_heading():
    cells = [nbformat.v4.new_markdown_cell("### Exercise 2.3 — Something\n#### Hint\n```python\n# not a heading\n```"),
             nbformat.v4.new_code_cell("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION"),
             nbformat.v4.new_markdown_cell("## A new section"),
             nbformat.v4.new_code_cell("def g():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION")]
    chapter = build.learner_version(nbformat.v4.new_notebook(cells=cells), "nb")
    assert 'NotImplementedError("Exercise 2.3: write your code here")' in chapter.cells[1].source
    assert 'NotImplementedError("Write your code here")' in chapter.cells[3].source


def test_solution_only_cell_removed_and_outputs_cleared(root):
    solution, chapter = built(root)
    assert "demo-09" in by_id(solution) and "demo-09" not in by_id(chapter)
    assert [cell.id for cell in chapter.cells] == [cell.id for cell in solution.cells if cell.id != "demo-09"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in chapter.cells if cell.cell_type == "code")
    assert "the answer is" not in "\n".join(cell.source for cell in chapter.cells)


def test_setup_cell_synced_in_both(root):
    solution, chapter = built(root)
    assert by_id(solution)["demo-01"].source == setup_cell_source()
    assert by_id(chapter)["demo-01"].source == setup_cell_source()
    assert by_id(chapter)["demo-01"].metadata.tags == ["setup"]


def test_oversize_output_stripped_small_ones_kept(root):
    solution, _ = built(root)
    outputs = by_id(solution)["demo-11"].outputs
    note = outputs[0].data
    assert set(note) == {"text/plain"} and "large output (195 KB of html) omitted" in note["text/plain"]
    assert outputs[1].data == {"text/plain": "5"}
    assert by_id(solution)["demo-05"].outputs[0].text == "✅ Exercise 99.1 (add): passed\n"
    assert (root / "solutions" / FIXTURE.name).stat().st_size < 50_000


def test_metadata(root):
    solution, chapter = built(root)
    for nb in solution, chapter:
        assert nb.metadata.workbook == {"chapter": "99", "name": "99_demo"}


def test_build_is_deterministic_and_check_passes_on_fresh_output(root, capsys):
    built(root)
    files = {path: path.read_bytes() for path in root.rglob("*.ipynb")}
    assert build.build(root) == 0
    assert "0 files changed" in capsys.readouterr().out
    assert build.build(root, check=True) == 0
    assert "OK" in capsys.readouterr().out
    assert files == {path: path.read_bytes() for path in root.rglob("*.ipynb")}
    assert all(text.endswith(b"}\n") for text in files.values())


def test_check_lists_every_stale_file_and_changes_nothing(root, capsys):
    built(root)
    chapter = root / "chapters" / FIXTURE.name
    chapter.write_text(chapter.read_text().replace("YOUR CODE HERE", "changed by hand"))
    shutil.copy(chapter, root / "chapters" / "98_orphan.ipynb")
    solution = root / "solutions" / FIXTURE.name
    shutil.copy(solution, root / "solutions" / "97_new.ipynb")  # no chapter yet
    solution.write_text(solution.read_text().replace("Setup: run this cell first", "An old setup cell"))
    before = {path: path.read_bytes() for path in root.rglob("*.ipynb")}
    capsys.readouterr()

    assert build.build(root, check=True) == 1
    out = capsys.readouterr().out
    assert "stale: chapters/99_demo.ipynb (out of date)" in out
    assert "stale: chapters/98_orphan.ipynb (no solutions/98_orphan.ipynb" in out
    assert "stale: chapters/97_new.ipynb (missing)" in out
    assert "stale: solutions/99_demo.ipynb" in out
    assert before == {path: path.read_bytes() for path in root.rglob("*.ipynb")}

    assert build.build(root) == 0
    assert not (root / "chapters" / "98_orphan.ipynb").exists()
    assert build.build(root, check=True) == 0


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    # BEGIN SOLUTION\n    return 1\n", "line 2: `# BEGIN SOLUTION` has no matching `# END SOLUTION`"),
    ("x = 1\n# END SOLUTION", "line 2: `# END SOLUTION` without a `# BEGIN SOLUTION`"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "line 2: nested `# BEGIN SOLUTION`"),
])
def test_marker_errors_name_file_cell_and_line(root, capsys, source, expected):
    path = root / "solutions" / FIXTURE.name
    nb = read(path)
    by_id(nb)["demo-07"].source = source  # the 8th cell
    nbformat.write(nb, path)
    assert build.build(root) == 1
    assert f"error: solutions/99_demo.ipynb, cell 8, {expected}" in capsys.readouterr().err
    assert not (root / "chapters").exists()  # nothing written for a broken notebook
    assert build.build(root, check=True) == 1


def test_markers_in_markdown_and_missing_setup_cell_are_errors(root, capsys):
    path = root / "solutions" / FIXTURE.name
    nb = read(path)
    by_id(nb)["demo-06"].source += "\n# BEGIN SOLUTION"
    nbformat.write(nb, path)
    assert build.build(root) == 1
    assert "solutions/99_demo.ipynb, cell 7: solution markers belong in code cells" in capsys.readouterr().err
    nb.cells = [cell for cell in nb.cells if cell.id not in ("demo-01", "demo-06")]
    nbformat.write(nb, path)
    assert build.build(root) == 1
    assert "solutions/99_demo.ipynb: no setup cell" in capsys.readouterr().err


def test_execute_runs_in_place_then_builds(root, capsys):
    solution = root / "solutions" / FIXTURE.name
    build.execute(solution, root)
    outputs = {cell.id: cell.outputs for cell in read(solution).cells if cell.cell_type == "code"}
    assert outputs["demo-05"][0].text.startswith("✅ Exercise 99.1 (add): passed")
    assert outputs["demo-11"][0].text == "5\n"  # the stale outputs were replaced
    assert built(root)

    nb = read(solution)
    by_id(nb)["demo-08"].source = "1 / 0"
    nbformat.write(nb, solution)
    before = solution.read_bytes()
    with pytest.raises(build.BuildError, match=r"99_demo.ipynb: cell 9 \(`1 / 0`\) raised ZeroDivisionError"):
        build.execute(solution, root)
    assert solution.read_bytes() == before  # not saved


def test_bench_measures_a_copy_and_names_a_failing_cell(root, capsys):
    built(root)
    capsys.readouterr()
    solution, chapter = root / "solutions" / FIXTURE.name, root / "chapters" / FIXTURE.name
    before = sorted(root.rglob("*")), solution.read_bytes()
    assert bench.main([str(solution), str(chapter), "--threads", "1", "--markdown"]) == 1
    out, err = capsys.readouterr()
    header, rule, row = out.splitlines()
    assert header.startswith("| notebook | wall-clock | peak memory") and rule.startswith("|---|")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "99_demo" and cells[1].endswith(" s") and cells[3] == "1"
    assert 0.05 < float(cells[2].removesuffix(" GiB")) < 4  # a python kernel holding torch
    assert "chapters/99_demo.ipynb: cell 14 (`print(add(2, 3))`) raised NotImplementedError" in err
    assert (sorted(root.rglob("*")), solution.read_bytes()) == before  # ran on a copy, wrote nothing


def test_real_repository_is_up_to_date():
    if not build.solution_paths(ROOT):
        pytest.skip("no solutions/NN_*.ipynb yet")
    result = subprocess.run([sys.executable, "-m", "utils.build", "--check"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_colab_links_follow_repo_url(root, capsys):
    """A fork edits REPO_URL in utils/course/colab.py; the build points the README's Colab badges at the fork."""
    link = "https://colab.research.google.com/github/someone/old-fork/blob/main/chapters/00_x.ipynb"
    readme = root / "README.md"
    readme.write_text(f"| 00 | [![Open In Colab](badge.svg)]({link}) |\n", encoding="utf-8")
    assert build.build(root, check=True) == 1
    assert "README.md (its Colab links do not point at REPO_URL" in capsys.readouterr().out
    assert "old-fork" in readme.read_text(encoding="utf-8")  # --check changes nothing
    assert build.build(root) == 0
    expected = colab.COLAB_LINK_PREFIX + "chapters/00_x.ipynb"
    assert readme.read_text(encoding="utf-8") == f"| 00 | [![Open In Colab](badge.svg)]({expected}) |\n"
    assert expected.startswith("https://colab.research.google.com/github/" + colab.REPO_URL.split("github.com/")[1])
    assert build.build(root, check=True) == 0
