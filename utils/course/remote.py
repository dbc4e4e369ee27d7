"""Plain-data messages between the grader's clean process and a learner's kernel.

The grader never trusts the learner's process: it runs each check in its own process, where the learner's
answer is a `RemoteAnswer` that sends the call's arguments to the learner's kernel as plain data and reads back
the result as plain data. What may travel:

  - None, bool, int, float, str, and lists, tuples and dicts (string keys) of these;
  - torch tensors and numpy arrays (dtype + shape + raw bytes, in a safetensors file; never pickle);
  - a course object: anything returned by a factory decorated with `@course_object` (the offline model, a toy
    model loaded from data/): it travels as its recipe, and the kernel rebuilds it by calling the same factory;
  - a module-level function of the course (or a functools.partial of one with plain arguments): by its name;
  - a TransformerLens ActivationCache: its tensors, rebuilt around the kernel's copy of the model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

RECIPE = "__workbook_recipe__"


def course_object(factory: Callable) -> Callable:
    """Mark what `factory` returns as rebuildable by name: `factory` must be a module-level function whose
    arguments are plain data and whose result depends only on them (and should be cached)."""

    @functools.wraps(factory)
    def make(*args, **kwargs):
        made = factory(*args, **kwargs)
        try:
            object.__setattr__(made, RECIPE, (f"{factory.__module__}:{factory.__qualname__}", args, kwargs))
        except (AttributeError, TypeError):
            raise TypeError(f"@course_object: {factory.__qualname__} returned a {type(made).__name__}, which cannot "
                            f"carry its recipe; return an object with attributes (e.g. an nn.Module).") from None
        return made

    make.cache_clear = getattr(factory, "cache_clear", None)
    return make


def recipe_of(value: Any):
    """(factory name, args, kwargs) of a course object, else None."""
    return getattr(value, RECIPE, None) if not isinstance(value, type) else None
