"""The suite-cost report sorts tests into the right parts and projects the way BENCHMARKS.md says."""

from utils.course.suitecost import part_of, summarise


def test_parts():
    assert part_of("solutions/02_induction_heads.ipynb::cell 14") == ("chapter", "02")
    assert part_of("tests/test_checks_ch08.py::test_x") == ("chapter", "08")
    assert part_of("tests/test_checks_generic.py::test_has_a_reference[05:5.2:window_layers]") == ("chapter", "05")
    assert part_of("tests/test_chapter_structure.py::test_opens[13_grokking]") == ("chapter", "13")
    assert part_of("tests/test_untouched_chapters.py::test_every_stub[00_orientation:0.1:x]") == ("chapter", "00")
    assert part_of("tests/test_untouched_chapters.py::test_an_untouched_notebook_graded") == ("machinery", None)
    assert part_of("tests/test_browser.py::test_chapter_in_jupyterlab[01_logit_lens]") == ("machinery", None)
    assert part_of("tests/test_grade.py::test_killer") == ("machinery", None)
    assert part_of("tests/test_ablation.py::test_batched") == ("toolkit", None)


def test_projection_adds_the_mean_chapter_and_scales_the_toolkit():
    durations = {"solutions/00_a.ipynb::grade": 60.0, "tests/test_checks_ch00.py::t": 60.0,
                 "solutions/01_b.ipynb::grade": 240.0, "tests/test_grade.py::t": 600.0,
                 "tests/test_toy.py::t": 30.0}
    text = summarise(durations, chapters=4)
    # machinery 600 + toolkit 30 * 4/2 + chapters 120 + 240 + 2 more at their mean 180 = 1380 s = 23.0 min
    assert "**23.0 min**" in text
    assert "| chapter 00 | 120 s | 60 s |" in text
    assert "**all (2 chapters)** | **16.5 min**" in text
