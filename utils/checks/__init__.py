"""One module of checks per chapter: `utils/checks/chNN.py`. Import it in the notebook as `check`."""

import importlib

from utils.course.checking import REGISTRY, Exercise


def chapter_exercises(chapter: str) -> dict[str, Exercise]:
    """The exercises of chapter "NN", in the order they are defined (imports its check module)."""
    importlib.import_module(f"utils.checks.ch{chapter}")
    return REGISTRY.get(chapter, {})
