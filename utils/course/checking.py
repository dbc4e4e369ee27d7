"""The machinery behind every exercise check.

A chapter's checks live in `utils/checks/chNN.py`. Each is a function decorated with `@exercise(...)`:

    @exercise("01", "1.2", "logit_lens", "The logit lens by hand", points=2, reference=_reference_logit_lens)
    def logit_lens(answer, hidden):
        ...call `answer` (the learner's function) on cases and compare with the reference...
        ...raise CheckFailed("a specific, actionable message") when it is wrong...
        return "3 prompts"          # optional: a short note for the pass line

In the notebook the learner calls `check.logit_lens(logit_lens)` and sees one pass line or one specific failure;
later cells use `check.logit_lens.or_reference(logit_lens)`, which is the learner's function once it passes and
the course's reference (saying so in one line) until then.

The grader runs the same check function with hidden=True, in a clean process that never ran learner code: there
`answer` is a stand-in that runs the learner's function in the learner's kernel (see utils/course/remote.py).
So a check talks to `answer` only by calling it, with arguments that are plain data (numbers, strings, lists,
dicts, tensors), course objects made by a `@course_object` factory (the model), or module-level functions.
"""

from __future__ import annotations

import builtins
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

PASS_MARK = "\u2705"  # ✅
FAIL_MARK = "\u274c"  # ❌
TODO_MARK = "\u23f3"  # ⏳
STAND_IN_MARK = "\u21aa"  # ↪
NOT_ATTEMPTED = "not attempted yet"


_hidden_seed = 0


def set_hidden_seed(seed: int) -> None:
    """The grader draws a fresh seed for each grading run; tests and notebooks keep the fixed default."""
    global _hidden_seed
    _hidden_seed = int(seed)


def hidden_generator(salt: int = 0) -> torch.Generator:
    """A generator for hidden cases made of random numbers: fixed (seed `salt`) in tests and notebooks, drawn
    afresh by each grading run, so that a learner cannot precompute the answers to the hidden cases."""
    return torch.Generator().manual_seed(_hidden_seed * 1_000_003 + salt)


class CheckFailed(AssertionError):
    """A wrong answer. The message is shown to the learner as it is, so make it specific."""


class LearnerError(Exception):
    """The learner's code raised, in another process (the grader's kernel); carries its type, message and line.

    `LearnerError.raised(...)` makes one that is also an instance of the built-in exception the learner's code
    raised (a ValueError stays a ValueError), so a check's `except ValueError:` behaves as it does locally."""

    _as_builtin: dict[str, type] = {}

    def __init__(self, type_name: str, message: str, where: str = ""):
        super().__init__(message)
        self.type_name, self.message, self.where = type_name, message, where

    @classmethod
    def raised(cls, type_name: str, message: str, where: str = "") -> "LearnerError":
        base = getattr(builtins, type_name, None)
        if isinstance(base, type) and issubclass(base, Exception) and not issubclass(base, (LearnerError, CheckFailed)):
            if type_name not in cls._as_builtin:
                try:
                    cls._as_builtin[type_name] = type(type_name, (LearnerError, base), {})
                except TypeError:  # an exception type whose layout cannot be mixed in
                    cls._as_builtin[type_name] = LearnerError
            return cls._as_builtin[type_name](type_name, message, where)
        return LearnerError(type_name, message, where)


class ReferenceUsed(Exception):
    """The learner's answer is, wraps or calls the course's own reference implementation of the exercise."""


@dataclass(frozen=True)
class Exercise:
    chapter: str  # "01"
    number: str  # "1.2"
    key: str  # the name the learner's answer has in the notebook, e.g. "logit_lens"
    title: str
    points: int
    check: Callable[[Any, bool], Any]
    reference: Callable | None = None  # the course's implementation: the stand-in, and the grader's tripwire

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

    @property
    def attempted(self) -> bool:
        return not self.message.startswith(NOT_ATTEMPTED)


def run_check(exercise: Exercise, answer: Any, hidden: bool) -> Result:
    """Run one check and turn every outcome into a Result; never raises (but lets KeyboardInterrupt through)."""
    if answer is Ellipsis:  # a value exercise as the learner's notebook has it: `x = ...  # YOUR CODE HERE`
        return Result(exercise, False, f"{NOT_ATTEMPTED} (`{exercise.key}` is still `...`)")
    try:
        note = exercise.check(answer, hidden)
    except CheckFailed as failure:
        return Result(exercise, False, str(failure))
    except NotImplementedError:
        return Result(exercise, False, f"{NOT_ATTEMPTED} (the stub still raises NotImplementedError)")
    except ReferenceUsed as used:
        return Result(exercise, False, str(used))
    except LearnerError as error:  # raised by the learner's code in the grader's kernel
        return Result(exercise, False, f"your code raised {error.type_name}: {error.message}{error.where}")
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


class Check:
    """What the notebook calls: `check.logit_lens(logit_lens)` prints the verdict on the visible cases;
    `check.logit_lens.or_reference(logit_lens)` is the function later cells should use."""

    def __init__(self, entry: Exercise):
        self.exercise = entry
        self.__name__ = entry.key
        self.__doc__ = f"Check your answer to {entry.label}: {entry.title}."
        self._passed: list[tuple[Any, bool, str]] = []  # (answer, passed, message), newest last

    def __call__(self, answer: Any) -> None:
        result = self._run(answer)
        mark = PASS_MARK if result.passed else TODO_MARK if not result.attempted else FAIL_MARK
        print(f"{mark} {self.exercise.label}: {result.message}")

    def __repr__(self) -> str:
        return f"<check for {self.exercise.label}: {self.exercise.title}>"

    def _run(self, answer: Any) -> Result:
        result = run_check(self.exercise, answer, hidden=False)
        self._passed = [seen for seen in self._passed if seen[0] is not answer][-7:]
        self._passed.append((answer, result.passed, result.message))
        return result

    def or_reference(self, answer: Any) -> Any:
        """`answer` if it passes this exercise's check, else the course's reference, saying so in one line."""
        known = [seen for seen in self._passed if seen[0] is answer]
        passed, message = (known[-1][1], known[-1][2]) if known else self._run(answer)[1:]
        if passed:
            return answer
        if self.exercise.reference is None:
            raise RuntimeError(f"{self.exercise.label} has no reference to stand in for it; finish the exercise.")
        why = "yours is not finished yet" if message.startswith(NOT_ATTEMPTED) else "yours does not pass its check yet"
        print(f"{STAND_IN_MARK} Using the course's reference for {self.exercise.label}: {why}.")
        return self.exercise.reference


def exercise(chapter: str, number: str, key: str, title: str, points: int = 1, reference: Callable | None = None):
    """Register a check and return the `Check` the learner calls in the notebook.

    reference: the course's own implementation of the exercise (same signature as the learner's function). It
    stands in for an unfinished exercise (`or_reference`), and while the grader runs the learner's function it is
    replaced by a tripwire, so an answer that is, wraps or calls it earns nothing.
    """

    def register(check: Callable[[Any, bool], Any]) -> Check:
        entry = Exercise(chapter, number, key, title, points, check, reference)
        REGISTRY.setdefault(chapter, {})[key] = entry
        return Check(entry)

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


def as_number(got: Any, what: str, hint: str = "") -> float:
    """`got` as a float (a one-element tensor is read out); anything else, bools included, fails the check."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        raise CheckFailed(f"{what}: expected a number, got {type(got).__name__}.{hint}")
    return float(got)


def expect_number(got: Any, expected: float, what: str, tolerance: float, hint: str = "") -> None:
    hint = f" Hint: {hint}" if hint else ""
    got = as_number(got, what, hint)
    if abs(got - expected) > tolerance:
        raise CheckFailed(f"{what}: expected {expected:.4g} (within {tolerance:g}), got {got:.4g}.{hint}")
