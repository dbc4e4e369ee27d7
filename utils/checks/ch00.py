"""Checks for chapter 00 — Orientation: TransformerLens 4 and the offline model zoo."""

from __future__ import annotations

import torch

from utils.course.checking import CheckFailed, expect_callable, expect_number, expect_tensor, exercise, hidden_generator
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


@exercise("00", "0.1", "single_token_id", "One word, one token", points=1,
          reference=_reference_single_token_id)
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


def _reference_reconstruct_resid_post(cache, layer: int) -> torch.Tensor:
    return (cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"]
            + cache[f"blocks.{layer}.hook_mlp_out"])


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


@exercise("00", "0.2", "reconstruct_resid_post", "Rebuild the residual stream", points=1,
          reference=_reference_reconstruct_resid_post)
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
# Exercise 0.3 — Decompose the residual stream into every head and MLP
# ---------------------------------------------------------------------------------------------------------

DECOMPOSE_LAYERS = [0, 2]
HIDDEN_DECOMPOSE_LAYERS = [9, 29]


def _reference_decompose_resid(model, cache, layer: int) -> tuple[torch.Tensor, list[str]]:
    components = [cache["blocks.0.hook_resid_pre"]]
    labels = ["embed"]
    for block in range(layer + 1):
        z = cache[f"blocks.{block}.attn.hook_z"]  # [batch, pos, head, d_head]
        per_head = torch.einsum("bphd,hdm->hbpm", z, model.W_O[block])
        components.extend(per_head.unbind(0))
        labels += [f"L{block}H{head}" for head in range(per_head.shape[0])]
        components.append(cache[f"blocks.{block}.hook_mlp_out"])
        labels.append(f"L{block}MLP")
    return torch.stack(components), labels


def _decompose_cache(model, prompt: str, layers: list[int]):
    top = max(layers)
    wanted = {"blocks.0.hook_resid_pre"} | {f"blocks.{block}.{part}" for block in range(top + 1)
                                            for part in ("attn.hook_z", "hook_mlp_out", "hook_attn_out")}
    posts = {f"blocks.{layer}.hook_resid_post" for layer in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(_tokens(model, prompt), names_filter=lambda name: name in wanted | posts)
    truth = {layer: cache[f"blocks.{layer}.hook_resid_post"] for layer in layers}
    for name in posts:
        cache.cache_dict.pop(name, None)
    return cache, truth


@exercise("00", "0.3", "decompose_resid", "Decompose the residual stream into every head and MLP", points=2,
          reference=_reference_decompose_resid)
def decompose_resid(answer, hidden):
    expect_callable(answer, "decompose_resid")
    model = model_for_checks()
    layers = DECOMPOSE_LAYERS + (HIDDEN_DECOMPOSE_LAYERS if hidden else [])
    prompts = [PROMPT] + ([HIDDEN_PROMPT] if hidden else [])
    n_heads = model.cfg.n_heads
    for prompt in prompts:
        cache, truth = _decompose_cache(model, prompt, layers)
        for layer in layers:
            what = f"decompose_resid(model, cache, layer={layer}) on {prompt!r}"
            got = answer(model, cache, layer)
            if not (isinstance(got, (tuple, list)) and len(got) == 2):
                raise CheckFailed(f"{what}: return a pair (components, labels), got {type(got).__name__}.")
            components, labels = got
            expected, expected_labels = _reference_decompose_resid(model, cache, layer)
            n_expected = expected.shape[0]
            if isinstance(components, torch.Tensor) and components.dim() == 4:
                n = components.shape[0]
                if n == n_expected - 1:
                    raise CheckFailed(f"{what}: {n} components, expected {n_expected}. Did you forget the embedding "
                                      f"(blocks.0.hook_resid_pre), the stream's first term?")
                if n == 1 + 2 * (layer + 1):
                    raise CheckFailed(f"{what}: {n} components, one per attention layer: split each attention "
                                      f"layer into its {n_heads} heads (head h writes z[..., h, :] @ W_O[layer, h]).")
                if n == n_expected - (n_heads + 1):
                    raise CheckFailed(f"{what}: {n} components, one block short: blocks 0 to {layer} inclusive, so "
                                      f"range(layer + 1).")
                if n == n_expected - (layer + 1) or n == n_expected + (layer + 1) or n == n_expected - 2 * (layer + 1):
                    raise CheckFailed(f"{what}: {n} components, expected {n_expected} (embed, then per block "
                                      f"{n_heads} heads and the MLP). Did you leave out, or repeat, a kind of term?")
                if components.shape == expected.shape and torch.allclose(components.sum(0), truth[layer], atol=1e-2,
                                                                          rtol=1e-3) and not torch.allclose(
                        components, expected, atol=1e-3, rtol=1e-3):
                    raise CheckFailed(f"{what}: your components sum to resid_post but are not in the order of the "
                                      f"labels: embed, then for each block its heads 0..{n_heads - 1} and its MLP.")
            expect_tensor(components, expected, f"{what}: components", atol=1e-3, rtol=1e-3,
                          hint="head h of block l writes einsum('bpd,dm->bpm', z[:, :, h], model.W_O[l, h]).")
            if list(labels) != expected_labels:
                wrong = next(i for i, (a, b) in enumerate(zip(list(labels) + [None] * n_expected, expected_labels))
                             if a != b)
                raise CheckFailed(f"{what}: label {wrong} is {list(labels)[wrong] if wrong < len(labels) else None!r}, "
                                  f"expected {expected_labels[wrong]!r} (labels: 'embed', 'L0H0', …, 'L0MLP', 'L1H0', …).")
            if not torch.allclose(components.sum(0), truth[layer], atol=1e-2, rtol=1e-3):  # pragma: no cover
                raise CheckFailed(f"{what}: the components do not sum to resid_post.")
    return f"{len(layers)} layers, {len(prompts)} prompt{'s' if len(prompts) > 1 else ''}"


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.4 — The loss at every position
# ---------------------------------------------------------------------------------------------------------

LOSS_TEXT = "The cat sat on the mat because it was warm."
HIDDEN_LOSS_TEXTS = ["Rivers carry sand to the sea.", "In 1969, people walked on the Moon for the first time."]


def _reference_per_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    log_probs = logits[:, :-1].log_softmax(dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]


def _loss_cases(model, hidden: bool) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    cases = [("random logits [2, 5, 7]", torch.randn(2, 5, 7, generator=generator),
              torch.randint(0, 7, (2, 5), generator=generator))]
    texts = [LOSS_TEXT] + (HIDDEN_LOSS_TEXTS if hidden else [])
    for text in texts:
        tokens = model.to_tokens(text)
        with torch.no_grad():
            cases.append((f"SmolLM2 on {text!r}", model(tokens), tokens))
    if hidden:
        generator = hidden_generator(40)
        batch, pos, vocab = 3, int(torch.randint(4, 10, (1,), generator=generator)), 11
        cases.append((f"random logits [{batch}, {pos}, {vocab}]", 3 * torch.randn(batch, pos, vocab, generator=generator),
                      torch.randint(0, vocab, (batch, pos), generator=generator)))
    return cases


@exercise("00", "0.4", "per_token_loss", "The loss at every position", points=1, reference=_reference_per_token_loss)
def per_token_loss(answer, hidden):
    expect_callable(answer, "per_token_loss")
    model = model_for_checks()
    cases = _loss_cases(model, hidden)
    for what, logits, tokens in cases:
        expected = _reference_per_token_loss(logits, tokens)
        got = answer(logits.clone(), tokens.clone())
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            raise CheckFailed(f"{what}: you returned one number (the mean?); return the loss at every position, "
                              f"shape {tuple(expected.shape)} = [batch, position - 1].")
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.allclose(got, expected, atol=1e-4):
            log_probs = logits.log_softmax(-1)
            unshifted = -log_probs[:, :-1].gather(-1, tokens[:, :-1, None])[..., 0]
            late = -log_probs[:, 1:].gather(-1, tokens[:, 1:, None])[..., 0]
            raw = -logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
            for wrong, why in [
                (-expected, "the sign is flipped: the loss is minus the log-probability, so it is positive"),
                (unshifted, "position i's logits predict token i + 1, not token i: shift the targets by one"),
                (late, "you dropped the first position's logits instead of the last's: logits[:, :-1] predict "
                       "tokens[:, 1:]"),
                (raw, "you used the raw logits: take log_softmax over the vocabulary first"),
                (torch.exp(-expected), "you returned probabilities; the loss is minus their logarithm"),
            ]:
                if torch.allclose(got, wrong, atol=1e-4):
                    raise CheckFailed(f"{what}: {why}.")
        if isinstance(got, torch.Tensor) and got.shape == tokens.shape:
            raise CheckFailed(f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}: the last "
                              f"position has no next token to predict, so there are position - 1 losses.")
        expect_tensor(got, expected, what, atol=1e-4,
                      hint="minus log_softmax(logits[:, :-1]) read at the ids tokens[:, 1:].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.5 — A hook that records
# ---------------------------------------------------------------------------------------------------------

RECORD_NAMES = ["blocks.2.hook_resid_post", "blocks.4.attn.hook_pattern"]
HIDDEN_RECORD_NAMES = ["blocks.0.hook_mlp_out", "blocks.13.attn.hook_z", "blocks.27.hook_resid_mid", "ln_final.hook_normalized"]


def _reference_record_activations(model, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    recorded = {}

    def recorder(name):
        def record(activation, hook):
            recorded[name] = activation.detach().clone()
        return record

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, recorder(name)) for name in names])
    return recorded


@exercise("00", "0.5", "record_activations", "A hook that records", points=1, reference=_reference_record_activations)
def record_activations(answer, hidden):
    expect_callable(answer, "record_activations")
    model = model_for_checks()
    cases = [(PROMPT, RECORD_NAMES)] + ([(HIDDEN_PROMPT, HIDDEN_RECORD_NAMES), (PROMPT, HIDDEN_RECORD_NAMES[1:3])]
                                        if hidden else [])
    for prompt, names in cases:
        tokens = _tokens(model, prompt)
        what = f"record_activations(model, tokens of {prompt!r}, {names})"
        got = answer(model, tokens.clone(), list(names))
        left = _hooks_left(model)
        model.reset_hooks()
        if left:
            raise CheckFailed(f"{what} left a hook on {left[0]}: every later run would record too. Use "
                              f"model.run_with_hooks, which removes its hooks.")
        if not isinstance(got, dict):
            raise CheckFailed(f"{what}: return a dict from hook name to tensor, got {type(got).__name__}.")
        if set(got) != set(names) and len(got) == len(names):
            raise CheckFailed(f"{what}: the keys are {sorted(got)}, expected {sorted(names)}. hook.name is the bridge's "
                              f"own name of the hook point, which differs from a classic alias such as "
                              f"hook_resid_post: key each tensor by the name you asked for (a closure over it).")
        if set(got) != set(names):
            raise CheckFailed(f"{what}: the keys are {sorted(got)}, expected exactly {sorted(names)} (use hook.name, "
                              f"or the name you hooked, as the key).")
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
        for name in names:
            expect_tensor(got[name], cache[name], f"{what}: {name}", atol=1e-4,
                          hint="store the activation the hook receives, unchanged.")
    return f"{len(cases)} lists of hook points"


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.6 — Zero-ablate one head
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


@exercise("00", "0.6", "head_ablation_drop", "Zero-ablate one head", points=2,
          reference=_reference_head_ablation_drop)
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
# Exercise 0.7 — The attention sink
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
        generator = hidden_generator(20)
        scores = torch.randn(4, 7, 7, generator=generator)
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        patterns.append(("a random 4-head, 7-position pattern", scores.softmax(-1)))
    return patterns


@exercise("00", "0.7", "bos_attention", "The attention sink", points=1, reference=_reference_bos_attention)
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
# Exercise 0.8 — Grouped-query attention: share keys across query heads
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


@exercise("00", "0.8", "expand_kv_heads", "Grouped-query attention: share keys across query heads", points=2,
          reference=_reference_expand_kv_heads)
def expand_kv_heads(answer, hidden):
    expect_callable(answer, "expand_kv_heads")
    model = model_for_checks()
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    # 1. A tensor whose every entry says where it came from: [batch=1, pos=2, n_kv_heads, d_head=4].
    labelled = torch.arange(2 * n_kv * 4, dtype=torch.float32).reshape(1, 2, n_kv, 4)
    _expand_case(answer, labelled, n_heads, f"a labelled [1, 2, {n_kv}, 4] tensor to {n_heads} heads")
    if hidden:  # another grouping: 2 KV heads shared by 8 query heads, batch 3
        other = torch.randn(3, 5, 2, 8, generator=hidden_generator(30))
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


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.9 — Attention by hand
# ---------------------------------------------------------------------------------------------------------

ATTENTION_LAYERS = [3]
HIDDEN_ATTENTION_LAYERS = [0, 21]


def _reference_attention_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_heads, n_kv_heads = q.shape[2], k.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads evenly")
    group = n_heads // n_kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    n_pos = q.shape[1]
    future = torch.ones(n_pos, n_pos, dtype=torch.bool, device=q.device).triu(1)
    pattern = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    return pattern, z


def _attention_mistakes(q, k, v):
    """What the usual mistakes give for the pattern, with what to say."""
    group = q.shape[2] // k.shape[2]
    keys = k.repeat_interleave(group, dim=2)
    raw = torch.einsum("bqhd,bkhd->bhqk", q, keys)
    n = q.shape[1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    tiled = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat(1, 1, group, 1)) / q.shape[-1] ** 0.5
    return [
        (raw.masked_fill(future, float("-inf")).softmax(-1), "you did not scale the scores: divide q·k by sqrt(d_head)"),
        ((raw / q.shape[-1]).masked_fill(future, float("-inf")).softmax(-1),
         "you divided by d_head; the scale is sqrt(d_head)"),
        ((raw / q.shape[-1] ** 0.5).softmax(-1), "no causal mask: a query may not attend to later keys"),
        ((raw / q.shape[-1] ** 0.5).masked_fill(future, float("-inf")).softmax(-2),
         "you took the softmax over queries; each query's row (the key axis, the last) must sum to 1"),
        (tiled.masked_fill(future, float("-inf")).softmax(-1),
         f"query head h uses key/value head h // {group} (grouped), not h % {k.shape[2]} (tiled)"),
    ]


def _attention_cases(model, hidden: bool):
    generator = torch.Generator().manual_seed(5)
    cases = [("random q [2, 5, 6, 8], k and v [2, 5, 2, 8]", torch.randn(2, 5, 6, 8, generator=generator),
              torch.randn(2, 5, 2, 8, generator=generator), torch.randn(2, 5, 2, 8, generator=generator))]
    layers = ATTENTION_LAYERS + (HIDDEN_ATTENTION_LAYERS if hidden else [])
    prompts = [PROMPT] + ([HIDDEN_PROMPT] if hidden else [])
    names = {f"blocks.{layer}.attn.{hook}" for layer in layers for hook in ("hook_rot_q", "hook_rot_k", "hook_v",
                                                                            "hook_pattern", "hook_z")}
    truths = []
    for prompt in prompts:
        with torch.no_grad():
            _, cache = model.run_with_cache(_tokens(model, prompt), names_filter=lambda name: name in names)
        for layer in layers:
            part = lambda hook: cache[f"blocks.{layer}.attn.{hook}"]
            cases.append((f"SmolLM2 layer {layer} on {prompt!r}", part("hook_rot_q"), part("hook_rot_k"), part("hook_v")))
            truths.append((len(cases) - 1, part("hook_pattern"), part("hook_z")))
    if hidden:
        generator = hidden_generator(90)
        n_pos = int(torch.randint(3, 9, (1,), generator=generator))
        cases.append((f"random q [1, {n_pos}, 8, 4], k and v [1, {n_pos}, 2, 4]",
                      torch.randn(1, n_pos, 8, 4, generator=generator), torch.randn(1, n_pos, 2, 4, generator=generator),
                      torch.randn(1, n_pos, 2, 4, generator=generator)))
    return cases, dict((index, (pattern, z)) for index, pattern, z in truths)


@exercise("00", "0.9", "attention_by_hand", "Attention by hand: scale, causal mask, softmax, shared keys", points=3,
          reference=_reference_attention_by_hand)
def attention_by_hand(answer, hidden):
    expect_callable(answer, "attention_by_hand")
    model = model_for_checks()
    cases, truths = _attention_cases(model, hidden)
    for index, (what, q, k, v) in enumerate(cases):
        got = answer(q.clone(), k.clone(), v.clone())
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckFailed(f"{what}: return a pair (pattern, z), got {type(got).__name__}.")
        pattern, z = got
        expected_pattern, expected_z = _reference_attention_by_hand(q, k, v)
        if isinstance(pattern, torch.Tensor) and pattern.shape == expected_pattern.shape:
            if torch.isnan(pattern).any():
                raise CheckFailed(f"{what}: your pattern has NaN. Did you mask the diagonal too? A query may attend "
                                  f"to its own position: mask only keys after it (triu with diagonal=1).")
            if not torch.allclose(pattern, expected_pattern, atol=1e-4):
                for wrong, why in _attention_mistakes(q, k, v):
                    if torch.allclose(pattern, wrong, atol=1e-4):
                        raise CheckFailed(f"{what}: {why}.")
        expect_tensor(pattern, expected_pattern, f"{what}: pattern [batch, head, query, key]", atol=1e-4,
                      hint="scores = q·k / sqrt(d_head), -inf above the diagonal, softmax over the key axis.")
        transposed = (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
        if isinstance(z, torch.Tensor) and z.shape != expected_z.shape and z.shape == transposed:
            raise CheckFailed(f"{what}: z has shape {tuple(z.shape)} = [batch, head, pos, d_head]; hook_z is "
                              f"[batch, pos, head, d_head].")
        expect_tensor(z, expected_z, f"{what}: z [batch, pos, head, d_head]", atol=1e-4,
                      hint="z[b, q, h] = sum over keys k of pattern[b, h, q, k] * v[b, k, h // group].")
        if index in truths:
            hook_pattern, hook_z = truths[index]
            expect_tensor(pattern, hook_pattern, f"{what}: your pattern against the model's hook_pattern", atol=1e-4)
            expect_tensor(z, hook_z, f"{what}: your z against the model's hook_z", atol=1e-4)
    uneven = (torch.zeros(1, 3, 5, 4), torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4))
    try:
        answer(*uneven)
    except ValueError:
        pass
    else:
        raise CheckFailed("5 query heads and 2 key/value heads cannot be grouped evenly: raise ValueError instead of "
                          "returning something.")
    return f"{len(cases)} cases, {len(truths)} matched against SmolLM2's hooks"


# ---------------------------------------------------------------------------------------------------------
# Exercise 0.10 — Generation with a KV cache, by hand
# ---------------------------------------------------------------------------------------------------------

GENERATION_CASES = [("The capital of France is", 4)]
HIDDEN_GENERATION_CASES = [("Once upon a time", 5), ("2 + 2 =", 3)]


def _greedy_by_recomputing(model, prompt: str, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding the slow way: the whole sequence again at every step (what the cache must reproduce)."""
    tokens = model.to_tokens(prompt)
    step_logits = []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(tokens)[0, -1]
            step_logits.append(logits)
            tokens = torch.cat([tokens, logits.argmax().view(1, 1)], dim=1)
    return tokens[0, -n_new:], torch.stack(step_logits)


def _reference_generate_with_kv_cache(model, prompt: str, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.to_tokens(prompt)
    new_ids, step_logits = [], []
    with torch.no_grad():
        logits, past = model(tokens, return_type="logits_and_cache")
        for step in range(n_new):
            next_logits = logits[0, -1]
            next_id = next_logits.argmax().view(1, 1)
            new_ids.append(next_id[0, 0])
            step_logits.append(next_logits)
            if step + 1 < n_new:  # the last token's own forward pass is not needed
                logits, past = model(next_id, past_key_values=past, return_type="logits_and_cache")
    return torch.stack(new_ids), torch.stack(step_logits)


@exercise("00", "0.10", "generate_with_kv_cache", "Generation with a KV cache, by hand", points=2,
          reference=_reference_generate_with_kv_cache)
def generate_with_kv_cache(answer, hidden):
    expect_callable(answer, "generate_with_kv_cache")
    model = model_for_checks()
    cases = GENERATION_CASES + (HIDDEN_GENERATION_CASES if hidden else [])
    for prompt, n_new in cases:
        what = f"generate_with_kv_cache(model, {prompt!r}, {n_new})"
        got = answer(model, prompt, n_new)
        model.reset_hooks()
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckFailed(f"{what}: return a pair (new_ids, step_logits), got {type(got).__name__}.")
        ids, logits = got
        expected_ids, expected_logits = _greedy_by_recomputing(model, prompt, n_new)
        n_prompt = model.to_tokens(prompt).shape[1]
        if isinstance(ids, torch.Tensor) and ids.numel() == n_prompt + n_new:
            raise CheckFailed(f"{what}: {ids.numel()} ids: return only the {n_new} new tokens, not the prompt too.")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if isinstance(logits, torch.Tensor) and logits.shape == expected_logits.shape and n_new > 1 and torch.allclose(
                logits[:-1], expected_logits[1:], atol=1e-2):
            raise CheckFailed(f"{what}: step_logits[i] must be the logits that chose new token i (read before "
                              f"feeding it); yours are one step late.")
        if (isinstance(ids, torch.Tensor) and ids.shape == expected_ids.shape and int(ids[0]) == int(expected_ids[0])
                and not torch.equal(ids, expected_ids)):
            raise CheckFailed(f"{what}: the first new token is right, later ones are not ({model.to_str_tokens(ids)} "
                              f"instead of {model.to_str_tokens(expected_ids)}). After the first pass, feed the new "
                              f"token together with past_key_values=the cache: alone, it has lost the context.")
        expect_tensor(ids, expected_ids, f"{what}: new token ids", atol=0,
                      hint="greedy: each new token is the argmax of the last position's logits.")
        expect_tensor(logits, expected_logits, f"{what}: step_logits [n_new, d_vocab]", atol=2e-3, rtol=1e-3,
                      hint="after the first pass, feed only the new token with past_key_values=the cache.")
    return f"{len(cases)} prompt{'s' if len(cases) > 1 else ''}, against recomputing the whole sequence each step"
