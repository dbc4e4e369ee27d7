"""Checks for chapter 00 — Orientation: TransformerLens 4 and the offline model zoo."""

from __future__ import annotations

import torch

from utils.course.checking import CheckFailed, expect_callable, expect_number, expect_tensor, exercise
from utils.models import model_for_checks

# ---------------------------------------------------------------------------------------------------------
# Cases. The notebook shows the visible ones; the grader (hidden=True) adds the others.
# ---------------------------------------------------------------------------------------------------------

PROMPT = "The capital of France is"
HIDDEN_PROMPT = "The capital of Germany is"

SINGLE_WORDS = ["Paris", "cat", "London"]
HIDDEN_SINGLE_WORDS = ["Berlin", "Tokyo", "hello"]
MULTI_WORDS = ["interpretability"]
HIDDEN_MULTI_WORDS = ["Eiffel", "Mechanistic", "2024"]

RESID_LAYERS = [0, 7]
HIDDEN_RESID_LAYERS = [15, 29]

# (prompt, target, layer, head)
ABLATIONS = [(PROMPT, " Paris", 23, 4), (PROMPT, " Paris", 1, 3)]
HIDDEN_ABLATIONS = [(PROMPT, " Paris", 0, 8), (HIDDEN_PROMPT, " Berlin", 14, 8)]

BOS_LAYERS = [0, 3]
HIDDEN_BOS_LAYERS = [10, 22]

KV_LAYERS = [3]
HIDDEN_KV_LAYERS = [17]


def _tokens(model, prompt: str) -> torch.Tensor:
    return model.to_tokens(prompt)


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.1 — One word, one token
# ---------------------------------------------------------------------------------------------------------


def _reference_single_token_id(model, word: str) -> int:
    ids = model.to_tokens(" " + word, prepend_bos=False)[0]
    if ids.numel() != 1:
        raise ValueError(f"' {word}' is {ids.numel()} tokens: {model.to_str_tokens(' ' + word, prepend_bos=False)}")
    return int(ids[0])


def _as_token_id(got, what: str) -> int:
    if isinstance(got, torch.Tensor) and got.numel() == 1 and not got.dtype.is_floating_point:
        return int(got.item())
    if isinstance(got, int) and not isinstance(got, bool):
        return got
    raise CheckFailed(f"{what}: expected a token id (a Python int), got {type(got).__name__}"
                      f"{f' of shape {tuple(got.shape)}' if isinstance(got, torch.Tensor) else ''}.")


@exercise("00", "0.1", "single_token_id", "One word, one token", points=1)
def single_token_id(answer, hidden):
    expect_callable(answer, "single_token_id")
    model = model_for_checks()
    bos_id = model.tokenizer.bos_token_id
    words = SINGLE_WORDS + (HIDDEN_SINGLE_WORDS if hidden else [])
    for word in words:
        expected = _reference_single_token_id(model, word)
        got = _as_token_id(answer(model, word), f"single_token_id(model, {word!r})")
        if got == expected:
            continue
        if got == bos_id:
            raise CheckFailed(f"single_token_id(model, {word!r}) returned {got}, the id of the BOS token "
                              f"{model.tokenizer.bos_token!r}: model.to_tokens prepends it. Skip it "
                              f"(prepend_bos=False) or take the token after it.")
        without_space = model.to_tokens(word, prepend_bos=False)[0]
        if without_space.numel() == 1 and got == int(without_space[0]):
            raise CheckFailed(f"single_token_id(model, {word!r}) returned {got}, the id of {word!r} without a "
                              f"leading space; the word in the middle of a sentence is {' ' + word!r} "
                              f"(id {expected}). Did you forget the leading space?")
        raise CheckFailed(f"single_token_id(model, {word!r}) returned {got}, expected {expected} "
                          f"(the id of {' ' + word!r}).")
    multi = MULTI_WORDS + (HIDDEN_MULTI_WORDS if hidden else [])
    for word in multi:
        pieces = model.to_str_tokens(" " + word, prepend_bos=False)
        try:
            got = answer(model, word)
        except ValueError:
            continue
        raise CheckFailed(f"single_token_id(model, {word!r}) returned {got!r}, but {' ' + word!r} is "
                          f"{len(pieces)} tokens {pieces}: it should raise ValueError.")
    return f"{len(words)} single-token words, {len(multi)} multi-token words"


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.2 — Rebuild the residual stream
# ---------------------------------------------------------------------------------------------------------

_RESID_PARTS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_mid")


def _resid_cache(model, prompt: str, layers: list[int]):
    """A cache with the parts of the given layers, and separately the true resid_post of each layer."""
    parts = {f"blocks.{layer}.{part}" for layer in layers for part in _RESID_PARTS}
    posts = {f"blocks.{layer}.hook_resid_post" for layer in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens(model, prompt), names_filter=lambda name: name in parts | posts)
    truth = {layer: cache[f"blocks.{layer}.hook_resid_post"] for layer in layers}
    for name in posts:
        del cache.cache_dict[name]  # the learner rebuilds it; reading it from the cache is not allowed
    return cache, truth


@exercise("00", "0.2", "reconstruct_resid_post", "Rebuild the residual stream", points=1)
def reconstruct_resid_post(answer, hidden):
    expect_callable(answer, "reconstruct_resid_post")
    model = model_for_checks()
    layers = RESID_LAYERS + (HIDDEN_RESID_LAYERS if hidden else [])
    prompts = [PROMPT] + ([HIDDEN_PROMPT] if hidden else [])
    for prompt in prompts:
        cache, truth = _resid_cache(model, prompt, layers)
        for layer in layers:
            try:
                got = answer(cache, layer)
            except KeyError as error:
                raise CheckFailed(
                    f"layer {layer}: your function read {error} from the cache, which this check's cache does not "
                    f"hold. Build resid_post from blocks.{layer}.hook_resid_pre, hook_attn_out and hook_mlp_out "
                    f"(the cache holds only {', '.join(_RESID_PARTS)} of each layer)."
                ) from None
            expected = truth[layer]
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.allclose(
                    got, expected, atol=1e-3, rtol=1e-4):
                pre, attn, mlp, mid = (cache[f"blocks.{layer}.{part}"] for part in _RESID_PARTS)
                for wrong, why in [
                    (pre + attn, "you left out the MLP's output (hook_mlp_out)"),
                    (pre + mlp, "you left out the attention output (hook_attn_out)"),
                    (attn + mlp, "you left out resid_pre: each block adds to the stream, it does not replace it"),
                    (mid + attn + mlp, "resid_mid already contains attn_out, so you counted it twice"),
                ]:
                    if torch.allclose(got, wrong, atol=1e-3, rtol=1e-4):
                        raise CheckFailed(f"layer {layer}, prompt {prompt!r}: {why}.")
            expect_tensor(got, expected, f"layer {layer}, prompt {prompt!r}", atol=1e-3,
                          hint="resid_post = resid_pre + attn_out + mlp_out, all from the same layer.")
    return f"{len(layers)} layers, {len(prompts)} prompt{'s' if len(prompts) > 1 else ''}"


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.3 — Zero-ablate one head
# ---------------------------------------------------------------------------------------------------------


def _logits_with_heads_zeroed(model, tokens: torch.Tensor, layer: int, heads) -> torch.Tensor:
    def ablate(z, hook):
        z[:, :, heads, :] = 0.0
        return z

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])


def _reference_head_ablation_drop(model, prompt: str, target: str, layer: int, head: int) -> float:
    tokens = model.to_tokens(prompt)
    target_id = model.to_single_token(target)
    with torch.no_grad():
        clean = model(tokens)[0, -1, target_id]
        ablated = _logits_with_heads_zeroed(model, tokens, layer, [head])[0, -1, target_id]
    return (clean - ablated).item()


def _hooks_left(model) -> list[str]:
    return [name for name, point in model.hook_dict.items() if point.has_hooks()]


@exercise("00", "0.3", "head_ablation_drop", "Zero-ablate one head", points=2)
def head_ablation_drop(answer, hidden):
    expect_callable(answer, "head_ablation_drop")
    model = model_for_checks()
    cases = ABLATIONS + (HIDDEN_ABLATIONS if hidden else [])
    for prompt, target, layer, head in cases:
        what = f"head_ablation_drop(model, {prompt!r}, {target!r}, layer={layer}, head={head})"
        got = answer(model, prompt, target, layer, head)
        left = _hooks_left(model)
        model.reset_hooks()
        if left:
            raise CheckFailed(f"{what} left a hook on the model ({left[0]}), so every later forward pass is "
                              f"ablated too. Use model.run_with_hooks (it removes its hooks) or call "
                              f"model.reset_hooks().")
        expected = _reference_head_ablation_drop(model, prompt, target, layer, head)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - expected) > 2e-3:
            tokens = model.to_tokens(prompt)
            target_id = model.to_single_token(target)
            with torch.no_grad():
                clean = model(tokens)[0, -1]
                whole = _logits_with_heads_zeroed(model, tokens, layer, slice(None))[0, -1]
                one = _logits_with_heads_zeroed(model, tokens, layer, [head])[0, -1]
            log_prob_drop = (clean.log_softmax(-1) - one.log_softmax(-1))[target_id].item()
            if abs(got + expected) <= 2e-3:
                raise CheckFailed(f"{what}: got {got:.4g}, expected {expected:.4g}: the sign is flipped. The drop "
                                  f"is clean logit minus ablated logit.")
            if abs(got - (clean - whole)[target_id].item()) <= 2e-3:
                raise CheckFailed(f"{what}: got {got:.4g}, which is what zeroing all {model.cfg.n_heads} heads of "
                                  f"layer {layer} gives. Zero only head {head}: z[:, :, head, :] = 0.")
            if abs(got - log_prob_drop) <= 2e-3:
                raise CheckFailed(f"{what}: got {got:.4g}, the drop in log-probability; the exercise asks for the "
                                  f"drop in the raw logit of {target!r} (expected {expected:.4g}).")
        expect_number(got, expected, what, tolerance=2e-3,
                      hint="zero hook_z of that head at every position, and read the logit of the target at the "
                           "last position.")
    return f"{len(cases)} (layer, head) pairs"


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.4 — The attention sink
# ---------------------------------------------------------------------------------------------------------


def _reference_bos_attention(pattern: torch.Tensor) -> torch.Tensor:
    return pattern[:, 1:, 0].mean(dim=-1)


def _bos_patterns(model, hidden: bool) -> list[tuple[str, torch.Tensor]]:
    layers = BOS_LAYERS + (HIDDEN_BOS_LAYERS if hidden else [])
    prompts = [PROMPT] + ([HIDDEN_PROMPT] if hidden else [])
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    patterns = []
    for prompt in prompts:
        with torch.no_grad():
            _, cache = model.run_with_cache(_tokens(model, prompt), names_filter=lambda name: name in names)
        patterns += [(f"layer {layer}, prompt {prompt!r}", cache[f"blocks.{layer}.attn.hook_pattern"][0])
                     for layer in layers]
    if hidden:  # a random causal pattern of another size: 4 heads, 7 positions
        generator = torch.Generator().manual_seed(0)
        scores = torch.randn(4, 7, 7, generator=generator)
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        patterns.append(("a random 4-head, 7-position pattern", scores.softmax(-1)))
    return patterns


@exercise("00", "0.4", "bos_attention", "The attention sink", points=1)
def bos_attention(answer, hidden):
    expect_callable(answer, "bos_attention")
    model = model_for_checks()
    patterns = _bos_patterns(model, hidden)
    for what, pattern in patterns:
        expected = _reference_bos_attention(pattern)
        got = answer(pattern.clone())
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            if torch.allclose(got, pattern[:, :, 0].mean(-1), atol=1e-5):
                raise CheckFailed(f"{what}: you included query position 0, which can only attend to itself (its "
                                  f"attention to BOS is always 1). Average over query positions 1 and later.")
            if torch.allclose(got, pattern[:, 0, 1:].mean(-1), atol=1e-5) or torch.allclose(
                    got, pattern[:, 0, :].mean(-1), atol=1e-5):
                raise CheckFailed(f"{what}: you read the attention *from* position 0 (a row). Attention *to* BOS is "
                                  f"the key axis: pattern[head, query, 0].")
        expect_tensor(got, expected, what, atol=1e-5,
                      hint="pattern is [head, query_pos, key_pos]; BOS is key position 0.")
    return f"{len(patterns)} patterns"


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.5 — Grouped-query attention: share keys across query heads
# ---------------------------------------------------------------------------------------------------------


def _reference_expand_kv_heads(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    return kv.repeat_interleave(n_heads // kv.shape[2], dim=2)


def _expand_case(answer, kv: torch.Tensor, n_heads: int, what: str) -> None:
    expected = _reference_expand_kv_heads(kv, n_heads)
    got = answer(kv.clone(), n_heads)
    group = n_heads // kv.shape[2]
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.allclose(got, expected):
        if torch.allclose(got, kv.repeat(1, 1, group, 1)):
            raise CheckFailed(f"{what}: you tiled the KV heads (query head h uses KV head h % {kv.shape[2]}). The "
                              f"layout is grouped: query head h uses KV head h // {group}; use repeat_interleave, "
                              f"not repeat.")
    expect_tensor(got, expected, what, atol=1e-5,
                  hint=f"output head h is input head h // (n_heads // n_kv_heads), here h // {group}.")


@exercise("00", "0.5", "expand_kv_heads", "Grouped-query attention: share keys across query heads", points=2)
def expand_kv_heads(answer, hidden):
    expect_callable(answer, "expand_kv_heads")
    model = model_for_checks()
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    # 1. A tensor whose every entry says where it came from: [batch=1, pos=2, n_kv_heads, d_head=4].
    labelled = torch.arange(2 * n_kv * 4, dtype=torch.float32).reshape(1, 2, n_kv, 4)
    _expand_case(answer, labelled, n_heads, f"a labelled [1, 2, {n_kv}, 4] tensor to {n_heads} heads")
    if hidden:  # another grouping: 2 KV heads shared by 8 query heads, batch 3
        other = torch.randn(3, 5, 2, 8, generator=torch.Generator().manual_seed(1))
        _expand_case(answer, other, 8, "a [3, 5, 2, 8] tensor to 8 heads")
    # 2. On SmolLM2 itself: expanded rotated keys must reproduce the model's attention scores.
    layers = KV_LAYERS + (HIDDEN_KV_LAYERS if hidden else [])
    names = {f"blocks.{layer}.attn.{hook}" for layer in layers for hook in ("hook_rot_q", "hook_rot_k",
                                                                            "hook_attn_scores")}
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens(model, PROMPT), names_filter=lambda name: name in names)
    for layer in layers:
        q = cache[f"blocks.{layer}.attn.hook_rot_q"]
        k = cache[f"blocks.{layer}.attn.hook_rot_k"]
        _expand_case(answer, k, n_heads, f"layer {layer}'s rotated keys")
        keys = answer(k.clone(), n_heads)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) / model.cfg.d_head ** 0.5
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        expect_tensor(scores[..., causal], cache[f"blocks.{layer}.attn.hook_attn_scores"][..., causal],
                      f"layer {layer}: attention scores computed with your expanded keys", atol=1e-3)
    return f"{1 + hidden} synthetic tensor{'s' if hidden else ''}, {len(layers)} layer{'s' if hidden else ''} of SmolLM2"
