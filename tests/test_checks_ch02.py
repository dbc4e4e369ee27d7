"""Chapter 02's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub
is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import heads
from utils.course.checking import run_check
from utils.checks import ch02
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub


ALL_CHECKS = [ch02.repeated_tokens, ch02.repeat_losses, ch02.previous_token_scores, ch02.duplicate_token_scores,
              ch02.induction_scores, ch02.composition_score]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_six_exercises():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("02")
    assert [entry.number for entry in entries.values()] == ["2.1", "2.2", "2.3", "2.4", "2.5", "2.6"]


# 2.1 ------------------------------------------------------------------------------------------------------

def test_repeated_tokens_reference_passes():
    _passes(ch02.repeated_tokens, heads.repeated_random_tokens)


def test_repeated_tokens_other_generator_passes():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        g = torch.Generator().manual_seed(seed + 99)
        half = low + torch.randint(0, high - low, (n_batch, half_len), generator=g)
        parts = ([torch.full((n_batch, 1), bos)] if bos is not None else []) + [half, half]
        return torch.cat(parts, 1)

    _passes(ch02.repeated_tokens, answer)


def test_repeated_tokens_not_repeated_rejected():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        g = torch.Generator().manual_seed(seed)
        body = torch.randint(low, high, (n_batch, 2 * half_len), generator=g)
        return body if bos is None else torch.cat([torch.full((n_batch, 1), bos), body], 1)

    _rejected(ch02.repeated_tokens, answer, "repeat the first half")


def test_repeated_tokens_always_bos_rejected():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        return heads.repeated_random_tokens(n_batch, half_len, low, high, 0 if bos is None else bos, seed)

    _rejected(ch02.repeated_tokens, answer, "no BOS column")


def test_repeated_tokens_unseeded_rejected():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        return heads.repeated_random_tokens(n_batch, half_len, low, high, bos, int(torch.randint(0, 10**6, ())))

    _rejected(ch02.repeated_tokens, answer, "same seed")


def test_repeated_tokens_high_inclusive_rejected():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        tokens = heads.repeated_random_tokens(n_batch, half_len, low, high, bos, seed)
        body = tokens if bos is None else tokens[:, 1:]
        body[:, 0] = high
        body[:, half_len] = high
        return tokens

    _rejected(ch02.repeated_tokens, answer, "[low, high)")


# 2.2 ------------------------------------------------------------------------------------------------------

def test_previous_token_reference_passes():
    _passes(ch02.previous_token_scores, heads.previous_token_scores)


def test_previous_token_main_diagonal_rejected():
    _rejected(ch02.previous_token_scores, lambda p: p.diagonal(dim1=-2, dim2=-1).mean(dim=(0, -1)), "own position")


def test_previous_token_wrong_denominator_rejected():
    _rejected(ch02.previous_token_scores,
              lambda p: p.diagonal(offset=-1, dim1=-2, dim2=-1).sum(-1).mean(0) / p.shape[-1], "divided")


def test_previous_token_per_batch_rejected():
    _rejected(ch02.previous_token_scores, lambda p: p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1), "shape")


# 2.3 ------------------------------------------------------------------------------------------------------

def test_duplicate_reference_passes():
    _passes(ch02.duplicate_token_scores, heads.duplicate_token_scores)


def test_duplicate_is_induction_rejected():
    _rejected(ch02.duplicate_token_scores, heads.induction_scores, "induction score")


def test_duplicate_off_by_one_rejected():
    _rejected(ch02.duplicate_token_scores, lambda p, h: ch02._offset_score(p, h, -1), "off by one")


def test_duplicate_all_queries_rejected():
    _rejected(ch02.duplicate_token_scores, lambda p, h: ch02._offset_score(p, h, 0, all_queries=True), "first copy")


# 2.4 ------------------------------------------------------------------------------------------------------

def test_induction_reference_passes():
    _passes(ch02.induction_scores, heads.induction_scores)


def test_induction_is_duplicate_rejected():
    _rejected(ch02.induction_scores, heads.duplicate_token_scores, "off by one", "after")


def test_induction_plus_two_rejected():
    _rejected(ch02.induction_scores, lambda p, h: ch02._offset_score(p, h, 2), "off by one", "+ 2")


def test_induction_first_copy_queries_rejected():
    _rejected(ch02.induction_scores, lambda p, h: ch02._offset_score(p, h, 1, all_queries=True), "first copy")


def test_induction_drops_last_query_rejected():
    def answer(p, h):
        q = torch.arange(h + 1, 2 * h)
        return p[:, :, q, q - h + 1].mean(dim=(0, -1))

    _rejected(ch02.induction_scores, answer, "last query")


# 2.5 ------------------------------------------------------------------------------------------------------

def test_repeat_losses_reference_passes():
    _passes(ch02.repeat_losses, heads.repeat_losses)


def test_repeat_losses_unshifted_rejected():
    def answer(logits, tokens, half_len):
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
        losses = losses.view(tokens.shape)
        return losses[:, 2:half_len + 1].mean().item(), losses[:, half_len + 1:].mean().item()

    _rejected(ch02.repeat_losses, answer, "shift")


def test_repeat_losses_swapped_rejected():
    _rejected(ch02.repeat_losses, lambda l, t, h: heads.repeat_losses(l, t, h)[::-1], "swapped")


def test_repeat_losses_includes_unpredictable_token_rejected():
    def answer(logits, tokens, half_len):
        per_pos = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return per_pos[:, 1:half_len].mean().item(), per_pos[:, half_len:].mean().item()

    _rejected(ch02.repeat_losses, answer, "not predictable")


# 2.6 ------------------------------------------------------------------------------------------------------

def test_composition_reference_passes():
    _passes(ch02.composition_score, heads.composition_score)


def test_composition_unnormalised_rejected():
    _rejected(ch02.composition_score, lambda a, b: (a @ b).norm(dim=(-2, -1)), "normalise")


def test_composition_wrong_order_rejected():
    _rejected(ch02.composition_score, lambda a, b: heads.composition_score(b, a), "wrong order")


def test_composition_flattened_norm_rejected():
    _rejected(ch02.composition_score, lambda a, b: (a @ b).norm() / (a.norm() * b.norm()), "shape")


# the toy's training data (utils.heads.toy_induction_batch) ---------------------------------------------------

def test_toy_induction_batch_layout():
    for fixed in (False, True):
        tokens = heads.toy_induction_batch(step=3, batch=16, fixed=fixed)
        assert tokens.shape == (16, 64) and tokens.dtype == torch.long
        assert (tokens[:, 0] == 0).all() and tokens[:, 1:].min() >= 1 and tokens[:, 1:].max() < 500
        assert torch.equal(tokens, heads.toy_induction_batch(step=3, batch=16, fixed=fixed))
    fixed_tokens = heads.toy_induction_batch(step=3, batch=16, fixed=True)
    assert torch.equal(fixed_tokens[:, 32:], fixed_tokens[:, 1:33])  # always 31 back
    variable = heads.toy_induction_batch(step=3, batch=64)
    periods = set()
    for row in variable:
        body = row[1:]
        periods.add(next(p for p in range(8, 32) if torch.equal(body[p:], body[:-p])))
    assert len(periods) > 5  # the repeat distance varies from row to row
