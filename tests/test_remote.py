"""The plain-data messages between the judge and a learner's kernel (utils/course/remote.py), and the kernel's
side of them (utils/course/agent.py), run in this process: what travels, what a reply may not contain, and what
a call brings back besides its result."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from utils.course import agent
from utils.course.remote import (DecodeError, Decoder, EncodeError, Encoder, read_message, recipe_of, tripwire_names,
                                 write_message)
from utils.toy import shipped_toy


def _roundtrip(value, tmp_path, trusted=True, **decoder_options):
    encoder = Encoder()
    write_message(tmp_path / "m", {"value": encoder.encode(value)}, encoder)
    message, tensors = read_message(tmp_path / "m")
    return Decoder(tensors, trusted=trusted, build=agent._build, **decoder_options).decode(message["value"])


def test_plain_data_and_tensors_round_trip(tmp_path):
    x = torch.arange(6.0).reshape(2, 3)
    value = {"a": [1, 2.5, None, True, "s"], 3: (x, x[0].clone()), (1, 2): {"nested": np.arange(4)},
             "special": [math.inf, -math.inf, 2**80, Ellipsis, slice(1, None, 2), torch.bfloat16],
             "ints": torch.tensor([1, 2], dtype=torch.int64), "empty": torch.zeros(0, 3), "flag": torch.tensor(True)}
    back = _roundtrip(value, tmp_path)
    assert back["a"] == [1, 2.5, None, True, "s"]
    assert torch.equal(back[3][0], x) and torch.equal(back[3][1], x[0]) and isinstance(back[3], tuple)
    assert isinstance(back[(1, 2)]["nested"], np.ndarray) and back[(1, 2)]["nested"].tolist() == [0, 1, 2, 3]
    assert back["special"][:3] == [math.inf, -math.inf, 2**80] and back["special"][3] is Ellipsis
    assert back["special"][4] == slice(1, None, 2) and back["special"][5] is torch.bfloat16
    assert back["ints"].dtype == torch.int64 and back["empty"].shape == (0, 3) and back["flag"].item() is True
    assert math.isnan(_roundtrip(float("nan"), tmp_path))


def test_the_same_tensor_twice_travels_once():
    x = torch.ones(3)
    encoder = Encoder()
    encoder.encode([x, x, {"again": x}])
    assert len(encoder.tensors) == 1 and encoder.originals == [x]


def test_course_objects_travel_as_their_recipe_and_are_rebuilt(tmp_path):
    toy = shipped_toy("toy_induction.pt")
    encoder = Encoder()
    encoded = encoder.encode(toy)
    assert encoded["$object"] == "utils.toy:shipped_toy" and encoder.objects == [toy]
    assert _roundtrip(toy, tmp_path) is toy  # the kernel's factory is cached: the same model
    assert recipe_of(toy) == ("utils.toy:shipped_toy", ("toy_induction.pt",), {})


def test_functions_by_name_and_partials(tmp_path):
    fn = functools.partial(agent._build, "utils.toy:shipped_toy")
    back = _roundtrip({"f": tripwire_names, "p": fn}, tmp_path)
    assert back["f"] is tripwire_names and back["p"].func is agent._build and back["p"].args == fn.args


def test_what_cannot_travel_is_named():
    with pytest.raises(EncodeError, match="cannot send"):
        Encoder().encode(lambda x: x)
    with pytest.raises(EncodeError, match="set"):
        Encoder().encode({1, 2})


@pytest.mark.parametrize("tag", [{"$object": "os:system", "args": ["echo pwned"], "kwargs": {"$dict": []}},
                                 {"$function": "os:system"},
                                 {"$partial": {"$function": "os:system"}, "args": [], "kwargs": {"$dict": []}}])
def test_a_reply_cannot_make_the_judge_build_or_call_anything(tmp_path, tag):
    (tmp_path / "r.json").write_text(json.dumps({"result": tag}))
    message, tensors = read_message(tmp_path / "r")
    with pytest.raises(DecodeError):
        Decoder(tensors, trusted=False).decode(message["result"])


def test_a_reply_may_name_an_object_the_judge_sent(tmp_path):
    toy = shipped_toy("toy_induction.pt")
    (tmp_path / "r.json").write_text(json.dumps({"result": Encoder().encode(toy)}))
    message, tensors = read_message(tmp_path / "r")
    assert Decoder(tensors, trusted=False, known=[toy]).decode(message["result"]) is toy


@pytest.mark.parametrize("content, why", [("{", "not valid JSON"), ("[" * 100_000 + "]" * 100_000, "valid JSON|nested")])
def test_broken_replies_are_decode_errors(tmp_path, content, why):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(DecodeError, match=why):
        message, tensors = read_message(tmp_path / "r")
        Decoder(tensors, trusted=False).decode(message)


def test_missing_reply_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="no reply"):
        read_message(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------------
# The agent, called in this process the way the judge calls it in a kernel.
# ---------------------------------------------------------------------------------------------------------


def _reference_scale(x, factor):
    return x * factor


def _call(tmp_path, namespace, args, tripwires=()):
    encoder = Encoder()
    message = {"op": "call", "target": {"$answer": "answer"}, "args": encoder.encode(list(args)),
               "kwargs": encoder.encode({}), "rng": encoder.encode(torch.get_rng_state()), "grad": False,
               "tripwires": list(tripwires)}
    write_message(tmp_path / "req", message, encoder)
    agent.serve(str(tmp_path / "req"), namespace)
    reply, tensors = read_message(tmp_path / "req.reply")
    return reply, Decoder(tensors, trusted=False, handle=lambda data: data)


def test_agent_returns_the_result_and_what_the_function_did_to_its_arguments(tmp_path):
    def answer(x, factor):
        x.mul_(factor)  # in place: the check's copy must change too
        torch.rand(1)  # advances the global generator
        return x.sum().item()

    state = torch.get_rng_state()
    reply, decoder = _call(tmp_path, {"answer": answer}, [torch.ones(3), 2.0])
    assert decoder.decode(reply["result"]) == 6.0
    [[index, value]] = reply["mutated"]
    assert index == 0 and torch.equal(decoder.decode(value), torch.full((3,), 2.0))
    assert not torch.equal(decoder.decode(reply["rng"]), state)


def test_agent_reports_errors_with_the_learners_line_and_stubs_as_not_implemented(tmp_path):
    def answer(x, factor):
        raise ValueError("shapes do not match")

    reply, _ = _call(tmp_path, {"answer": answer}, [torch.ones(3), 2.0])
    assert reply["error"]["type"] == "ValueError" and "shapes do not match" in reply["error"]["message"]
    assert "raise ValueError" in reply["error"]["where"]

    def stub(x, factor):
        raise NotImplementedError("Exercise 9.9: write your code here")

    reply, _ = _call(tmp_path, {"answer": stub}, [torch.ones(3), 2.0])
    assert reply["error"]["type"] == "NotImplementedError"


def test_results_that_are_not_plain_data_come_back_as_handles(tmp_path):
    def answer(x, factor):
        return lambda y: y * factor

    reply, decoder = _call(tmp_path, {"answer": answer}, [torch.ones(3), 2.0])
    handle = decoder.decode(reply["result"])
    assert handle["callable"] is True and handle["$handle"] in agent._handles


@pytest.mark.parametrize("make", [
    lambda ref: ref,  # the reference itself
    lambda ref: (lambda x, factor: ref(x, factor)),  # a wrapper that calls it
    lambda ref: (lambda x, factor, _r=ref: _r(x, factor) + 0),  # captured as a default argument
    lambda ref: functools.wraps(ref)(lambda x, factor: x * factor),  # claims to be it
])
def test_the_reference_is_a_tripwire_while_the_answer_runs(tmp_path, make):
    name = f"{__name__}:_reference_scale"
    reply, _ = _call(tmp_path, {"answer": make(_reference_scale)}, [torch.ones(3), 2.0], tripwires=[name])
    assert reply.get("reference_used") is True and "result" not in reply
    assert torch.equal(_reference_scale(torch.ones(2), 3.0), torch.full((2,), 3.0))  # restored afterwards


def test_an_honest_answer_passes_the_tripwire(tmp_path):
    name = f"{__name__}:_reference_scale"
    reply, decoder = _call(tmp_path, {"answer": lambda x, factor: x * factor}, [torch.ones(3), 2.0], tripwires=[name])
    assert "reference_used" not in reply and torch.equal(decoder.decode(reply["result"]), torch.full((3,), 2.0))


def test_the_learners_exception_keeps_its_builtin_type_in_the_judge():
    from utils.course.checking import LearnerError

    error = LearnerError.raised("ValueError", "' interpretability' is 2 tokens", " (at line 7)")
    assert isinstance(error, ValueError) and isinstance(error, LearnerError) and error.where == " (at line 7)"
    assert isinstance(LearnerError.raised("KeyError", "blocks.0.hook_z"), KeyError)
    assert type(LearnerError.raised("SomethingOfTheLearners", "x")) is LearnerError
    assert not isinstance(LearnerError.raised("CheckFailed", "x"), AssertionError)  # never a verdict
