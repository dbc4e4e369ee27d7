"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def model():
    """The offline SmolLM2 as the checks see it (hooks cleared), with gradients off for the module's tests and
    the grad mode restored afterwards (later modules train models)."""
    from utils.models import model_for_checks

    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    yield model_for_checks()
    torch.set_grad_enabled(previous)
