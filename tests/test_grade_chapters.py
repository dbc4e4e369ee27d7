"""The grader on a real chapter (minutes): chapter 00 as learners hand it in."""

from __future__ import annotations

import nbformat
import pytest

from tests.test_grade import needs_sandbox, results, variant
from utils.course import grade
from utils.course.notebooks import ROOT, read


@pytest.mark.slow
@needs_sandbox
def test_realistic_submissions_of_a_real_chapter(tmp_path):
    """Chapter 00 as learners hand it in: an exercise left unfinished between finished ones, answers wrong in
    plausible ways (the wrong axis, a missing term, tiling KV heads instead of interleaving them), and cells moved
    around. Each gets exactly the points it earned, with a message naming the mistake."""
    solution = ROOT / "solutions" / "00_orientation.ipynb"
    unfinished = variant(solution, tmp_path / "unfinished" / "00_orientation.ipynb", replace={
        "81c53da0": ("    tokens = model.to_tokens(prompt)", "    raise NotImplementedError\n    tokens = model.to_tokens(prompt)")})
    wrong = variant(solution, tmp_path / "wrong" / "00_orientation.ipynb", replace={
        "afdee97b": (' + cache[f"blocks.{layer}.hook_attn_out"]', ""),
        "e064da27": ("pattern[:, 1:, 0].mean(dim=-1)", "pattern[:, 1:, 0].mean(dim=0)"),
        "ce17d355": ("kv.repeat_interleave(group, dim=2)", "kv.repeat(1, 1, group, 1)")})
    reordered = tmp_path / "reordered" / "00_orientation.ipynb"
    nb = read(solution)
    moved = next(cell for cell in nb.cells if cell.get("id") == "ce17d355")  # Exercise 0.5 moved up to the top
    nb.cells.remove(moved)
    nb.cells.insert(2, moved)
    reordered.parent.mkdir()
    nbformat.write(nb, reordered)

    grades = dict(zip(["unfinished", "wrong", "reordered"],
                      grade.grade_all([unfinished, wrong, reordered], jobs=2, expected_chapter="00")))
    # Exercise 0.5's cell now runs before `import torch`: only it is lost, and the message says why.
    full = {row.key: row.max_points for row in grades["reordered"].rows}
    reordered_rows = results(grades["reordered"])
    assert grades["reordered"].points == sum(full.values()) - full["expand_kv_heads"], grades["reordered"].rows
    assert reordered_rows["expand_kv_heads"][2].startswith(
        "`expand_kv_heads` is not defined: cell 3, which defines it, raised NameError: name 'torch' is not defined")

    unfinished_rows = results(grades["unfinished"])
    assert [key for key, (passed, _, _) in unfinished_rows.items() if not passed] == ["head_ablation_drop"], \
        unfinished_rows
    assert "not attempted yet" in unfinished_rows["head_ablation_drop"][2]
    assert grades["unfinished"].points == sum(full.values()) - full["head_ablation_drop"]

    wrong_rows = results(grades["wrong"])
    assert sorted(key for key, (passed, _, _) in wrong_rows.items() if not passed) == [
        "bos_attention", "expand_kv_heads", "reconstruct_resid_post"], wrong_rows
    for key in ("bos_attention", "expand_kv_heads", "reconstruct_resid_post"):
        message = wrong_rows[key][2]
        assert message and "Traceback" not in message and len(message) < 600, (key, message)
    assert "shape" in wrong_rows["bos_attention"][2]
    assert "interleave" in wrong_rows["expand_kv_heads"][2] or "h // group" in wrong_rows["expand_kv_heads"][2]
    assert "attn_out" in wrong_rows["reconstruct_resid_post"][2] or "attention" in wrong_rows["reconstruct_resid_post"][2]
