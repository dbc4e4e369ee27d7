"""Chapter 05's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub
is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import tracing
from utils.course.checking import run_check
from utils.checks import ch05
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub

ALL_CHECKS = [ch05.subject_positions, ch05.corrupt_embeddings, ch05.restore_and_prob, ch05.indirect_effect,
              ch05.window_layers]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_five_exercises():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("05")
    assert [entry.number for entry in entries.values()] == ["5.1", "5.2", "5.3", "5.4", "5.5"]


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


# 5.2 ------------------------------------------------------------------------------------------------------

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


# 5.3 ------------------------------------------------------------------------------------------------------

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


# 5.4 ------------------------------------------------------------------------------------------------------

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


# 5.5 ------------------------------------------------------------------------------------------------------

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
