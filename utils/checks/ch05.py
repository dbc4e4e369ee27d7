"""Checks for chapter 05 — Causal tracing of factual recall.

References come from `utils.tracing` (the course's batched causal-tracing code, reused by later chapters). Every
check runs the learner's answer on small cases (one or two short prompts, two noise samples) and, when it is wrong,
compares it with the usual mistakes to say which one.
"""

from __future__ import annotations

import torch

from utils import tracing as _tracing
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor, hidden_generator
from utils.models import model_for_checks

# (prompt, subject) pairs: the visible ones appear in the notebook, the hidden ones only when grading.
VISIBLE_SUBJECTS = [("The Eiffel Tower is in the city of", "The Eiffel Tower"),
                    ("The capital of France is", "France")]
HIDDEN_SUBJECTS = [("Albert Einstein developed the theory of", "Albert Einstein"),
                   ("In 1990, the Rijksmuseum was closed", "Rijksmuseum"),
                   ("Buckingham Palace is in the city of", "Buckingham Palace")]

# (prompt, subject, answer) for the restoration check.
VISIBLE_FACT = ("The Eiffel Tower is in the city of", "The Eiffel Tower", " Paris")
HIDDEN_FACT = ("The Louvre is in the city of", "The Louvre", " Paris")


def _close(got, expected, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.detach().to("cpu", torch.float32),
                          atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------
# 5.1 — where is the subject?
# ---------------------------------------------------------------------------------------------------------


@exercise("05", "5.1", "subject_positions", "Where is the subject?", reference=_tracing.subject_positions)
def subject_positions(answer, hidden):
    expect_callable(answer, "subject_positions")
    model = model_for_checks()
    cases = VISIBLE_SUBJECTS + (HIDDEN_SUBJECTS if hidden else [])
    for i, (prompt, subject) in enumerate(cases):
        what = f"case {i} (subject {subject!r} in {prompt!r})"
        got = answer(model, prompt, subject)
        expected = _tracing.subject_positions(model, prompt, subject)
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, (list, tuple)) or not all(isinstance(p, int) for p in got):
            raise CheckFailed(f"{what}: expected a list of ints (token positions), got {type(got).__name__}.")
        got = list(got)
        if got == expected:
            continue
        if got == [p - 1 for p in expected]:
            raise CheckFailed(f"{what}: your positions are one too low ({got}, expected {expected}). Position 0 "
                              f"is the BOS token that model.to_tokens prepends: count it.")
        if got == [expected[-1]] and len(expected) > 1:
            raise CheckFailed(f"{what}: you returned only the last subject token ({got}); return every token of "
                              f"the subject ({expected}).")
        if got and got[0] == expected[0] and len(got) > len(expected):
            raise CheckFailed(f"{what}: you returned {got}, which runs past the subject (expected {expected}): "
                              f"stop at the last token that overlaps the subject's characters.")
        raise CheckFailed(f"{what}: expected positions {expected} (tokens "
                          f"{[model.to_str_tokens(prompt)[p] for p in expected]}), got {got}.")
    return f"{len(cases)} prompts"


# ---------------------------------------------------------------------------------------------------------
# 5.2 — how much noise?
# ---------------------------------------------------------------------------------------------------------

VISIBLE_NOISE_FACTS = [("The Eiffel Tower is in the city of", "The Eiffel Tower"),
                       ("The capital of France is", "France"),
                       ("Albert Einstein developed the theory of", "Albert Einstein")]
HIDDEN_NOISE_FACTS = [("Buckingham Palace is in the city of", "Buckingham Palace"),
                      ("The official language of Brazil is", "Brazil"),
                      ("Norway is a country in the continent of", "Norway")]


def _subject_rows(model, facts, whole_prompt=False):
    rows = []
    for prompt, subject in facts:
        tokens = model.to_tokens(prompt)[0]
        chosen = range(tokens.shape[0]) if whole_prompt else _tracing.subject_positions(model, prompt, subject)
        rows.append(model.W_E[tokens[list(chosen)]].float())
    return rows


@exercise("05", "5.2", "noise_level", "How much noise?", reference=_tracing.noise_level)
def noise_level(answer, hidden):
    expect_callable(answer, "noise_level")
    model = model_for_checks()
    cases = [(VISIBLE_NOISE_FACTS[:2], 3.0), (VISIBLE_NOISE_FACTS, 2.0)]
    if hidden:
        cases += [(HIDDEN_NOISE_FACTS, 3.0), (HIDDEN_NOISE_FACTS[1:] + VISIBLE_NOISE_FACTS[:1], 1.5)]
    for i, (facts, multiplier) in enumerate(cases):
        what = f"case {i} ({len(facts)} facts, multiplier {multiplier:g})"
        got = answer(model, [tuple(f) for f in facts], multiplier)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise CheckFailed(f"{what}: expected a float (the noise's standard deviation), got {type(got).__name__}.")
        expected = _tracing.noise_level(model, facts, multiplier)
        if abs(got - expected) <= 1e-4 * max(1.0, expected):
            continue
        rows = _subject_rows(model, facts)
        pooled = float(torch.cat(rows).std())
        mistakes = [
            (pooled, "you forgot the multiplier: return `multiplier` x the standard deviation"),
            (multiplier * float(model.W_E.float().std()),
             "you took the std of the whole embedding matrix W_E; take it over the subjects' token embeddings only"),
            (multiplier * sum(float(r.std()) if r.shape[0] > 1 else float(r.flatten().std()) for r in rows)
             / len(rows), "you averaged one std per fact; pool every entry of every subject token's embedding and "
                          "take one std"),
            (multiplier * float(torch.cat(_subject_rows(model, facts, whole_prompt=True)).std()),
             "you used every token of the prompt (BOS included); use the subject's tokens only"),
            (multiplier * pooled ** 2, "you returned a variance (std squared)"),
            (multiplier * float(torch.cat(rows).std(0).mean()),
             "you averaged the per-dimension std; take the std of all entries together (`.std()` of the whole "
             "tensor)"),
        ]
        for value, message in mistakes:
            if abs(got - value) <= 1e-4 * max(1.0, abs(value)):
                raise CheckFailed(f"{what}: {message} (got {got:.4g}, expected {expected:.4g}).")
        raise CheckFailed(f"{what}: expected {expected:.4g}, got {got:.4g}. Stack W_E's rows for every subject token "
                          f"of every fact, take `.std()` of all entries, multiply by `multiplier`.")
    return f"{len(cases)} fact lists"


# ---------------------------------------------------------------------------------------------------------
# 5.3 — corrupt the subject
# ---------------------------------------------------------------------------------------------------------


def _reference_corrupt(embed, positions, std, n_samples, seed):
    noise = _tracing.subject_noise(n_samples, len(positions), embed.shape[-1], std, seed)
    return _tracing.add_subject_noise(embed, positions, noise)


@exercise("05", "5.3", "corrupt_embeddings", "Corrupt the subject with noise", points=2,
          reference=_tracing.corrupt_embeddings)
def corrupt_embeddings(answer, hidden):
    expect_callable(answer, "corrupt_embeddings")
    generator = torch.Generator().manual_seed(5)
    cases = [(torch.randn(1, 7, 16, generator=generator), [2, 3, 4], 0.5, 3, 0),
             (torch.randn(1, 6, 24, generator=generator), [4], 1.2, 4, 1)]
    if hidden:
        cases.append((torch.randn(1, 9, 32, generator=generator), [1, 2], 0.3, 5, 7))
    for i, (embed, positions, std, n_samples, seed) in enumerate(cases):
        what = f"case {i} (positions {positions}, std {std}, {n_samples} samples, seed {seed})"
        original = embed.clone()
        got = answer(embed, list(positions), std, n_samples, seed)
        if not torch.equal(embed, original):
            raise CheckFailed(f"{what}: your function changed the clean embedding it was given. Work on a copy "
                              f"(.clone()), the clean run still needs it.")
        expected = _reference_corrupt(embed, positions, std, n_samples, seed)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [n_samples, pos, d_model] (one "
                              f"row per noise sample), got {tuple(got.shape)}.")
        if _close(got, expected, atol=1e-5):
            continue
        diff = (got - embed).detach().float()
        others = [p for p in range(embed.shape[1]) if p not in positions]
        if others and diff[:, others].abs().max() > 1e-6:
            raise CheckFailed(f"{what}: you changed positions outside the subject (e.g. position "
                              f"{others[int(diff[:, others].abs().amax(dim=(0, 2)).argmax())]}). Add noise to the "
                              f"subject's positions only: the rest of the prompt must stay clean.")
        subject = diff[:, positions]
        if n_samples > 1 and torch.allclose(subject[0], subject[1]):
            raise CheckFailed(f"{what}: every sample got the same noise. Draw one noise tensor of shape "
                              f"[n_samples, len(positions), d_model] so that each row is a different corruption.")
        measured = float(subject.std())
        if not 0.6 * std < measured < 1.5 * std:
            for label, value in (("std ** 2 (a variance)", std ** 2), ("3 * std", 3 * std), ("1 (unscaled)", 1.0),
                                 ("sqrt(std)", std ** 0.5)):
                if 0.75 * value < measured < 1.33 * value:
                    raise CheckFailed(f"{what}: your noise has standard deviation about {measured:.3g}, which "
                                      f"looks like {label}; expected {std:g}. Multiply standard normal noise by "
                                      f"`std` itself (the noise level is already 3 x the embedding std).")
            raise CheckFailed(f"{what}: your noise has standard deviation about {measured:.3g}, expected {std:g}.")
        raise CheckFailed(f"{what}: the noise has the right size and place but not the expected values. Draw it "
                          f"exactly as `std * torch.randn(n_samples, len(positions), d_model, generator="
                          f"torch.Generator().manual_seed(seed))`, so that the same seed gives the same corruption.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 5.4 — the corrupted run
# ---------------------------------------------------------------------------------------------------------


def _corrupted_cases(model, hidden):
    facts = [VISIBLE_FACT, ("The capital of France is", "France", " Paris")] + ([HIDDEN_FACT] if hidden else [])
    std = _tracing.noise_std(model)
    cases = []
    for index, (prompt, subject, answer_text) in enumerate(facts):
        tokens = model.to_tokens(prompt)
        positions = _tracing.subject_positions(model, prompt, subject)
        embed = _tracing.clean_cache(model, tokens)["hook_embed"]
        seed = int(torch.randint(0, 10_000, (1,), generator=hidden_generator(50 + index))) if hidden else index
        noisy = _reference_corrupt(embed, positions, std, 3, seed)
        cases.append((prompt, tokens, noisy, model.to_single_token(answer_text)))
    return cases


@exercise("05", "5.4", "corrupted_prob", "The corrupted run", reference=_tracing.corrupted_prob)
def corrupted_prob(answer, hidden):
    expect_callable(answer, "corrupted_prob")
    model = model_for_checks()
    cases = _corrupted_cases(model, hidden)
    for i, (prompt, tokens, noisy, answer_token) in enumerate(cases):
        what = f"case {i} ({prompt!r}, {noisy.shape[0]} noise samples)"
        got = answer(model, tokens.clone(), noisy.clone(), answer_token)
        model.reset_hooks()
        expected = _tracing.corrupted_prob(model, tokens, noisy, answer_token)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, one probability per noise sample "
                              f"(do not average them here), got {tuple(got.shape)}.")
        got = got.detach().float().cpu()
        if _close(got, expected):
            continue
        with torch.no_grad():
            clean_logits = model(tokens)[0].float()
            noisy_logits = model.run_with_hooks(tokens.expand(noisy.shape[0], -1),
                                                fwd_hooks=[("hook_embed", lambda e, hook: noisy)]).float()
        model.reset_hooks()
        if _close(got, clean_logits[-1].softmax(-1)[answer_token].expand_as(expected)):
            raise CheckFailed(f"{what}: you returned the clean probability: the noise was not applied. Replace "
                              f"hook_embed's output by `noisy_embed` (one row per sample).")
        if _close(got, noisy_logits[:, -1, answer_token]):
            raise CheckFailed(f"{what}: your values are logits, not probabilities: softmax the last position's logits.")
        if _close(got, noisy_logits[:, 0].softmax(-1)[:, answer_token]):
            raise CheckFailed(f"{what}: you read position 0; the answer is predicted at the last position ([:, -1]).")
        expect_tensor(got, expected, what, hint="run tokens repeated once per sample, hook_embed returning "
                                                "noisy_embed, then softmax of logits[:, -1] at answer_token.")
    return f"{len(cases)} prompts"


# ---------------------------------------------------------------------------------------------------------
# 5.5 — restore one state
# ---------------------------------------------------------------------------------------------------------


def _restoration_cases(model, hidden: bool):
    facts = [VISIBLE_FACT] + ([HIDDEN_FACT] if hidden else [])
    std = _tracing.noise_std(model)
    n_layers = model.cfg.n_layers
    cases = []
    for index, (prompt, subject, answer_text) in enumerate(facts):
        tokens = model.to_tokens(prompt)
        positions = _tracing.subject_positions(model, prompt, subject)
        answer_token = model.to_single_token(answer_text)
        names = {_tracing.hook_name(kind, layer) for kind in _tracing.KINDS for layer in range(n_layers)}
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names or name == "hook_embed")
        noisy = _reference_corrupt(cache["hook_embed"], positions, std, 2, index)
        last_subject, last = positions[-1], tokens.shape[1] - 1
        chosen = [("resid", [6], last_subject), ("mlp", _tracing.window_layers(4, 6, n_layers), last_subject),
                  ("attn", _tracing.window_layers(22, 6, n_layers), last)]
        if hidden:
            chosen.append(("resid", [20], last))
        for kind, layers, position in chosen:
            clean = {_tracing.hook_name(kind, layer): cache[_tracing.hook_name(kind, layer)] for layer in layers}
            cases.append((f"{prompt!r}, restoring {kind} at layers {layers[0]}..{layers[-1]}, position {position}",
                          tokens, noisy, clean, position, answer_token, cache["hook_embed"]))
    return cases


@exercise("05", "5.5", "restore_and_prob", "Restore one state, read p(answer)", points=3,
          reference=_tracing.restore_and_prob)
def restore_and_prob(answer, hidden):
    expect_callable(answer, "restore_and_prob")
    model = model_for_checks()
    cases = _restoration_cases(model, hidden)
    for i, (name, tokens, noisy, clean, position, answer_token, clean_embed) in enumerate(cases):
        what = f"case {i} ({name})"
        got = answer(model, tokens.clone(), noisy.clone(), dict(clean), position, answer_token)
        model.reset_hooks()
        expected = _tracing.restore_and_prob(model, tokens, noisy, clean, position, answer_token)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor of probabilities, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} (one probability per noise sample), "
                              f"got {tuple(got.shape)}.")
        got = got.detach().float().cpu()
        if _close(got, expected, atol=1e-4):
            continue
        if (got < 0).any() or (got > 1).any():
            raise CheckFailed(f"{what}: your values ({got.tolist()}) are not probabilities. Apply softmax to the "
                              f"last position's logits and read the answer's entry.")
        n_pos = tokens.shape[1]
        if _close(got, _tracing.restore_and_prob(model, tokens, noisy, {}, position, answer_token), atol=1e-4):
            raise CheckFailed(f"{what}: your result equals the corrupted run with nothing restored. Overwrite the "
                              f"hooked activation at `position` with the clean value (and return it from the hook).")
        clean_p = _tracing.restore_and_prob(model, tokens, clean_embed.expand_as(noisy), {}, position, answer_token)
        if _close(got, clean_p, atol=1e-4):
            raise CheckFailed(f"{what}: your result equals the clean run. Either the noise was not applied "
                              f"(replace hook_embed's output by `noisy_embed`, one row per noise sample), or you "
                              f"restored the clean activation at every position instead of only `position`.")
        for shift in (-1, 1):
            if 0 <= position + shift < n_pos and _close(got, _tracing.restore_and_prob(
                    model, tokens, noisy, clean, position + shift, answer_token), atol=1e-4):
                raise CheckFailed(f"{what}: you restored position {position + shift} instead of {position}.")
        everywhere = {name: value for name, value in clean.items()}

        def restore_all_hook(clean):
            def restore_all(activation, hook):
                activation[:] = clean.to(activation.dtype)
                return activation
            return restore_all

        model.reset_hooks()
        with torch.no_grad():
            logits = model.run_with_hooks(tokens.expand(noisy.shape[0], -1),
                                          fwd_hooks=[("hook_embed", lambda e, hook: noisy)] +
                                          [(name, restore_all_hook(value)) for name, value in clean.items()])
        model.reset_hooks()
        if _close(got, logits[:, -1].softmax(-1)[:, answer_token], atol=1e-4):
            raise CheckFailed(f"{what}: you restored the clean activation at every position. Restore only "
                              f"`position` (activation[:, position] = ...), leave the others corrupted.")
        expect_tensor(got, expected, what, atol=1e-4,
                      hint="replace hook_embed by noisy_embed, overwrite each hooked activation at `position` with "
                           "its clean value, then softmax the last position's logits.")
    return f"{len(cases)} restorations"


# ---------------------------------------------------------------------------------------------------------
# 5.6 — the indirect effect
# ---------------------------------------------------------------------------------------------------------


@exercise("05", "5.6", "indirect_effect", "The normalised indirect effect", reference=_tracing.normalised_effect)
def indirect_effect(answer, hidden):
    expect_callable(answer, "indirect_effect")
    generator = torch.Generator().manual_seed(4)
    restored = torch.rand(30, 7, generator=generator) * 0.6
    cases = [(restored, torch.tensor(0.05), torch.tensor(0.55)),
             (restored[:, :2], torch.tensor(0.2), torch.tensor(0.35))]
    if hidden:
        cases.append((torch.rand(5, 3, 4, generator=generator), torch.rand(5, 1, 1, generator=generator) * 0.1,
                      torch.full((5, 1, 1), 0.9)))
    for i, (restored, corrupted, clean) in enumerate(cases):
        what = f"case {i} (restored {tuple(restored.shape)}, corrupted {corrupted.flatten()[0].item():.2f}, clean " \
               f"{clean.flatten()[0].item():.2f})"
        got = answer(restored.clone(), corrupted.clone(), clean.clone())
        expected = _tracing.normalised_effect(restored, corrupted, clean)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} (the shape of `restored`), got "
                              f"{tuple(got.shape)}.")
        got = got.detach().float()
        if _close(got, expected, atol=1e-5):
            continue
        if _close(got, restored - corrupted, atol=1e-5):
            raise CheckFailed(f"{what}: you returned p_restored - p_corrupted, the raw indirect effect. Normalise "
                              f"it by the damage the noise did, p_clean - p_corrupted, so that 1 = full recovery.")
        if _close(got, -expected, atol=1e-5):
            raise CheckFailed(f"{what}: your sign is flipped: restoring a state that brings the answer back must "
                              f"give a positive effect.")
        if _close(got, (restored - corrupted) / clean, atol=1e-5):
            raise CheckFailed(f"{what}: you divided by p_clean; divide by p_clean - p_corrupted (what the noise "
                              f"took away).")
        if _close(got, restored / clean, atol=1e-5):
            raise CheckFailed(f"{what}: p_restored / p_clean ignores the corrupted baseline: a state that changes "
                              f"nothing would score p_corrupted / p_clean instead of 0.")
        expect_tensor(got, expected, what, atol=1e-5, hint="(restored - corrupted) / (clean - corrupted)")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 5.7 — the window of layers
# ---------------------------------------------------------------------------------------------------------

# Odd and even windows, windows clipped at either end, a window of 1: every mistake the hidden cases catch shows
# up in one of these.
VISIBLE_WINDOWS = [(10, 6, 30), (12, 5, 30), (3, 1, 30), (0, 6, 30), (1, 5, 30), (29, 6, 30), (27, 5, 30),
                   (5, 10, 48)]


@exercise("05", "5.7", "window_layers", "A window of layers", reference=_tracing.window_layers)
def window_layers(answer, hidden):
    expect_callable(answer, "window_layers")
    cases = list(VISIBLE_WINDOWS)
    if hidden:
        generator = hidden_generator(7)
        for _ in range(12):
            n_layers = int(torch.randint(8, 50, (1,), generator=generator))
            window = int(torch.randint(1, 12, (1,), generator=generator))
            center = int(torch.randint(0, n_layers, (1,), generator=generator))
            cases.append((center, window, n_layers))
    for center, window, n_layers in cases:
        what = f"window_layers(center={center}, window={window}, n_layers={n_layers})"
        got = answer(center, window, n_layers)
        expected = _tracing.window_layers(center, window, n_layers)
        if isinstance(got, (range, tuple, torch.Tensor)):
            got = list(got.tolist() if isinstance(got, torch.Tensor) else got)
        if not isinstance(got, list):
            raise CheckFailed(f"{what}: expected a list of layer indices, got {type(got).__name__}.")
        if got == expected:
            continue
        low, high = center - window // 2, center + window - window // 2
        if got == list(range(low, high)):
            raise CheckFailed(f"{what}: you returned {got}; clip the window to the layers that exist, "
                              f"0 .. {n_layers - 1}.")
        if got == list(range(max(0, center), min(n_layers, center + window))):
            raise CheckFailed(f"{what}: your window starts at the center ({got}); centre it: it starts "
                              f"window // 2 = {window // 2} layers earlier.")
        if window % 2 == 1 and got in (list(range(max(0, low), min(n_layers, center + window // 2))),
                                       list(range(max(0, center - (window + 1) // 2), min(n_layers, high)))):
            raise CheckFailed(f"{what}: wrong for an odd window: you returned {got} ({len(got)} layers), expected "
                              f"{expected}. The window runs from center - window // 2 to center + window - "
                              f"window // 2 (excluded); center + window // 2 loses a layer when window is odd.")
        if got in (list(range(max(0, low), min(n_layers, high + 1))), list(range(max(0, low), min(n_layers - 1, high))),
                   list(range(max(0, low), min(n_layers, high - 1)))):
            raise CheckFailed(f"{what}: off by one at the top: expected {expected} (the upper end "
                              f"center + window - window // 2 = {high} is excluded, as in range()).")
        if got in (list(range(max(0, low + 1), min(n_layers, high))), list(range(max(0, low - 1), min(n_layers, high)))):
            raise CheckFailed(f"{what}: off by one at the bottom: expected {expected} (the window starts at "
                              f"center - window // 2 = {low}).")
        raise CheckFailed(f"{what}: expected {expected}, got {got}.")
    return f"{len(cases)} windows"


# ---------------------------------------------------------------------------------------------------------
# 5.8 — the trace grid
# ---------------------------------------------------------------------------------------------------------


def _fact_inputs(model, fact, n_samples, seed):
    prompt, subject, answer_text = fact
    tokens = model.to_tokens(prompt)
    positions = _tracing.subject_positions(model, prompt, subject)
    cache = _tracing.clean_cache(model, tokens)
    noisy = _reference_corrupt(cache["hook_embed"], positions, _tracing.noise_std(model), n_samples, seed)
    return tokens, positions, cache, noisy, model.to_single_token(answer_text)


def _grid_cases(model, hidden):
    cases = []
    tokens, positions, cache, noisy, answer_token = _fact_inputs(model, VISIBLE_FACT, 2, 0)
    key = [positions[-1], tokens.shape[1] - 1]
    cases += [(VISIBLE_FACT[0], tokens, noisy, cache, answer_token, "resid", 1, key, [0, 7, 29]),
              (VISIBLE_FACT[0], tokens, noisy, cache, answer_token, "mlp", 5, [positions[0]] + key, [2, 13]),
              (VISIBLE_FACT[0], tokens, noisy, cache, answer_token, "attn", 6, key, [20, 29])]
    if hidden:
        generator = hidden_generator(8)
        tokens, positions, cache, noisy, answer_token = _fact_inputs(
            model, HIDDEN_FACT, 3, int(torch.randint(0, 10_000, (1,), generator=generator)))
        for kind in _tracing.KINDS:
            layers = sorted(torch.randperm(model.cfg.n_layers, generator=generator)[:2].tolist())
            window = int(torch.randint(2, 8, (1,), generator=generator))
            cases.append((HIDDEN_FACT[0], tokens, noisy, cache, answer_token, kind, window,
                          [positions[-1], tokens.shape[1] - 1], layers))
    return cases


@exercise("05", "5.8", "trace_grid", "The trace grid", points=3, reference=_tracing.trace_grid)
def trace_grid(answer, hidden):
    expect_callable(answer, "trace_grid")
    model = model_for_checks()
    cases = _grid_cases(model, hidden)
    for i, (prompt, tokens, noisy, cache, answer_token, kind, window, positions, layers) in enumerate(cases):
        what = f"case {i} ({prompt!r}, kind {kind!r}, window {window}, layers {layers}, positions {positions})"
        got = answer(model, tokens.clone(), noisy.clone(), dict(cache), answer_token, kind, window, list(positions),
                     list(layers))
        model.reset_hooks()
        expected = _tracing.trace_grid(model, tokens, noisy, cache, answer_token, kind, window, positions, layers)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) == (len(positions), len(layers)) and len(positions) != len(layers):
            raise CheckFailed(f"{what}: your result is transposed: expected [len(layers), len(positions)] = "
                              f"{tuple(expected.shape)}, got {tuple(got.shape)}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} = [len(layers), len(positions)], "
                              f"p(answer) averaged over the noise samples, got {tuple(got.shape)}.")
        got = got.detach().float().cpu()
        if _close(got, expected, atol=2e-4):
            continue
        if (got < 0).any() or (got > 1).any():
            raise CheckFailed(f"{what}: your values are not probabilities: softmax the last position's logits.")
        if kind != "resid" and window > 1 and _close(got, _tracing.trace_grid(
                model, tokens, noisy, cache, answer_token, kind, 1, positions, layers), atol=2e-4):
            raise CheckFailed(f"{what}: you restored only the center layer; restore {kind} in every layer of "
                              f"window_layers(layer, window, n_layers).")
        for shift in (-1, 1):
            shifted = [layer + shift for layer in layers]
            if all(0 <= layer < model.cfg.n_layers for layer in shifted) and _close(got, _tracing.trace_grid(
                    model, tokens, noisy, cache, answer_token, kind, window, positions, shifted), atol=2e-4):
                raise CheckFailed(f"{what}: your rows are those of layers {shifted}: off by one layer.")
        corrupted = _tracing.corrupted_prob(model, tokens, noisy, answer_token).mean()
        if torch.allclose(got, corrupted.expand_as(got), atol=2e-4):
            raise CheckFailed(f"{what}: every entry equals the corrupted run: nothing was restored (check the hook "
                              f"names and that each hook returns the modified activation).")
        expect_tensor(got, expected, what, atol=2e-4,
                      hint="one batch row per (position, noise sample); in row r restore position "
                           "positions[r // n_samples] only, then average each position's rows over the samples.")
    return f"{len(cases)} grids"


# ---------------------------------------------------------------------------------------------------------
# 5.9 — average over facts
# ---------------------------------------------------------------------------------------------------------

VISIBLE_TRACE_FACTS = [VISIBLE_FACT, ("The capital of France is", "France", " Paris")]
HIDDEN_TRACE_FACTS = [HIDDEN_FACT, ("The capital of Germany is", "Germany", " Berlin"),
                      ("Albert Einstein developed the theory of", "Albert Einstein", " relativity")]


def _fact_dicts(model, facts):
    return [{"prompt": prompt, "positions": _tracing.subject_positions(model, prompt, subject),
             "answer_token": model.to_single_token(answer_text)} for prompt, subject, answer_text in facts]


def _variant_trace_facts(model, facts, noise_std, n_samples, kind, window, layers, seed_of=lambda i: i,
                         subject_column=max):
    restored, p_corrupted = [], []
    for index, fact in enumerate(facts):
        tokens = model.to_tokens(fact["prompt"])
        cache = _tracing.clean_cache(model, tokens)
        noisy = _reference_corrupt(cache["hook_embed"], fact["positions"], noise_std, n_samples, seed_of(index))
        key = [subject_column(fact["positions"]), tokens.shape[1] - 1]
        restored.append(_tracing.trace_grid(model, tokens, noisy, cache, fact["answer_token"], kind, window, key,
                                            layers))
        p_corrupted.append(float(_tracing.corrupted_prob(model, tokens, noisy, fact["answer_token"]).mean()))
    return torch.stack(restored), torch.tensor(p_corrupted)


@exercise("05", "5.9", "trace_facts", "Average over facts and noise samples", points=2,
          reference=_tracing.trace_facts)
def trace_facts(answer, hidden):
    expect_callable(answer, "trace_facts")
    model = model_for_checks()
    std = _tracing.noise_std(model)
    cases = [(VISIBLE_TRACE_FACTS, 2, "mlp", 3, [1, 14])]
    if hidden:
        generator = hidden_generator(9)
        layers = sorted(torch.randperm(model.cfg.n_layers, generator=generator)[:2].tolist())
        cases.append((HIDDEN_TRACE_FACTS, 2, "attn", int(torch.randint(2, 7, (1,), generator=generator)), layers))
    for i, (facts, n_samples, kind, window, layers) in enumerate(cases):
        what = f"case {i} ({len(facts)} facts, {n_samples} samples, kind {kind!r}, window {window}, layers {layers})"
        dicts = _fact_dicts(model, facts)
        got = answer(model, [dict(d) for d in dicts], std, n_samples, kind, window, list(layers), _tracing.trace_grid)
        model.reset_hooks()
        expected = _tracing.trace_facts(model, dicts, std, n_samples, kind, window, layers, _tracing.trace_grid)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise CheckFailed(f"{what}: expected a tuple (restored, p_clean, p_corrupted), got "
                              f"{type(got).__name__}{f' of length {len(got)}' if isinstance(got, (tuple, list)) else ''}.")
        names = ("restored", "p_clean", "p_corrupted")
        for name, value, reference in zip(names, got, expected):
            if not isinstance(value, torch.Tensor):
                raise CheckFailed(f"{what}: {name} should be a torch.Tensor, got {type(value).__name__}.")
            if tuple(value.shape) != tuple(reference.shape):
                raise CheckFailed(f"{what}: {name} should have shape {tuple(reference.shape)}, got "
                                  f"{tuple(value.shape)} ({'[n_facts, len(layers), 2]' if name == 'restored' else '[n_facts]'}"
                                  f", averaged over the noise samples).")
        restored, p_clean, p_corrupted = (value.detach().float().cpu() for value in got)
        if not _close(p_clean, expected[1], atol=2e-4):
            if _close(p_clean, expected[2], atol=2e-4):
                raise CheckFailed(f"{what}: your p_clean equals the corrupted probability: run the clean prompt, "
                                  f"without noise, for p_clean.")
            expect_tensor(p_clean, expected[1], f"{what}, p_clean", atol=2e-4,
                          hint="p(answer) at the last position of the clean prompt")
        if _close(restored, expected[0], atol=2e-4) and _close(p_corrupted, expected[2], atol=2e-4):
            continue
        same_seed = _variant_trace_facts(model, dicts, std, n_samples, kind, window, layers, seed_of=lambda i: 0)
        if len(facts) > 1 and _close(restored, same_seed[0], atol=2e-4):
            raise CheckFailed(f"{what}: every fact got the noise of seed 0; fact i must use seed i (so each fact's "
                              f"corruption is its own and reproducible).")
        first = _variant_trace_facts(model, dicts, std, n_samples, kind, window, layers, subject_column=min)
        if _close(restored, first[0], atol=2e-4):
            raise CheckFailed(f"{what}: your first column is the first subject token; trace the *last* subject token "
                              f"(max of the positions) and the last token.")
        if torch.equal(restored[..., 0], restored[..., 1]):
            raise CheckFailed(f"{what}: both columns are equal; column 0 is the last subject token, column 1 the last "
                              f"token of the prompt.")
        expect_tensor(restored, expected[0], f"{what}, restored", atol=2e-4,
                      hint="for fact i: clean cache, corrupt_embeddings(..., seed=i), then trace_fn at [last subject "
                           "token, last token]")
        expect_tensor(p_corrupted, expected[2], f"{what}, p_corrupted", atol=2e-4,
                      hint="the corrupted run's p(answer), averaged over the noise samples")
    return f"{len(cases)} fact lists"


# ---------------------------------------------------------------------------------------------------------
# 5.10 — sever the MLPs
# ---------------------------------------------------------------------------------------------------------


def _variant_severed(model, tokens, noisy, clean_acts, answer_token, position, sever, layers, frozen="corrupted",
                     every_position=False):
    n_samples = noisy.shape[0]
    values = []
    for layer in layers:
        hooks = [("hook_embed", lambda e, hook: noisy)]

        def restore(activation, hook, clean=clean_acts[_tracing.hook_name("resid", layer)]):
            activation[:, position] = clean[0, position]
            return activation

        hooks.append((_tracing.hook_name("resid", layer), restore))
        if sever is not None:
            names = [_tracing.hook_name(sever, m) for m in range(model.cfg.n_layers)]
            if frozen == "clean":
                source = {name: clean_acts[name].expand(n_samples, -1, -1) for name in names}
            else:
                model.reset_hooks()
                with torch.no_grad():
                    _, source = model.run_with_cache(noisy, start_at_layer=0, names_filter=lambda n: n in names)
            where = slice(None) if every_position else position

            def make_freeze(frozen):
                def freeze(activation, hook):
                    activation[:, where] = frozen[:, where]
                    return activation
                return freeze

            hooks += [(name, make_freeze(source[name])) for name in names if int(name.split(".")[1]) > layer]
        model.reset_hooks()
        with torch.no_grad():
            logits = model.run_with_hooks(tokens.expand(n_samples, -1), fwd_hooks=hooks)
        model.reset_hooks()
        values.append(logits[:, -1].float().softmax(-1)[:, answer_token].mean())
    return torch.stack(values)


def _severed_cases(model, hidden):
    tokens, positions, cache, noisy, answer_token = _fact_inputs(model, VISIBLE_FACT, 2, 0)
    cases = [(VISIBLE_FACT[0], tokens, noisy, cache, answer_token, positions[-1], sever, [1, 6, 21])
             for sever in ("mlp", "attn", None)]
    if hidden:
        generator = hidden_generator(10)
        tokens, positions, cache, noisy, answer_token = _fact_inputs(
            model, HIDDEN_TRACE_FACTS[2], 3, int(torch.randint(0, 10_000, (1,), generator=generator)))
        layers = sorted(torch.randperm(24, generator=generator)[:3].tolist())
        cases += [(HIDDEN_TRACE_FACTS[2][0], tokens, noisy, cache, answer_token, positions[-1], sever, layers)
                  for sever in ("mlp", "attn")]
    return cases


@exercise("05", "5.10", "severed_trace", "Sever the MLPs (ROME's Figure 3)", points=3,
          reference=_tracing.severed_trace)
def severed_trace(answer, hidden):
    expect_callable(answer, "severed_trace")
    model = model_for_checks()
    cases = _severed_cases(model, hidden)
    for i, (prompt, tokens, noisy, cache, answer_token, position, sever, layers) in enumerate(cases):
        what = f"case {i} ({prompt!r}, position {position}, sever {sever!r}, layers {layers})"
        got = answer(model, tokens.clone(), noisy.clone(), dict(cache), answer_token, position, sever, list(layers))
        model.reset_hooks()
        expected = _tracing.severed_trace(model, tokens, noisy, cache, answer_token, position, sever, layers)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} (one p(answer) per layer, averaged "
                              f"over the noise samples), got {tuple(got.shape)}.")
        got = got.detach().float().cpu()
        if _close(got, expected, atol=2e-4):
            continue
        if sever is not None:
            plain = _tracing.severed_trace(model, tokens, noisy, cache, answer_token, position, None, layers)
            if _close(got, plain, atol=2e-4):
                raise CheckFailed(f"{what}: your result equals the plain restoration: nothing was severed. Freeze "
                                  f"hook_{sever}_out at `position` in every layer to its corrupted-run value.")
            variants = [
                (dict(frozen="clean"), f"you froze {sever} at its *clean* value; freeze it at its value in the "
                                       f"corrupted run (same noise), so the restored state cannot act through it"),
                (dict(every_position=True), f"you froze {sever} at every position; freeze it only at `position`"),
            ]
            for kwargs, message in variants:
                if _close(got, _variant_severed(model, tokens, noisy, cache, answer_token, position, sever, layers,
                                                **kwargs), atol=2e-4):
                    raise CheckFailed(f"{what}: {message}.")
        expect_tensor(got, expected, what, atol=2e-4,
                      hint="rows = (layer, sample); restore resid_post of that row's layer at `position`, and "
                           "overwrite hook_{sever}_out at `position` in every layer with the corrupted run's value "
                           "for that row's sample.")
    return f"{len(cases)} traces"
