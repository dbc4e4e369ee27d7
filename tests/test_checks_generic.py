"""What every registered exercise must satisfy, whatever its chapter:

- it is a function exercise with a reference implementation (`@exercise(..., reference=...)`);
- the reference passes its check, hidden cases included, whatever random draw a grading run makes for them
  (the grader draws a fresh hidden seed each time: a check that fails the reference on one draw in six fails
  one learner in six);
- the stub the learner starts from is reported as "not attempted", not as wrong;
- a hard-coded answer (the reference's outputs on the visible cases, replayed whatever the inputs) is rejected
  once the hidden cases run: a learner cannot get credit by copying what the notebook showed.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import time

import pytest

import utils.checks
from tests.check_helpers import PREDATE_THE_STANDARD, replay_of_visible_outputs, stub
from utils.course.checking import REGISTRY, run_check, set_hidden_seed

for module in pkgutil.iter_modules(utils.checks.__path__):
    importlib.import_module(f"utils.checks.{module.name}")
EXERCISES = [entry for chapter in sorted(REGISTRY) if chapter not in PREDATE_THE_STANDARD
             for entry in REGISTRY[chapter].values()]


def entry_id(entry) -> str:
    return f"{entry.chapter}:{entry.number}:{entry.key}"


IDS = [entry_id(entry) for entry in EXERCISES]


@pytest.fixture(scope="module", autouse=True)
def no_grad_leaks():
    import torch

    previous = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(previous)


_seed0_seconds: dict[str, float] = {}


@pytest.mark.parametrize("entry", EXERCISES, ids=IDS)
def test_has_a_reference_that_passes_the_hidden_cases(entry):
    assert callable(entry.reference), f"{entry.label}: give @exercise a reference= implementation"
    started = time.perf_counter()
    result = run_check(entry, entry.reference, hidden=True)
    _seed0_seconds[entry.label] = time.perf_counter() - started
    assert result.passed, result.message


DRAWN = [entry for entry in EXERCISES if "hidden_generator" in inspect.getsource(inspect.getmodule(entry.check))]
HIDDEN_SEEDS = range(1, 33)
SWEEP_SECONDS = 4.0  # per check, so that the sweep stays a small part of the suite's budget
CHEAP = 0.5  # only checks whose hidden cases run this fast are swept; the others keep the one draw above


@pytest.mark.parametrize("entry", DRAWN, ids=[entry_id(entry) for entry in DRAWN])
def test_reference_passes_whatever_the_hidden_draw(entry):
    if _seed0_seconds.get(entry.label, 0.0) > CHEAP:
        pytest.skip(f"its hidden cases take {_seed0_seconds[entry.label]:.1f} s: swept at the default seed only")
    started = time.perf_counter()
    try:
        for seed in HIDDEN_SEEDS:
            set_hidden_seed(seed)
            result = run_check(entry, entry.reference, hidden=True)
            assert result.passed, f"{entry.label}, hidden seed {seed}: {result.message}"
            if time.perf_counter() - started > SWEEP_SECONDS:
                break
    finally:
        set_hidden_seed(0)


@pytest.mark.parametrize("entry", EXERCISES, ids=IDS)
def test_stub_is_not_attempted(entry):
    result = run_check(entry, stub, hidden=True)
    assert not result.passed and not result.attempted, result.message
    assert result.message.startswith("not attempted"), result.message


@pytest.mark.parametrize("entry", EXERCISES, ids=IDS)
def test_hard_coded_visible_outputs_are_rejected(entry):
    replay = replay_of_visible_outputs(entry)
    result = run_check(entry, replay, hidden=True)
    assert not result.passed, f"{entry.label}: replaying the visible cases' outputs passes: {result.message}"
