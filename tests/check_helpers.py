"""Shared by tests/test_checks_chNN.py: run a check the way the grader does (hidden cases on) and assert on it."""

from utils.course.checking import Result, run_check


def passes(check, answer) -> Result:
    """Assert the check accepts `answer`. `check` is what the notebook calls, e.g. `ch01.logit_lens`."""
    result = run_check(check.exercise, answer, hidden=True)
    assert result.passed, result.message
    return result


def rejected(check, answer, *fragments: str) -> Result:
    """Assert the check rejects `answer` as wrong (not as unattempted), naming every fragment (any case)."""
    result = run_check(check.exercise, answer, hidden=True)
    assert not result.passed, f"a wrong answer passed: {result.message}"
    assert not result.message.startswith("not attempted"), result.message
    for fragment in fragments:
        assert fragment.lower() in result.message.lower(), result.message
    return result


def stub(*args, **kwargs):
    """An untouched exercise, as the learner's notebook has it."""
    raise NotImplementedError("Exercise: write your code here")
