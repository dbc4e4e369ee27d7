"""Plain-data messages between the grader's clean process and a learner's kernel.

The grader never trusts the learner's process. It runs each check in a process of its own, where the learner's
answer is a `RemoteAnswer`: calling it writes the call's arguments as plain data into the sandbox's scratch
folder, has the kernel run the learner's function on them (utils/course/agent.py), and reads the result back
as plain data. The comparison, the reference's results and the message are all made in the clean process; the
kernel never holds the check, the expected values, or anything that becomes a verdict.

What may travel (`encode`; the grader decodes the kernel's replies with `trusted=False`, which allows only plain
data, tensors and handles):
  - None, bool, int, float (inf and nan too), str, and lists, tuples and dicts of these;
  - torch tensors and numpy arrays: dtype + shape + raw bytes, in a safetensors file (never pickle);
  - a course object, i.e. anything a factory decorated with `@course_object` returned (the offline model, a
    shipped toy): it travels as its recipe, and the kernel rebuilds it by calling the same factory;
  - a module-level function of the course, or a functools.partial of one with plain arguments: by its name;
  - a TransformerLens ActivationCache: its tensors, rebuilt around the kernel's copy of its model;
  - from the kernel only: a handle to a result that is not plain data (a function, a module), which the
    grader can call but not look inside.
Besides the result, a call brings back what the learner's function did to its arguments: tensors it modified in
place, hooks it left on a model, and the state of torch's global random generator.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

RECIPE = "__workbook_recipe__"
MAX_JSON_BYTES = 32 * 2**20  # what the grader reads of one reply, at most
MAX_TENSOR_BYTES = 1 * 2**30


class EncodeError(TypeError):
    """A value that cannot travel between the grader and the kernel; the message says what it was."""


class DecodeError(ValueError):
    """A reply that is not the plain data it should be (a broken or tampered kernel)."""


# ---------------------------------------------------------------------------------------------------------
# Course objects: things a check passes by recipe.
# ---------------------------------------------------------------------------------------------------------


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

    make.__wrapped_factory__ = factory
    return make


def recipe_of(value: Any):
    """(factory name, args, kwargs) of a course object, else None."""
    if isinstance(value, type):
        return None
    try:
        return value.__dict__.get(RECIPE) if hasattr(value, "__dict__") else None
    except Exception:
        return None


def resolve(name: str) -> Any:
    """'package.module:qualified.name' -> the object (only the grader's own requests are resolved this way)."""
    module_name, _, qualname = name.partition(":")
    if not module_name or not qualname:
        raise DecodeError(f"{name!r} is not a 'module:name'")
    value: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def function_name(value: Any) -> str | None:
    """The 'module:qualname' of a module-level course function that resolves back to `value`, else None."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    name = f"{module}:{qualname}"
    try:
        return name if resolve(name) is value else None
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------------
# Encoding: value -> JSON-able structure + a list of tensors.
# ---------------------------------------------------------------------------------------------------------


class Encoder:
    """Turns values into JSON with tensors set aside (`self.tensors`); the same tensor object twice is stored
    once, and `self.originals[i]` is the object that tensor i came from (to copy in-place changes back)."""

    def __init__(self, handles: Callable[[Any], dict] | None = None):
        self.tensors: list[torch.Tensor] = []
        self.originals: list[Any] = []
        self._index: dict[int, int] = {}
        self.objects: list[Any] = []  # course objects, in order (their hooks are reported back)
        self._handles = handles  # the kernel side: stores a non-plain value and returns its handle

    def tensor(self, value: Any, kind: str) -> dict:
        if id(value) not in self._index:
            tensor = torch.from_numpy(value) if kind == "$ndarray" else value
            tensor = tensor.detach().to("cpu")
            self._index[id(value)] = len(self.tensors)
            self.tensors.append(tensor.contiguous().clone() if tensor.numel() else tensor.contiguous())
            self.originals.append(value)
        return {kind: self._index[id(value)]}

    def encode(self, value: Any, where: str = "value") -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value if abs(value) < 2**53 else {"$int": str(value)}
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            return self.tensor(value, "$tensor")
        if type(value).__module__ == "numpy":
            import numpy

            if isinstance(value, numpy.ndarray):
                return self.tensor(value, "$ndarray")
            if isinstance(value, numpy.generic):
                return self.encode(value.item(), where)
        if isinstance(value, list):
            return [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if isinstance(value, dict):
            return {"$dict": [[self.encode(k, f"{where} key"), self.encode(v, f"{where}[{k!r}]")]
                              for k, v in value.items()]}
        if value is Ellipsis:
            return {"$ellipsis": True}
        if isinstance(value, slice):
            return {"$slice": [self.encode(value.start), self.encode(value.stop), self.encode(value.step)]}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, RemoteHandle):
            return {"$handle": value.handle_id}
        recipe = recipe_of(value)
        if recipe is not None:
            name, args, kwargs = recipe
            self.objects.append(value)
            return {"$object": name, "args": self.encode(list(args)), "kwargs": self.encode(dict(kwargs))}
        if type(value).__name__ == "ActivationCache" and hasattr(value, "cache_dict"):
            return {"$cache": self.encode(dict(value.cache_dict), where), "model": self.encode(value.model, where)}
        if isinstance(value, functools.partial):
            return {"$partial": self.encode(value.func, where), "args": self.encode(list(value.args), where),
                    "kwargs": self.encode(dict(value.keywords), where)}
        if callable(value) and function_name(value):
            return {"$function": function_name(value)}
        if self._handles is not None:
            return self._handles(value)
        raise EncodeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which the grader cannot "
                          f"send to a learner's kernel (see AUTHORING.md: what a check may pass)")


def write_message(path: Path, message: Any, encoder: Encoder) -> None:
    """`path`.json (the structure) and, if there are tensors, `path`.safetensors (their bytes)."""
    from safetensors.torch import save_file

    body = json.dumps(message, allow_nan=False)
    if encoder.tensors:
        save_file({str(i): tensor for i, tensor in enumerate(encoder.tensors)}, str(path) + ".safetensors")
    Path(str(path) + ".json").write_text(body, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Decoding: JSON + tensors -> values. Untrusted input (the kernel's replies) allows plain data only.
# ---------------------------------------------------------------------------------------------------------


def read_message(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The JSON structure and the tensors of a message, with size limits (a hostile kernel writes these)."""
    from safetensors.torch import load

    json_path, tensor_path = Path(str(path) + ".json"), Path(str(path) + ".safetensors")
    if not json_path.is_file():
        raise DecodeError("the kernel wrote no reply")
    if json_path.stat().st_size > MAX_JSON_BYTES:
        raise DecodeError(f"the reply is over {MAX_JSON_BYTES // 2**20} MB")
    try:
        message = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as error:
        raise DecodeError(f"the reply is not valid JSON ({type(error).__name__})") from None
    tensors: dict[str, torch.Tensor] = {}
    if tensor_path.is_file():
        if tensor_path.stat().st_size > MAX_TENSOR_BYTES:
            raise DecodeError(f"the reply's tensors are over {MAX_TENSOR_BYTES // 2**30} GB")
        try:
            tensors = load(tensor_path.read_bytes())
        except Exception as error:
            raise DecodeError(f"the reply's tensors are unreadable ({type(error).__name__})") from None
    return message, tensors


class Decoder:
    """trusted=True (the kernel reading the grader's request) builds course objects and resolves functions;
    trusted=False (the grader reading the kernel's reply) allows plain data, tensors and handles, plus course
    objects and caches only when they stand for an object the grader itself sent (`known`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], trusted: bool, handle: Callable[[dict], Any] | None = None,
                 build: Callable[[str, list, dict], Any] | None = None, known: list | None = None):
        self.tensors, self.trusted, self._handle, self._build = tensors, trusted, handle, build
        self.known = {repr(recipe_of(obj)[:1] + (list(recipe_of(obj)[1]), dict(recipe_of(obj)[2]))): obj
                      for obj in known or [] if recipe_of(obj) is not None}
        self.decoded_tensors: dict[int, Any] = {}

    def _tensor(self, index: Any, numpy_array: bool):
        if not isinstance(index, int) or str(index) not in self.tensors:
            raise DecodeError("a tensor reference points at no tensor")
        if index not in self.decoded_tensors:
            tensor = self.tensors[str(index)]
            self.decoded_tensors[index] = tensor.numpy() if numpy_array else tensor
        return self.decoded_tensors[index]

    def decode(self, data: Any, depth: int = 0) -> Any:
        if depth > 64:
            raise DecodeError("the reply is nested too deeply")
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, list):
            return [self.decode(item, depth + 1) for item in data]
        if not isinstance(data, dict) or len(data) == 0:
            raise DecodeError(f"unexpected {type(data).__name__} in the reply")
        tag = next(iter(data))
        if tag == "$tensor":
            return self._tensor(data[tag], numpy_array=False)
        if tag == "$ndarray":
            return self._tensor(data[tag], numpy_array=True)
        if tag == "$tuple":
            return tuple(self.decode(data[tag], depth + 1))
        if tag == "$dict":
            pairs = data[tag]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise DecodeError("a malformed dict in the reply")
            out = {}
            for key, value in pairs:
                key = self.decode(key, depth + 1)
                try:
                    out[key] = self.decode(value, depth + 1)
                except TypeError:
                    raise DecodeError("an unhashable dict key in the reply") from None
            return out
        if tag == "$int" and isinstance(data[tag], str) and len(data[tag]) < 400:
            return int(data[tag])
        if tag == "$float" and data[tag] in ("inf", "-inf", "nan"):
            return float(data[tag])
        if tag == "$ellipsis":
            return Ellipsis
        if tag == "$slice":
            return slice(*self.decode(data[tag], depth + 1))
        if tag == "$dtype" and isinstance(data[tag], str) and isinstance(getattr(torch, data[tag], None), torch.dtype):
            return getattr(torch, data[tag])
        if tag == "$handle" and self._handle is not None:
            return self._handle(data)
        if not self.trusted and tag == "$object":
            key = repr((data.get("$object"), self.decode(data.get("args"), depth + 1),
                        self.decode(data.get("kwargs"), depth + 1)))
            if key not in self.known:
                raise DecodeError("the reply names a course object the grader did not send")
            return self.known[key]
        if not self.trusted and tag == "$cache" and isinstance(data.get("$cache"), dict):
            from transformer_lens.ActivationCache import ActivationCache

            tensors = self.decode(data["$cache"], depth + 1)
            if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
                raise DecodeError("a cache in the reply holds something other than named tensors")
            return ActivationCache(tensors, self.decode(data["model"], depth + 1))
        if not self.trusted:
            raise DecodeError(f"the reply holds a {tag!r}, which only the grader may send")
        if tag == "$object":
            return self._build(data[tag], self.decode(data["args"], depth + 1), self.decode(data["kwargs"], depth + 1))
        if tag == "$function":
            return resolve(data[tag])
        if tag == "$partial":
            return functools.partial(self.decode(data[tag], depth + 1), *self.decode(data["args"], depth + 1),
                                     **self.decode(data["kwargs"], depth + 1))
        if tag == "$cache":
            from transformer_lens.ActivationCache import ActivationCache

            return ActivationCache(self.decode(data[tag], depth + 1), self.decode(data["model"], depth + 1))
        raise DecodeError(f"unknown tag {tag!r} in the message")


# ---------------------------------------------------------------------------------------------------------
# The grader's side: answers that live in the kernel.
# ---------------------------------------------------------------------------------------------------------


class RemoteHandle:
    """A value the learner's function returned that is not plain data (a function, a module): it stays in the
    kernel; calling this calls it there."""

    def __init__(self, session, handle_id: int, type_name: str, is_callable: bool):
        self._session, self.handle_id, self.type_name, self._callable = session, handle_id, type_name, is_callable

    def __call__(self, *args, **kwargs):
        if not self._callable:
            raise TypeError(f"'{self.type_name}' object is not callable")
        return self._session.call({"$handle": self.handle_id}, args, kwargs)

    def __repr__(self) -> str:
        return f"<{self.type_name} in the learner's kernel>"


class RemoteAnswer(RemoteHandle):
    """The learner's answer to one exercise, by its name in the notebook; `reference` is the exercise's
    reference implementation, swapped for a tripwire in the kernel while the answer runs."""

    def __init__(self, session, key: str, type_name: str, tripwires: list[str]):
        super().__init__(session, -1, type_name, True)
        self.key, self.tripwires = key, tripwires

    def __call__(self, *args, **kwargs):
        return self._session.call({"$answer": self.key}, args, kwargs, self.tripwires)

    def __repr__(self) -> str:
        return f"<the learner's {self.key}>"


def tripwire_names(reference: Any) -> list[str]:
    """The course names under which an exercise's reference can be found (empty if it has none)."""
    name = function_name(reference) if reference is not None else None
    return [name] if name else []
