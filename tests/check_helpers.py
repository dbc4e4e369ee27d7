"""Shared by tests/test_checks_chNN.py: run a check the way the grader does (hidden cases on) and assert on it."""

from __future__ import annotations

from typing import Any

from utils.course.checking import Result, run_check

# Chapters written before the standard (AUTHORING.md); each leaves this set when it is rebuilt to it.
PREDATE_THE_STANDARD: set[str] = set()


def passes(check, answer) -> Result:
    """Assert the check accepts `answer`. `check` is what the notebook calls, e.g. `ch01.logit_lens`."""
    result = run_check(check.exercise, answer, hidden=True)
    assert result.passed, result.message
    return result


def rejected(check, answer, *fragments: str) -> Result:
    """Assert the check rejects `answer` as wrong (not as unattempted), naming every fragment (any case)."""
    result = run_check(check.exercise, answer, hidden=True)
    assert not result.passed, f"a wrong answer passed: {result.message}"
    assert result.attempted, result.message
    for fragment in fragments:
        assert fragment.lower() in result.message.lower(), result.message
    return result


def stub(*args, **kwargs):
    """An untouched exercise, as the learner's notebook has it."""
    raise NotImplementedError("Exercise: write your code here")


def _copy(value: Any) -> Any:
    """A deep copy that detaches tensors, so a replayed answer cannot be changed by the check that receives it."""
    import copy

    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def replay_of_visible_outputs(exercise):
    """What a learner who hard-codes answers would hand in: the reference's outputs on the *visible* cases of
    `exercise` (an Exercise, `check.x.exercise`), in the order the check asked for them, returned whatever the
    inputs (the last one repeated once they run out)."""
    outputs: list = []

    def recording(*args, **kwargs):
        out = exercise.reference(*args, **kwargs)
        outputs.append(_copy(out))
        return out

    result = run_check(exercise, recording, hidden=False)
    assert result.passed, f"the reference fails the visible cases: {result.message}"
    assert outputs, "the check never called the answer"
    calls = iter(range(10**9))

    def replay(*args, **kwargs):
        return _copy(outputs[min(next(calls), len(outputs) - 1)])

    return replay
