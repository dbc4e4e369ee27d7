"""What every registered exercise must satisfy, whatever its chapter:

- it is a function exercise with a reference implementation (`@exercise(..., reference=...)`);
- the reference passes its check, hidden cases included;
- the stub the learner starts from is reported as "not attempted", not as wrong;
- a hard-coded answer (the reference's outputs on the visible cases, replayed whatever the inputs) is rejected
  once the hidden cases run: a learner cannot get credit by copying what the notebook showed.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import utils.checks
from tests.check_helpers import PREDATE_THE_STANDARD, replay_of_visible_outputs, stub
from utils.course.checking import REGISTRY, run_check

for module in pkgutil.iter_modules(utils.checks.__path__):
    importlib.import_module(f"utils.checks.{module.name}")
EXERCISES = [entry for chapter in sorted(REGISTRY) if chapter not in PREDATE_THE_STANDARD
             for entry in REGISTRY[chapter].values()]
IDS = [f"{entry.chapter}:{entry.number}:{entry.key}" for entry in EXERCISES]


@pytest.fixture(scope="module", autouse=True)
def no_grad_leaks():
    import torch

    previous = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(previous)


@pytest.mark.parametrize("entry", EXERCISES, ids=IDS)
def test_has_a_reference_that_passes_the_hidden_cases(entry):
    assert callable(entry.reference), f"{entry.label}: give @exercise a reference= implementation"
    result = run_check(entry, entry.reference, hidden=True)
    assert result.passed, result.message


@pytest.mark.parametrize("entry", EXERCISES, ids=IDS)
def test_stub_is_not_attempted(entry):
    result = run_check(entry, stub, hidden=True)
    assert not result.passed and not result.attempted, result.message


@pytest.mark.parametrize("entry", EXERCISES, ids=IDS)
def test_hard_coded_visible_outputs_are_rejected(entry):
    replay = replay_of_visible_outputs(entry)
    result = run_check(entry, replay, hidden=True)
    assert not result.passed, f"{entry.label}: replaying the visible cases' outputs passes: {result.message}"
