"""The machinery behind every exercise check.

A chapter's checks live in `utils/checks/chNN.py`. Each is a function decorated with `@exercise(...)`:

    @exercise("01", "1.2", "logit_lens", "The logit lens by hand", points=2)
    def logit_lens(answer, hidden):
        ...compare `answer` (the learner's function or value) with the reference...
        ...raise CheckFailed("a specific, actionable message") when it is wrong...
        return "3 prompts"          # optional: a short note for the pass line

In the notebook the learner calls `check.logit_lens(logit_lens)` and sees one pass line or one specific failure.
The grader calls `run_check(...)` with `hidden=True`, which adds cases the learner's notebook never shows.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

PASS_MARK = "\u2705"  # ✅
FAIL_MARK = "\u274c"  # ❌
TODO_MARK = "\u23f3"  # ⏳


class CheckFailed(AssertionError):
    """A wrong answer. The message is shown to the learner as it is, so make it specific."""


@dataclass(frozen=True)
class Exercise:
    chapter: str  # "01"
    number: str  # "1.2"
    key: str  # the name the learner's answer has in the notebook, e.g. "logit_lens"
    title: str
    points: int
    check: Callable[[Any, bool], Any]

    @property
    def label(self) -> str:
        return f"Exercise {self.number} ({self.key})"


REGISTRY: dict[str, dict[str, Exercise]] = {}


@dataclass(frozen=True)
class Result:
    exercise: Exercise
    passed: bool
    message: str

    @property
    def points(self) -> int:
        return self.exercise.points if self.passed else 0


def run_check(exercise: Exercise, answer: Any, hidden: bool) -> Result:
    """Run one check and turn every outcome into a Result; never raises."""
    try:
        note = exercise.check(answer, hidden)
    except CheckFailed as failure:
        return Result(exercise, False, str(failure))
    except NotImplementedError:
        return Result(exercise, False, "not attempted yet (the stub still raises NotImplementedError)")
    except Exception as error:  # the learner's code crashed inside the check
        where = _last_learner_frame(error)
        return Result(exercise, False, f"your code raised {type(error).__name__}: {error}{where}")
    return Result(exercise, True, f"passed{f' ({note})' if note else ''}")


def _last_learner_frame(error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/utils/" not in f.filename.replace("\\", "/")]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at line {frame.lineno}: `{(frame.line or '').strip()}`)"


def exercise(chapter: str, number: str, key: str, title: str, points: int = 1):
    """Register a check and return the function the learner calls in the notebook."""

    def register(check: Callable[[Any, bool], Any]) -> Callable[[Any], None]:
        entry = Exercise(chapter, number, key, title, points, check)
        REGISTRY.setdefault(chapter, {})[key] = entry

        def learner_check(answer: Any) -> None:
            result = run_check(entry, answer, hidden=False)
            if result.passed:
                print(f"{PASS_MARK} {entry.label}: {result.message}")
            elif result.message.startswith("not attempted"):
                print(f"{TODO_MARK} {entry.label}: {result.message}")
            else:
                print(f"{FAIL_MARK} {entry.label}: {result.message}")

        learner_check.__name__ = key
        learner_check.__doc__ = f"Check your answer to {entry.label}: {title}."
        learner_check.exercise = entry
        return learner_check

    return register


# ---------------------------------------------------------------------------------------------------------
# Comparisons that produce messages a learner can act on.
# ---------------------------------------------------------------------------------------------------------


def expect_tensor(got: Any, expected: torch.Tensor, what: str, atol: float = 1e-4, rtol: float = 1e-4,
                  hint: str = "") -> None:
    """Fail with a specific message unless `got` is a tensor equal to `expected` (shape, dtype kind, values)."""
    hint = f" Hint: {hint}" if hint else ""
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.{hint}")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}.{hint}")
    if got.dtype.is_floating_point != expected.dtype.is_floating_point:
        raise CheckFailed(f"{what}: expected a {expected.dtype} tensor, got {got.dtype}.{hint}")
    got = got.detach().to("cpu", expected.dtype)
    expected = expected.detach().to("cpu")
    if torch.isnan(got).any() and not torch.isnan(expected).any():
        raise CheckFailed(f"{what}: your tensor contains NaN.{hint}")
    if not torch.allclose(got, expected, atol=atol, rtol=rtol, equal_nan=True):
        error = (got - expected).abs()
        index = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
        raise CheckFailed(
            f"{what}: values differ from the reference (largest difference {error.max().item():.3g} at index "
            f"{index}: yours {got[index].item():.4g}, expected {expected[index].item():.4g}).{hint}"
        )


def expect_callable(answer: Any, what: str) -> None:
    if not callable(answer):
        raise CheckFailed(f"{what}: expected a function, got {type(answer).__name__}. Pass the function itself, "
                          f"without calling it.")


def expect_number(got: Any, expected: float, what: str, tolerance: float, hint: str = "") -> None:
    hint = f" Hint: {hint}" if hint else ""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        raise CheckFailed(f"{what}: expected a number, got {type(got).__name__}.{hint}")
    if abs(got - expected) > tolerance:
        raise CheckFailed(f"{what}: expected {expected:.4g} (within {tolerance:g}), got {got:.4g}.{hint}")
