"""Chapter 00's checks: each reference passes with the hidden cases, each plausible mistake is rejected with a
message naming it, and an untouched stub is reported as not attempted."""

import pytest
import torch

from utils.course.checking import run_check
from utils.checks import ch00, chapter_exercises
from utils.models import model_for_checks

EXERCISES = chapter_exercises("00")


@pytest.fixture(scope="module", autouse=True)
def _model_loaded(model):  # every test here uses the shared `model` fixture (tests/conftest.py)
    return model


def result(key, answer):
    return run_check(EXERCISES[key], answer, hidden=True)


def assert_passes(key, answer):
    outcome = result(key, answer)
    assert outcome.passed, outcome.message


def assert_rejected(key, answer, *words):
    outcome = result(key, answer)
    assert not outcome.passed
    for word in words:
        assert word in outcome.message, outcome.message
    return outcome.message


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 0.x: ...")


def test_registered_in_order():
    assert [(e.number, e.key) for e in EXERCISES.values()] == [
        ("0.1", "single_token_id"), ("0.2", "reconstruct_resid_post"), ("0.3", "head_ablation_drop"),
        ("0.4", "bos_attention"), ("0.5", "expand_kv_heads")]


@pytest.mark.parametrize("key", list(EXERCISES))
def test_stub_is_not_attempted(key):
    outcome = result(key, stub)
    assert not outcome.passed and outcome.message.startswith("not attempted")


# 0.1 ---------------------------------------------------------------------------------------------------


def test_single_token_id():
    assert_passes("single_token_id", ch00._reference_single_token_id)
    # returning a tensor element is accepted too
    assert_passes("single_token_id", lambda m, w: ch00._reference_single_token_id(m, w) + torch.tensor(0))


def test_single_token_id_mistakes():
    assert_rejected("single_token_id", lambda m, w: int(m.to_tokens(w, prepend_bos=False)[0, 0]), "leading space")
    assert_rejected("single_token_id", lambda m, w: int(m.to_tokens(" " + w)[0, 0]), "BOS")

    def never_raises(m, w):
        return int(m.to_tokens(" " + w, prepend_bos=False)[0, 0])

    assert_rejected("single_token_id", never_raises, "should raise ValueError", "interpretability")
    assert_rejected("single_token_id", lambda m, w: m.to_str_tokens(" " + w, prepend_bos=False)[0], "expected a token id")


# 0.2 ---------------------------------------------------------------------------------------------------


def part(cache, layer, name):
    return cache[f"blocks.{layer}.{name}"]


def test_reconstruct_resid_post():
    assert_passes("reconstruct_resid_post", lambda c, l: part(c, l, "hook_resid_pre") + part(c, l, "hook_attn_out")
                  + part(c, l, "hook_mlp_out"))
    assert_passes("reconstruct_resid_post", lambda c, l: part(c, l, "hook_resid_mid") + part(c, l, "hook_mlp_out"))


def test_reconstruct_resid_post_mistakes():
    assert_rejected("reconstruct_resid_post", lambda c, l: part(c, l, "hook_resid_pre") + part(c, l, "hook_attn_out"),
                    "MLP")
    assert_rejected("reconstruct_resid_post", lambda c, l: part(c, l, "hook_attn_out") + part(c, l, "hook_mlp_out"),
                    "resid_pre")
    assert_rejected("reconstruct_resid_post", lambda c, l: part(c, l, "hook_resid_mid") + part(c, l, "hook_attn_out")
                    + part(c, l, "hook_mlp_out"), "twice")
    assert_rejected("reconstruct_resid_post", lambda c, l: part(c, l, "hook_resid_post"), "does not hold")
    assert_rejected("reconstruct_resid_post", lambda c, l: part(c, l, "hook_resid_pre")[0], "expected shape")


# 0.3 ---------------------------------------------------------------------------------------------------


def test_head_ablation_drop():
    assert_passes("head_ablation_drop", ch00._reference_head_ablation_drop)


def test_head_ablation_drop_mistakes(model):
    assert_rejected("head_ablation_drop", lambda *a: -ch00._reference_head_ablation_drop(*a), "sign")

    def whole_layer(m, prompt, target, layer, head):
        tokens, target_id = m.to_tokens(prompt), m.to_single_token(target)
        clean = m(tokens)[0, -1, target_id]
        return (clean - ch00._logits_with_heads_zeroed(m, tokens, layer, slice(None))[0, -1, target_id]).item()

    assert_rejected("head_ablation_drop", whole_layer, "all 9 heads")

    def log_probs(m, prompt, target, layer, head):
        tokens, target_id = m.to_tokens(prompt), m.to_single_token(target)
        clean = m(tokens)[0, -1].log_softmax(-1)[target_id]
        ablated = ch00._logits_with_heads_zeroed(m, tokens, layer, [head])[0, -1].log_softmax(-1)[target_id]
        return (clean - ablated).item()

    assert_rejected("head_ablation_drop", log_probs, "log-probability")

    def leaves_hook(m, prompt, target, layer, head):
        m.add_hook(f"blocks.{layer}.attn.hook_z", lambda z, hook: z)
        return ch00._reference_head_ablation_drop(m, prompt, target, layer, head)

    assert_rejected("head_ablation_drop", leaves_hook, "left a hook")
    assert not ch00._hooks_left(model)
    assert_rejected("head_ablation_drop", lambda *a: "big", "expected a number")


# 0.4 ---------------------------------------------------------------------------------------------------


def test_bos_attention():
    assert_passes("bos_attention", ch00._reference_bos_attention)


def test_bos_attention_mistakes():
    assert_rejected("bos_attention", lambda p: p[:, :, 0].mean(-1), "query position 0")
    assert_rejected("bos_attention", lambda p: p[:, 0, 1:].mean(-1), "from* position 0")
    assert_rejected("bos_attention", lambda p: p[:, 1:, 0], "expected shape")
    assert_rejected("bos_attention", lambda p: p[:, 1:, 1].mean(-1), "values differ")


# 0.5 ---------------------------------------------------------------------------------------------------


def test_expand_kv_heads():
    assert_passes("expand_kv_heads", ch00._reference_expand_kv_heads)

    def by_index(kv, n_heads):
        group = n_heads // kv.shape[2]
        return kv[:, :, [h // group for h in range(n_heads)]]

    assert_passes("expand_kv_heads", by_index)


def test_expand_kv_heads_mistakes():
    assert_rejected("expand_kv_heads", lambda kv, n: kv.repeat(1, 1, n // kv.shape[2], 1), "repeat_interleave")
    assert_rejected("expand_kv_heads", lambda kv, n: kv.repeat_interleave(3, dim=2), "a [3, 5, 2, 8] tensor",
                    "expected shape")
    assert_rejected("expand_kv_heads", lambda kv, n: kv.repeat_interleave(n // kv.shape[2], dim=1),
                    "expected shape")
