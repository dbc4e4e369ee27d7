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
        ("0.1", "single_token_id"), ("0.2", "reconstruct_resid_post"), ("0.3", "decompose_resid"),
        ("0.4", "per_token_loss"), ("0.5", "record_activations"), ("0.6", "head_ablation_drop"),
        ("0.7", "bos_attention"), ("0.8", "expand_kv_heads"), ("0.9", "attention_by_hand"),
        ("0.10", "generate_with_kv_cache")]
    assert all(entry.reference is not None for entry in EXERCISES.values())


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


# 0.6 ---------------------------------------------------------------------------------------------------


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


# 0.7 ---------------------------------------------------------------------------------------------------


def test_bos_attention():
    assert_passes("bos_attention", ch00._reference_bos_attention)


def test_bos_attention_mistakes():
    assert_rejected("bos_attention", lambda p: p[:, :, 0].mean(-1), "query position 0")
    assert_rejected("bos_attention", lambda p: p[:, 0, 1:].mean(-1), "from* position 0")
    assert_rejected("bos_attention", lambda p: p[:, 1:, 0], "expected shape")
    assert_rejected("bos_attention", lambda p: p[:, 1:, 1].mean(-1), "values differ")


# 0.8 ---------------------------------------------------------------------------------------------------


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


# 0.3 ---------------------------------------------------------------------------------------------------


def test_decompose_resid():
    assert_passes("decompose_resid", ch00._reference_decompose_resid)


def test_decompose_resid_mistakes():
    def no_embed(model, cache, layer):
        components, labels = ch00._reference_decompose_resid(model, cache, layer)
        return components[1:], labels[1:]

    assert_rejected("decompose_resid", no_embed, "embedding")

    def whole_attention(model, cache, layer):
        components, labels = [cache["blocks.0.hook_resid_pre"]], ["embed"]
        for block in range(layer + 1):
            components += [cache[f"blocks.{block}.hook_attn_out"], cache[f"blocks.{block}.hook_mlp_out"]]
            labels += [f"L{block}attn", f"L{block}MLP"]
        return torch.stack(components), labels

    assert_rejected("decompose_resid", whole_attention, "heads")

    def one_block_short(model, cache, layer):
        return ch00._reference_decompose_resid(model, cache, layer - 1) if layer else \
            ch00._reference_decompose_resid(model, cache, layer)

    assert_rejected("decompose_resid", one_block_short, "range(layer + 1)")

    def mlp_first(model, cache, layer):
        components, labels = ch00._reference_decompose_resid(model, cache, layer)
        order = [0] + [i for block in range(layer + 1) for i in [10 * block + 10] + list(range(10 * block + 1, 10 * block + 10))]
        return components[order], labels

    assert_rejected("decompose_resid", mlp_first, "order")

    def bad_labels(model, cache, layer):
        components, labels = ch00._reference_decompose_resid(model, cache, layer)
        return components, [label.replace("MLP", "mlp") for label in labels]

    assert_rejected("decompose_resid", bad_labels, "label")
    assert_rejected("decompose_resid", lambda m, c, l: ch00._reference_decompose_resid(m, c, l)[0], "pair")


# 0.4 ---------------------------------------------------------------------------------------------------


def test_per_token_loss():
    assert_passes("per_token_loss", ch00._reference_per_token_loss)

    def with_cross_entropy(logits, tokens):
        flat = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return flat.view(tokens.shape[0], -1)

    assert_passes("per_token_loss", with_cross_entropy)


def test_per_token_loss_mistakes():
    ref = ch00._reference_per_token_loss
    assert_rejected("per_token_loss", lambda l, t: -ref(l, t), "sign")
    assert_rejected("per_token_loss", lambda l, t: ref(l, t).mean(), "one number")
    assert_rejected("per_token_loss", lambda l, t: -l[:, :-1].log_softmax(-1).gather(-1, t[:, :-1, None])[..., 0],
                    "shift")
    assert_rejected("per_token_loss", lambda l, t: -l[:, 1:].log_softmax(-1).gather(-1, t[:, 1:, None])[..., 0],
                    "first position")
    assert_rejected("per_token_loss", lambda l, t: -l[:, :-1].gather(-1, t[:, 1:, None])[..., 0], "log_softmax")
    assert_rejected("per_token_loss", lambda l, t: torch.exp(-ref(l, t)), "probabilities")
    assert_rejected("per_token_loss", lambda l, t: -l.log_softmax(-1).gather(-1, t[..., None])[..., 0],
                    "position - 1")


# 0.5 ---------------------------------------------------------------------------------------------------


def test_record_activations():
    assert_passes("record_activations", ch00._reference_record_activations)


def test_record_activations_mistakes(model):
    def by_hook_name(m, tokens, names):
        recorded = {}

        def record(activation, hook):
            recorded[hook.name] = activation.clone()

        m.run_with_hooks(tokens, fwd_hooks=[(name, record) for name in names])
        return recorded

    assert_rejected("record_activations", by_hook_name, "hook.name")

    def leaves_hooks(m, tokens, names):
        recorded = {}
        for name in names:
            m.add_hook(name, lambda activation, hook, name=name: recorded.__setitem__(name, activation.clone()))
        m(tokens)
        return recorded

    assert_rejected("record_activations", leaves_hooks, "left a hook")
    assert not ch00._hooks_left(model)

    def first_only(m, tokens, names):
        return {name: value for name, value in ch00._reference_record_activations(m, tokens, names[:1]).items()}

    assert_rejected("record_activations", first_only, "keys")

    def wrong_prompt(m, tokens, names):
        return ch00._reference_record_activations(m, tokens[:, :-1], names)

    assert_rejected("record_activations", wrong_prompt, "shape")
    assert_rejected("record_activations", lambda m, t, n: list(n), "dict")


# 0.9 ---------------------------------------------------------------------------------------------------


def test_attention_by_hand():
    assert_passes("attention_by_hand", ch00._reference_attention_by_hand)


def _attention(q, k, v, scale=None, mask=True, axis=-1, tile=False, diagonal=1, z_layout="bqhd"):
    group = q.shape[2] // k.shape[2]
    if q.shape[2] % k.shape[2]:
        raise ValueError("uneven")
    expand = (lambda t: t.repeat(1, 1, group, 1)) if tile else (lambda t: t.repeat_interleave(group, dim=2))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, expand(k)) / (q.shape[-1] ** 0.5 if scale is None else scale)
    if mask:
        n = q.shape[1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(diagonal), float("-inf"))
    pattern = scores.softmax(axis)
    return pattern, torch.einsum(f"bhqk,bkhd->{z_layout}", pattern, expand(v))


def test_attention_by_hand_mistakes():
    assert_rejected("attention_by_hand", lambda q, k, v: _attention(q, k, v, scale=1.0), "sqrt(d_head)")
    assert_rejected("attention_by_hand", lambda q, k, v: _attention(q, k, v, scale=q.shape[-1]), "divided by d_head")
    assert_rejected("attention_by_hand", lambda q, k, v: _attention(q, k, v, mask=False), "causal mask")
    assert_rejected("attention_by_hand", lambda q, k, v: _attention(q, k, v, axis=-2), "softmax over queries")
    assert_rejected("attention_by_hand", lambda q, k, v: _attention(q, k, v, tile=True), "grouped")
    assert_rejected("attention_by_hand", lambda q, k, v: _attention(q, k, v, diagonal=0), "diagonal")
    assert_rejected("attention_by_hand", lambda q, k, v: _attention(q, k, v, z_layout="bhqd"), "[batch, pos, head")

    def never_raises(q, k, v):
        if q.shape[2] % k.shape[2]:
            return torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[1]), torch.zeros_like(q)
        return _attention(q, k, v)

    assert_rejected("attention_by_hand", never_raises, "ValueError")
    assert_rejected("attention_by_hand", lambda q, k, v: _attention(q, k, v)[0], "pair")


# 0.10 --------------------------------------------------------------------------------------------------


def test_generate_with_kv_cache():
    assert_passes("generate_with_kv_cache", ch00._reference_generate_with_kv_cache)
    assert_passes("generate_with_kv_cache", ch00._greedy_by_recomputing)


def test_generate_with_kv_cache_mistakes():
    def with_prompt(m, prompt, n):
        ids, logits = ch00._reference_generate_with_kv_cache(m, prompt, n)
        return torch.cat([m.to_tokens(prompt)[0], ids]), logits

    assert_rejected("generate_with_kv_cache", with_prompt, "not the prompt")

    def late_logits(m, prompt, n):
        ids, logits = ch00._greedy_by_recomputing(m, prompt, n + 1)
        return ids[:n], logits[1:]

    assert_rejected("generate_with_kv_cache", late_logits, "one step late")

    def no_cache_feed_one(m, prompt, n):  # feeds only the new token but forgets the cache: loses the context
        tokens = m.to_tokens(prompt)
        logits = m(tokens)[0, -1]
        ids, steps = [], []
        for _ in range(n):
            steps.append(logits)
            ids.append(logits.argmax())
            logits = m(ids[-1].view(1, 1))[0, -1]
        return torch.stack(ids), torch.stack(steps)

    assert_rejected("generate_with_kv_cache", no_cache_feed_one, "past_key_values")
    assert_rejected("generate_with_kv_cache", lambda m, p, n: ch00._reference_generate_with_kv_cache(m, p, n)[0], "pair")
