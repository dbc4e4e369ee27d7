"""utils/course/nbtest.py, the plugin that executes each solution notebook once: what it compares, and that a
changed output fails its cell (and only its cell) while a number from training may move in its last digit."""

from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import pytest

from utils.course import nbtest
from utils.course.notebooks import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "99_demo.ipynb"


def test_numbers_close_allows_the_last_digit_and_nothing_else():
    assert nbtest.numbers_close("share [1.0, 0.7, 0.6]", "share [1.0, 0.8, 0.6]")
    assert nbtest.numbers_close("loss 3.14 at step 200", "loss 3.15 at step 200")
    assert nbtest.numbers_close("ICL -0.0", "ICL 0.0")
    assert not nbtest.numbers_close("loss 3.14 at step 200", "loss 3.64 at step 200")
    assert not nbtest.numbers_close("loss 3.1 at step 200", "loss 3.1 at step 300")  # 50 %, not a last digit
    assert not nbtest.numbers_close("heads [1, 2]", "heads [1, 2, 3]")
    assert not nbtest.numbers_close("passed", "failed")


def test_chaotic_numbers_mask_every_number_but_keep_the_text():
    assert nbtest.same_but_numbers("per seed: [1350, 900, 4000] faster on every seed: True",
                                   "per seed: [1300, 900, 4000] faster on every seed: True")
    assert not nbtest.same_but_numbers("faster on every seed: True", "faster on every seed: False")
    assert not nbtest.same_but_numbers("per seed: [100, 700]", "per seed: [100, 700, 500]")


def test_output_text_keeps_stdout_results_and_errors_not_stderr_or_rich_output():
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="a\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="warning\n"),
                    nbformat.v4.new_output("display_data", data={"text/html": "<b>", "text/plain": "| t |"}),
                    nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])]
    assert nbtest.output_text(cell) == "a\n| t |\nValueError: bad\n"
    patterns = nbtest._sanitizers()
    assert nbtest.sanitize("at 0x7f00ab12 and 45%|####| 9/20 [00:01<00:02]", patterns) == \
        "at 0xADDRESS and PROGRESS-BAR"


@pytest.mark.slow
def test_plugin_fails_a_changed_output_but_not_a_moved_last_digit(tmp_path):
    """The fixture chapter executed, then one stored output changed and one number nudged in a tagged cell."""
    folder = tmp_path / "solutions"
    folder.mkdir()
    nb = nbformat.read(FIXTURE, as_version=4)
    cells = {cell.id: cell for cell in nb.cells}
    cells["demo-11"].outputs = [nbformat.v4.new_output("stream", name="stdout", text="6\n")]  # add(2, 3) prints 5
    cells["demo-09"].source = 'print("the answer is", answer + 0.01)'
    cells["demo-09"].metadata["tags"] = ["approx-numbers"]
    cells["demo-09"].outputs = [nbformat.v4.new_output("stream", name="stdout", text="the answer is 42.02\n")]
    cells["demo-05"].outputs = [nbformat.v4.new_output("stream", name="stdout",
                                                       text="✅ Exercise 99.1 (add): passed (2 cases)\n")]
    cells["demo-08"].outputs = [nbformat.v4.new_output("stream", name="stdout",
                                                       text="✅ Exercise 99.2 (answer): passed\n")]
    cells["demo-14"].outputs = [nbformat.v4.new_output("stream", name="stdout",
                                                       text="✅ Exercise 99.3 (centre): passed (1 tensors)\n")]
    cells["demo-01"].source = "import sys; sys.path.insert(0, %r)" % str(ROOT)
    nbformat.write(nb, folder / "99_demo.ipynb")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", "--rootdir",
                           str(tmp_path), "-c", os.devnull, "-p", "utils.course.nbtest", str(folder)],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    changed = [cell.id for cell in nb.cells].index("demo-11") + 1
    assert len(failed) == 1 and f"cell {changed} " in failed[0], done.stdout[-3000:]
    assert "-6" in done.stdout and "+5" in done.stdout  # the diff names both
