"""pytest configuration shared by tests/ and the nbval run over solutions/."""

import pytest


def pytest_collection_modifyitems(items):
    # Executing a chapter notebook takes minutes: mark every nbval cell slow, so `-m "not slow"` skips them.
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)
