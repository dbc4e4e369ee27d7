"""The learner-kernel side of grading: run the learner's function on the grader's inputs, return plain data.

The grader (utils/course/judge.py) writes a request into the sandbox's scratch folder and runs, in the learner's
kernel, `serve(path, globals())`. This module reads the request, calls the learner's function (or describes the
answers), and writes the reply next to it. Nothing here decides a grade: whatever it writes is treated by the
grader as the learner's own output, so a learner who tampers with this module only changes their own answers.

While the learner's function runs, the exercise's reference implementation is a tripwire: its code is swapped
for code that records the call and raises, so an answer that is, wraps or calls the course's reference earns
nothing (the grader is told, and says so).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from utils.course.remote import Decoder, Encoder, EncodeError, read_message, resolve, write_message

_handles: dict[int, Any] = {}  # results that are not plain data, kept for later calls
_built: dict[str, Any] = {}  # course objects rebuilt in this kernel, by recipe
_tripped: list[str] = []


class ReferenceTripped(BaseException):  # not an Exception: a learner's `except Exception` must not hide it
    pass


def _trip(*args, **kwargs):
    # Runs with the reference's globals: find this module again by import, not by a global name.
    agent = __import__("utils.course.agent", fromlist=["_tripped"])
    agent._tripped.append("called")
    raise agent.ReferenceTripped()


def _build(name: str, args: list, kwargs: dict) -> Any:
    key = repr((name, args, kwargs))
    if key not in _built:
        factory = resolve(name)
        _built[key] = factory(*args, **kwargs)
    made = _built[key]
    if hasattr(made, "reset_hooks"):
        made.reset_hooks()  # each call starts from a model without hooks
    return made


def _store(value: Any) -> dict:
    handle = len(_handles) + 1
    _handles[handle] = value
    return {"$handle": handle, "type": type(value).__qualname__, "callable": callable(value)}


def _lookup_handle(data: dict) -> Any:
    if data.get("$handle") not in _handles:
        raise KeyError("unknown handle")
    return _handles[data["$handle"]]


def _message(error: BaseException) -> str:
    """The exception's own argument when it is one string (KeyError('x') travels as x, not as "'x'")."""
    return error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)


def _learner_frame(error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/utils/" not in f.filename.replace("\\", "/")]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at line {frame.lineno}: `{(frame.line or '').strip()[:120]}`)"


class _Tripwires:
    """Swap each reference function's code for `_trip` while the learner's function runs."""

    def __init__(self, names: list[str]):
        self.functions = []
        for name in names:
            try:
                function = resolve(name)
            except Exception:
                continue
            code = getattr(function, "__code__", None)
            if code is not None and not code.co_freevars:
                self.functions.append((function, code))

    def __enter__(self):
        _tripped.clear()
        for function, _ in self.functions:
            function.__code__ = _trip.__code__
        return self

    def __exit__(self, *exc):
        for function, code in self.functions:
            function.__code__ = code

    def is_reference(self, answer: Any) -> bool:
        seen, value = set(), answer
        while value is not None and id(value) not in seen:  # functools.wraps chains, partials
            seen.add(id(value))
            if any(value is function for function, _ in self.functions):
                return True
            if any(getattr(value, "__code__", None) is code for _, code in self.functions):
                return True
            value = getattr(value, "__wrapped__", None) or getattr(value, "func", None)
        return False


def _describe(namespace: dict, keys: list[str], encoder: Encoder) -> dict:
    answers = {}
    for key in keys:
        if key not in namespace:
            answers[key] = {"defined": False}
            continue
        value = namespace[key]
        if callable(value):
            answers[key] = {"defined": True, "callable": True, "type": type(value).__qualname__}
            continue
        try:
            answers[key] = {"defined": True, "callable": False, "value": encoder.encode(value, key)}
        except EncodeError:
            answers[key] = {"defined": True, "callable": False, "value": _store(value)}
    return {"answers": answers}


def _call(request: dict, namespace: dict, decoder: Decoder, encoder: Encoder) -> dict:
    target = request["target"]
    if "$answer" in target:
        function = namespace.get(target["$answer"])
        if function is None:
            return {"error": {"type": "NameError", "message": f"{target['$answer']} is not defined"}}
    else:
        function = _lookup_handle(target)
    args = decoder.decode(request["args"])
    kwargs = decoder.decode(request["kwargs"])
    tensors = {index: value for index, value in decoder.decoded_tensors.items() if isinstance(value, torch.Tensor)}
    before = {index: value.clone() for index, value in tensors.items()}
    if request.get("rng") is not None:
        torch.set_rng_state(decoder.decode(request["rng"]))
    torch.set_grad_enabled(bool(request.get("grad", True)))
    tripwires = _Tripwires(request.get("tripwires", []))
    reply: dict = {}
    if tripwires.is_reference(function):
        reply["reference_used"] = True
    else:
        try:
            with tripwires:
                result = function(*args, **kwargs)
            reply["result"] = encoder.encode(result, "the result")
        except ReferenceTripped:
            pass
        except NotImplementedError as error:
            reply["error"] = {"type": "NotImplementedError", "message": str(error)[:500]}
        except Exception as error:
            reply["error"] = {"type": type(error).__name__, "message": _message(error)[:1000],
                              "where": _learner_frame(error)}
        if _tripped:
            reply = {"reference_used": True}
    reply["mutated"] = [[index, encoder.encode(value)] for index, value in tensors.items()
                        if value.shape != before[index].shape or not torch.equal(value, before[index])]
    reply["hooks"] = [[i, [name for name, point in getattr(obj, "hook_dict", {}).items() if point.has_hooks()]]
                      for i, obj in enumerate(_objects_in(args, kwargs))]
    reply["rng"] = encoder.encode(torch.get_rng_state())
    return reply


def _objects_in(args, kwargs) -> list:
    """The course objects among the arguments, in the order the grader encoded them."""
    found: list = []

    def visit(value):
        if id(value) in {id(v) for v in _built.values()}:
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(key)
                visit(item)
        elif type(value).__name__ == "ActivationCache":
            visit(value.model)

    visit(list(args))
    visit(kwargs)
    return found


def serve(path: str, namespace: dict) -> None:
    """Answer the request at `path` (.json/.safetensors) with a reply at `path` + '.reply'."""
    encoder = Encoder(handles=_store)
    try:
        request, tensors = read_message(Path(path))
        decoder = Decoder(tensors, trusted=True, handle=_lookup_handle, build=_build)
        if request["op"] == "describe":
            reply = _describe(namespace, request["keys"], encoder)
        else:
            reply = _call(request, namespace, decoder, encoder)
    except BaseException as error:  # noqa: BLE001 - everything becomes a reply; KeyboardInterrupt included
        if isinstance(error, KeyboardInterrupt):
            raise
        encoder = Encoder()
        reply = {"error": {"type": type(error).__name__, "message": str(error)[:1000], "where": _learner_frame(error),
                           "agent": True}}
    try:
        write_message(Path(path + ".reply"), reply, encoder)
    except EncodeError as error:
        write_message(Path(path + ".reply"), {"error": {"type": "TypeError", "message": str(error)}}, Encoder())
    sys.stdout.flush()
