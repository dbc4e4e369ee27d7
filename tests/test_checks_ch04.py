"""Chapter 04's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub
is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import patching
from utils.course.checking import run_check
from utils.checks import ch04
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub


ALL_CHECKS = [ch04.normalised_metric, ch04.patch_each_position, ch04.patch_each_head, ch04.end_attention,
              ch04.head_output_delta, ch04.attribution_scores]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_reference_passes(check):
    _passes(check, getattr(patching, check.exercise.key))


def test_registry_lists_six_exercises_in_order():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("04")
    assert [entry.number for entry in entries.values()] == ["4.1", "4.2", "4.3", "4.4", "4.5", "4.6"]


# 4.1 ------------------------------------------------------------------------------------------------------

def test_metric_flipped_rejected():
    _rejected(ch04.normalised_metric, lambda v, clean, corr: (v - clean) / (corr - clean), "flipped")


def test_metric_no_baseline_rejected():
    _rejected(ch04.normalised_metric, lambda v, clean, corr: v / clean, "corrupted baseline")


def test_metric_wrong_denominator_rejected():
    _rejected(ch04.normalised_metric, lambda v, clean, corr: (v - corr) / clean, "gap")


def test_metric_mean_rejected():
    _rejected(ch04.normalised_metric, lambda v, clean, corr: ((v - corr) / (clean - corr)).mean(), "shape")


# 4.2 ------------------------------------------------------------------------------------------------------

def test_position_nothing_patched_rejected():
    _rejected(ch04.patch_each_position, lambda act, hook, clean, positions: act, "nothing was patched")


def test_position_returns_none_rejected():
    def answer(act, hook, clean, positions):
        patching.patch_each_position(act, hook, clean, positions)

    _rejected(ch04.patch_each_position, answer, "returned none")


def test_position_interleaved_rejected():
    def answer(act, hook, clean, positions):
        for i, p in enumerate(positions):
            act[i::len(positions), p] = clean[:, p]
        return act

    _rejected(ch04.patch_each_position, answer, "row layout")


def test_position_onwards_rejected():
    def answer(act, hook, clean, positions):
        b = clean.shape[0]
        for i, p in enumerate(positions):
            act[i * b:(i + 1) * b, p:] = clean[:, p:]
        return act

    _rejected(ch04.patch_each_position, answer, "every later position")


def test_position_everywhere_rejected():
    def answer(act, hook, clean, positions):
        for p in positions:
            act[:, p] = clean.repeat(len(positions), 1, 1)[:, p]
        return act

    _rejected(ch04.patch_each_position, answer, "every position in every copy")


# 4.3 ------------------------------------------------------------------------------------------------------

def test_head_all_heads_rejected():
    _rejected(ch04.patch_each_head, lambda z, hook, clean: clean.repeat(clean.shape[2], 1, 1, 1), "every head")


def test_head_interleaved_rejected():
    def answer(z, hook, clean):
        n = clean.shape[2]
        for h in range(n):
            z[h::n, :, h] = clean[:, :, h]
        return z

    _rejected(ch04.patch_each_head, answer, "row layout")


def test_head_last_position_only_rejected():
    def answer(z, hook, clean):
        b = clean.shape[0]
        for h in range(clean.shape[2]):
            z[h * b:(h + 1) * b, -1, h] = clean[:, -1, h]
        return z

    _rejected(ch04.patch_each_head, answer, "last position")


def test_head_nothing_patched_rejected():
    _rejected(ch04.patch_each_head, lambda z, hook, clean: z, "nothing was patched")


# 4.4 ------------------------------------------------------------------------------------------------------

def test_end_attention_per_prompt_rejected():
    def answer(pattern, keys):
        return pattern[torch.arange(pattern.shape[0]), :, -1, keys]

    _rejected(ch04.end_attention, answer, "average over the prompts")


def test_end_attention_broadcast_rejected():
    _rejected(ch04.end_attention, lambda pattern, keys: pattern[:, :, -1, keys], "pairs every prompt")


def test_end_attention_swapped_rejected():
    def answer(pattern, keys):
        return pattern[torch.arange(pattern.shape[0]), :, keys, -1].mean(0)

    _rejected(ch04.end_attention, answer, "swapped query and key")


def test_end_attention_bos_query_rejected():
    def answer(pattern, keys):
        return pattern[torch.arange(pattern.shape[0]), :, 0, keys].mean(0)

    _rejected(ch04.end_attention, answer, "position 0")


def test_end_attention_cross_mean_rejected():
    _rejected(ch04.end_attention, lambda pattern, keys: pattern[:, :, -1, keys].mean(dim=(0, 2)), "pair prompt b")


# 4.5 ------------------------------------------------------------------------------------------------------

def test_delta_sign_rejected():
    _rejected(ch04.head_output_delta, lambda c, k, W, h: (k[:, :, h] - c[:, :, h]) @ W[h], "wrong sign")


def test_delta_clean_only_rejected():
    _rejected(ch04.head_output_delta, lambda c, k, W, h: c[:, :, h] @ W[h], "clean output itself")


def test_delta_no_W_O_rejected():
    _rejected(ch04.head_output_delta, lambda c, k, W, h: c[:, :, h] - k[:, :, h], "W_O")


def test_delta_wrong_head_rejected():
    def answer(c, k, W, h):
        other = (h + 1) % c.shape[2]
        return (c[:, :, other] - k[:, :, other]) @ W[other]

    _rejected(ch04.head_output_delta, answer, "wrong head")


# 4.6 ------------------------------------------------------------------------------------------------------

def test_attribution_sign_rejected():
    _rejected(ch04.attribution_scores, lambda c, k, g: ((k - c) * g).sum(dim=(1, 2, 4)), "wrong sign")


def test_attribution_mean_over_batch_rejected():
    _rejected(ch04.attribution_scores, lambda c, k, g: ((c - k) * g).sum(dim=(2, 4)).mean(1), "averaged")


def test_attribution_clean_only_rejected():
    _rejected(ch04.attribution_scores, lambda c, k, g: (c * g).sum(dim=(1, 2, 4)), "clean - corrupted")


def test_attribution_abs_rejected():
    _rejected(ch04.attribution_scores, lambda c, k, g: ((c - k) * g).abs().sum(dim=(1, 2, 4)), "sign")


def test_attribution_wrong_shape_rejected():
    _rejected(ch04.attribution_scores, lambda c, k, g: ((c - k) * g).sum(dim=(2, 4)), "shape")
