"""Chapter 05's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub
is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import tracing
from utils.course.checking import run_check
from utils.checks import ch05
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub

ALL_CHECKS = [ch05.subject_positions, ch05.noise_level, ch05.corrupt_embeddings, ch05.corrupted_prob,
              ch05.restore_and_prob, ch05.indirect_effect, ch05.window_layers, ch05.trace_grid, ch05.trace_facts,
              ch05.severed_trace]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_ten_exercises():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("05")
    assert [entry.number for entry in entries.values()] == [f"5.{i}" for i in range(1, 11)]


# 5.1 ------------------------------------------------------------------------------------------------------

def test_subject_positions_reference_passes(model):
    _passes(ch05.subject_positions, tracing.subject_positions)


def test_subject_positions_without_bos_rejected(model):
    _rejected(ch05.subject_positions, lambda m, p, s: [i - 1 for i in tracing.subject_positions(m, p, s)], "BOS")


def test_subject_positions_last_token_only_rejected(model):
    _rejected(ch05.subject_positions, lambda m, p, s: tracing.subject_positions(m, p, s)[-1:], "only the last")


def test_subject_positions_run_past_rejected(model):
    _rejected(ch05.subject_positions,
              lambda m, p, s: tracing.subject_positions(m, p, s) + [tracing.subject_positions(m, p, s)[-1] + 1],
              "runs past")


# 5.3 ------------------------------------------------------------------------------------------------------

def _corrupt(embed, positions, std, n_samples, seed=0):
    generator = torch.Generator().manual_seed(seed)
    noisy = embed.repeat(n_samples, 1, 1)
    noisy[:, positions] = noisy[:, positions] + std * torch.randn(n_samples, len(positions), embed.shape[-1],
                                                                  generator=generator)
    return noisy


def test_corrupt_reference_passes():
    _passes(ch05.corrupt_embeddings, _corrupt)


def test_corrupt_all_positions_rejected():
    def answer(embed, positions, std, n_samples, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return embed + std * torch.randn(n_samples, *embed.shape[1:], generator=generator)

    _rejected(ch05.corrupt_embeddings, answer, "outside the subject")


@pytest.mark.parametrize("scale, fragment", [(lambda s: s ** 2, "variance"), (lambda s: 3 * s, "3 * std"),
                                             (lambda s: 1.0, "unscaled")])
def test_corrupt_wrong_std_rejected(scale, fragment):
    _rejected(ch05.corrupt_embeddings, lambda e, p, s, n, seed=0: _corrupt(e, p, scale(s), n, seed), fragment)


def test_corrupt_same_noise_every_sample_rejected():
    def answer(embed, positions, std, n_samples, seed=0):
        generator = torch.Generator().manual_seed(seed)
        noise = std * torch.randn(1, len(positions), embed.shape[-1], generator=generator)
        noisy = embed.repeat(n_samples, 1, 1)
        noisy[:, positions] += noise
        return noisy

    _rejected(ch05.corrupt_embeddings, answer, "same noise")


def test_corrupt_unseeded_rejected():
    def answer(embed, positions, std, n_samples, seed=0):
        noisy = embed.repeat(n_samples, 1, 1)
        noisy[:, positions] += std * torch.randn(n_samples, len(positions), embed.shape[-1])
        return noisy

    _rejected(ch05.corrupt_embeddings, answer, "manual_seed(seed)")


def test_corrupt_in_place_rejected():
    def answer(embed, positions, std, n_samples, seed=0):
        result = _corrupt(embed, positions, std, n_samples, seed)
        embed[:, positions] = 0
        return result

    _rejected(ch05.corrupt_embeddings, answer, "changed the clean embedding")


def test_corrupt_wrong_shape_rejected():
    _rejected(ch05.corrupt_embeddings, lambda e, p, s, n, seed=0: _corrupt(e, p, s, n, seed)[0], "n_samples")


# 5.5 ------------------------------------------------------------------------------------------------------

def _restore(model, tokens, noisy_embed, clean_acts, position, answer_token, shift=0, everywhere=False,
             noise=True, output="prob"):
    def embed_hook(embed, hook):
        return noisy_embed

    def make(clean):
        def hook(activation, hook):
            if everywhere:
                activation[:] = clean
            else:
                activation[:, position + shift] = clean[0, position + shift]
            return activation

        return hook

    hooks = ([("hook_embed", embed_hook)] if noise else []) + [(name, make(c)) for name, c in clean_acts.items()]
    logits = model.run_with_hooks(tokens.expand(noisy_embed.shape[0], -1), fwd_hooks=hooks)
    if output == "logit":
        return logits[:, -1, answer_token]
    return logits[:, -1].softmax(-1)[:, answer_token]


def test_restore_reference_passes(model):
    _passes(ch05.restore_and_prob, tracing.restore_and_prob)
    _passes(ch05.restore_and_prob, _restore)


def test_restore_wrong_position_rejected(model):
    _rejected(ch05.restore_and_prob, lambda *args: _restore(*args, shift=-1), "instead of")


def test_restore_everywhere_rejected(model):
    _rejected(ch05.restore_and_prob, lambda *args: _restore(*args, everywhere=True), "every position")


def test_restore_without_noise_rejected(model):
    _rejected(ch05.restore_and_prob, lambda *args: _restore(*args, noise=False), "noise was not applied")


def test_restore_nothing_rejected(model):
    _rejected(ch05.restore_and_prob, lambda m, t, n, c, p, a: _restore(m, t, n, {}, p, a), "nothing restored")


def test_restore_logits_rejected(model):
    _rejected(ch05.restore_and_prob, lambda *args: _restore(*args, output="logit"), "not probabilities")


# 5.6 ------------------------------------------------------------------------------------------------------

def test_indirect_effect_reference_passes():
    _passes(ch05.indirect_effect, tracing.normalised_effect)


def test_indirect_effect_raw_rejected():
    _rejected(ch05.indirect_effect, lambda r, c, k: r - c, "normalise")


def test_indirect_effect_sign_rejected():
    _rejected(ch05.indirect_effect, lambda r, c, k: (c - r) / (k - c), "sign")


def test_indirect_effect_divided_by_clean_rejected():
    _rejected(ch05.indirect_effect, lambda r, c, k: (r - c) / k, "divided by p_clean")


def test_indirect_effect_ratio_rejected():
    _rejected(ch05.indirect_effect, lambda r, c, k: r / k, "corrupted baseline")


# 5.7 ------------------------------------------------------------------------------------------------------

def test_window_reference_passes():
    _passes(ch05.window_layers, tracing.window_layers)
    _passes(ch05.window_layers, lambda c, w, n: range(max(0, c - w // 2), min(n, c + w - w // 2)))


def test_window_unclipped_rejected():
    _rejected(ch05.window_layers, lambda c, w, n: list(range(c - w // 2, c + w - w // 2)), "clip")


def test_window_not_centred_rejected():
    _rejected(ch05.window_layers, lambda c, w, n: list(range(c, min(n, c + w))), "centre")


def test_window_off_by_one_rejected():
    _rejected(ch05.window_layers, lambda c, w, n: list(range(max(0, c - w // 2), min(n, c + w - w // 2 + 1))),
              "off by one")


def test_window_odd_off_by_one_rejected_on_visible_cases():
    # center + window // 2 as the upper end: right for every even window, one layer short for odd ones
    wrong = lambda c, w, n: list(range(max(0, c - w // 2), min(n, c + w // 2)))
    result = run_check(ch05.window_layers.exercise, wrong, hidden=False)
    assert not result.passed and "odd window" in result.message, result.message
    _rejected(ch05.window_layers, lambda c, w, n: list(range(max(0, c - (w + 1) // 2), min(n, c + w - w // 2))),
              "odd window")


def test_window_visible_cases_catch_what_hidden_ones_catch():
    wrongs = [lambda c, w, n: list(range(max(0, c - w // 2), min(n, c + w // 2))),
              lambda c, w, n: list(range(max(0, c - w // 2), min(n - 1, c + w - w // 2))),
              lambda c, w, n: list(range(max(1, c - w // 2), min(n, c + w - w // 2))),
              lambda c, w, n: list(range(max(0, c - w // 2 + 1), min(n, c + w - w // 2))) if w > 1 else [c]]
    for wrong in wrongs:
        assert not run_check(ch05.window_layers.exercise, wrong, hidden=False).passed


# 5.2 ------------------------------------------------------------------------------------------------------

def test_noise_level_reference_passes(model):
    _passes(ch05.noise_level, tracing.noise_level)


def test_noise_level_mistakes_rejected(model):
    _rejected(ch05.noise_level, lambda m, f, k: tracing.noise_level(m, f, 1.0), "multiplier")
    _rejected(ch05.noise_level, lambda m, f, k: k * m.W_E.std().item(), "whole embedding matrix")
    _rejected(ch05.noise_level, lambda m, f, k: k * m.W_E[m.to_tokens(f[0][0])[0]].std().item() if len(f) == 1
              else k * torch.cat([m.W_E[m.to_tokens(p)[0]] for p, _ in f]).std().item(), "every token of the prompt")
    _rejected(ch05.noise_level, lambda m, f, k: k * sum(
        m.W_E[m.to_tokens(p)[0][tracing.subject_positions(m, p, s)]].std().item() for p, s in f) / len(f), "one std per fact")


def test_noise_level_empty_list_is_a_clear_error(model):
    import pytest as _pytest
    with _pytest.raises(ValueError, match="at least one"):
        tracing.noise_level(model, [])


# 5.4 ------------------------------------------------------------------------------------------------------

def test_corrupted_prob_reference_passes(model):
    _passes(ch05.corrupted_prob, tracing.corrupted_prob)
    _passes(ch05.corrupted_prob, lambda m, t, e, a: _restore(m, t, e, {}, 0, a))


def test_corrupted_prob_mistakes_rejected(model):
    _rejected(ch05.corrupted_prob, lambda m, t, e, a: _restore(m, t, e, {}, 0, a, noise=False), "noise was not applied")
    _rejected(ch05.corrupted_prob, lambda m, t, e, a: _restore(m, t, e, {}, 0, a, output="logit"), "logits")
    _rejected(ch05.corrupted_prob, lambda m, t, e, a: _restore(m, t, e, {}, 0, a).mean(), "do not average")


# 5.8 ------------------------------------------------------------------------------------------------------

def _slow_grid(model, tokens, noisy, clean_acts, answer_token, kind, window, positions, layers, shift=0,
               ignore_window=False):
    """One run per (layer, position) with restore_and_prob: slow but plainly right (with the mistakes to test)."""
    result = torch.zeros(len(layers), len(positions))
    for i, layer in enumerate(layers):
        restored = [layer + shift] if kind == "resid" or ignore_window else tracing.window_layers(
            layer + shift, window, model.cfg.n_layers)
        acts = {tracing.hook_name(kind, l): clean_acts[tracing.hook_name(kind, l)] for l in restored}
        for j, position in enumerate(positions):
            result[i, j] = tracing.restore_and_prob(model, tokens, noisy, acts, position, answer_token).mean()
    return result


def test_trace_grid_reference_passes(model):
    _passes(ch05.trace_grid, tracing.trace_grid)
    _passes(ch05.trace_grid, _slow_grid)


def test_trace_grid_mistakes_rejected(model):
    _rejected(ch05.trace_grid, lambda *a: _slow_grid(*a).T, "transposed")
    _rejected(ch05.trace_grid, lambda *a: _slow_grid(*a, ignore_window=True), "only the center layer")
    _rejected(ch05.trace_grid, lambda m, t, n, c, a, k, w, p, l: _slow_grid(m, t, n, c, a, k, w, p, l, shift=-1)
              if min(l) > 0 else _slow_grid(m, t, n, c, a, k, w, p, l), "off by one layer")


def test_trace_grid_no_restoration_rejected(model):
    _rejected(ch05.trace_grid, lambda m, t, n, c, a, k, w, p, l: tracing.corrupted_prob(m, t, n, a).mean().expand(
        len(l), len(p)).clone(), "nothing was restored")


# 5.9 ------------------------------------------------------------------------------------------------------

def test_trace_facts_reference_passes(model):
    _passes(ch05.trace_facts, tracing.trace_facts)


def test_trace_facts_same_seed_rejected(model):
    def answer(model, facts, std, n, kind, window, layers, trace_fn):
        restored, _ = ch05._variant_trace_facts(model, facts, std, n, kind, window, layers, seed_of=lambda i: 0)
        _, p_clean, p_corrupted = tracing.trace_facts(model, facts, std, n, kind, window, layers)
        return restored, p_clean, p_corrupted

    _rejected(ch05.trace_facts, answer, "seed 0")


def test_trace_facts_first_subject_token_rejected(model):
    def answer(model, facts, std, n, kind, window, layers, trace_fn):
        restored, _ = ch05._variant_trace_facts(model, facts, std, n, kind, window, layers, subject_column=min)
        _, p_clean, p_corrupted = tracing.trace_facts(model, facts, std, n, kind, window, layers)
        return restored, p_clean, p_corrupted

    _rejected(ch05.trace_facts, answer, "first subject token")


def test_trace_facts_noisy_clean_rejected(model):
    def answer(*args):
        restored, _, p_corrupted = tracing.trace_facts(*args)
        return restored, p_corrupted.clone(), p_corrupted

    _rejected(ch05.trace_facts, answer, "p_clean")


# 5.10 -----------------------------------------------------------------------------------------------------

def test_severed_reference_passes(model):
    _passes(ch05.severed_trace, tracing.severed_trace)
    _passes(ch05.severed_trace, ch05._variant_severed)


def test_severed_nothing_severed_rejected(model):
    _rejected(ch05.severed_trace, lambda m, t, n, c, a, p, s, l: tracing.severed_trace(m, t, n, c, a, p, None, l),
              "nothing was severed")


def test_severed_frozen_clean_rejected(model):
    _rejected(ch05.severed_trace, lambda *args: ch05._variant_severed(*args, frozen="clean"), "clean")


def test_severed_every_position_rejected(model):
    _rejected(ch05.severed_trace, lambda *args: ch05._variant_severed(*args, every_position=True), "every position")
