"""Checks for chapter 05 — Causal tracing of factual recall.

References come from `utils.tracing` (the course's batched causal-tracing code, reused by later chapters). Every
check runs the learner's answer on small cases (one or two short prompts, two noise samples) and, when it is wrong,
compares it with the usual mistakes to say which one.
"""

from __future__ import annotations

import torch

from utils import tracing as _tracing
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor
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


@exercise("05", "5.1", "subject_positions", "Where is the subject?")
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
# 5.2 — corrupt the subject
# ---------------------------------------------------------------------------------------------------------


def _reference_corrupt(embed, positions, std, n_samples, seed):
    noise = _tracing.subject_noise(n_samples, len(positions), embed.shape[-1], std, seed)
    return _tracing.add_subject_noise(embed, positions, noise)


@exercise("05", "5.2", "corrupt_embeddings", "Corrupt the subject with noise", points=2)
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
# 5.3 — restore one state
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


@exercise("05", "5.3", "restore_and_prob", "Restore one state, read p(answer)", points=3)
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

        def restore_all(activation, hook):
            activation[:] = everywhere[hook.name].to(activation.dtype)
            return activation

        model.reset_hooks()
        with torch.no_grad():
            logits = model.run_with_hooks(tokens.expand(noisy.shape[0], -1),
                                          fwd_hooks=[("hook_embed", lambda e, hook: noisy)] +
                                          [(name, restore_all) for name in clean])
        model.reset_hooks()
        if _close(got, logits[:, -1].softmax(-1)[:, answer_token], atol=1e-4):
            raise CheckFailed(f"{what}: you restored the clean activation at every position. Restore only "
                              f"`position` (activation[:, position] = ...), leave the others corrupted.")
        expect_tensor(got, expected, what, atol=1e-4,
                      hint="replace hook_embed by noisy_embed, overwrite each hooked activation at `position` with "
                           "its clean value, then softmax the last position's logits.")
    return f"{len(cases)} restorations"


# ---------------------------------------------------------------------------------------------------------
# 5.4 — the indirect effect
# ---------------------------------------------------------------------------------------------------------


@exercise("05", "5.4", "indirect_effect", "The normalised indirect effect")
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
# 5.5 — the window of layers
# ---------------------------------------------------------------------------------------------------------


@exercise("05", "5.5", "window_layers", "A window of layers")
def window_layers(answer, hidden):
    expect_callable(answer, "window_layers")
    cases = [(10, 6, 30), (0, 6, 30), (29, 6, 30), (5, 10, 48)]
    if hidden:
        cases += [(1, 6, 30), (27, 6, 30), (12, 5, 30), (3, 1, 30), (46, 10, 48)]
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
        if got == list(range(center, min(n_layers, center + window))):
            raise CheckFailed(f"{what}: your window starts at the center ({got}); centre it: it starts "
                              f"window // 2 = {window // 2} layers earlier.")
        if got == list(range(max(0, low), min(n_layers, high + 1))) or got == list(range(max(0, low), min(
                n_layers - 1, high))):
            raise CheckFailed(f"{what}: off by one at the top: expected {expected} (the upper end "
                              f"center + window - window // 2 = {high} is excluded, as in range()).")
        raise CheckFailed(f"{what}: expected {expected}, got {got}.")
    return f"{len(cases)} windows"
