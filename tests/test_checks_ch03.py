"""Chapter 03's checks: each reference passes with the hidden cases, each plausible mistake is rejected with a
message naming it, and an untouched stub is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import ablation
from utils.course.checking import run_check
from utils.checks import ch03
from utils.lens import rms
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub


ALL_CHECKS = [ch03.logit_diff_metric, ch03.mean_ablation_hook, ch03.resample_ablation_hook, ch03.head_direct_effect]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_four_exercises():
    from utils.checks import chapter_exercises

    assert [entry.number for entry in chapter_exercises("03").values()] == ["3.1", "3.2", "3.3", "3.4"]


# 3.1 ------------------------------------------------------------------------------------------------------

def _ld(logits, io, s):
    rows = torch.arange(len(io))
    return logits[rows, -1, io] - logits[rows, -1, s]


def test_logit_diff_reference_passes():
    _passes(ch03.logit_diff_metric, _ld)


def test_logit_diff_of_log_probs_passes():
    _passes(ch03.logit_diff_metric, lambda logits, io, s: _ld(logits.log_softmax(-1), io, s))


def test_logit_diff_wrong_sign_rejected():
    _rejected(ch03.logit_diff_metric, lambda logits, io, s: -_ld(logits, io, s), "sign")


def test_logit_diff_first_position_rejected():
    _rejected(ch03.logit_diff_metric, lambda logits, io, s: _ld(logits[:, :1], io, s), "position 0")


def test_logit_diff_mean_rejected():
    _rejected(ch03.logit_diff_metric, lambda logits, io, s: _ld(logits, io, s).mean(), "per prompt")


def test_logit_diff_all_pairs_rejected():
    _rejected(ch03.logit_diff_metric, lambda logits, io, s: logits[:, -1, io] - logits[:, -1, s], "shape")


def test_logit_diff_io_only_rejected():
    _rejected(ch03.logit_diff_metric, lambda logits, io, s: logits[torch.arange(len(io)), -1, io], "subtract")


# 3.2 ------------------------------------------------------------------------------------------------------

def _hook_factory(edit):
    def factory(values, head):
        def hook(z, hook):
            edit(z, values, head)
            return z
        return hook
    return factory


def test_mean_hook_reference_passes():
    _passes(ch03.mean_ablation_hook, ablation.mean_ablation_hook)


def test_mean_hook_without_return_passes():
    def factory(reference, head):
        def hook(z, hook):
            z[:, :, head] = reference[:, :, head].mean(0)
        return hook

    _passes(ch03.mean_ablation_hook, factory)


def test_mean_hook_zero_rejected():
    _rejected(ch03.mean_ablation_hook, _hook_factory(lambda z, ref, h: z[:, :, h].zero_()), "zeroed")


def test_mean_hook_over_positions_rejected():
    def edit(z, ref, h):
        z[:, :, h] = ref[:, :, h].mean((0, 1))

    _rejected(ch03.mean_ablation_hook, _hook_factory(edit), "positions")


def test_mean_hook_of_ablated_batch_rejected():
    def edit(z, ref, h):
        z[:, :, h] = z[:, :, h].mean(0, keepdim=True).clone()

    _rejected(ch03.mean_ablation_hook, _hook_factory(edit), "reference")


def test_mean_hook_all_heads_rejected():
    def edit(z, ref, h):
        z[:] = ref.mean(0)

    _rejected(ch03.mean_ablation_hook, _hook_factory(edit), "other than head")


def test_mean_hook_unchanged_rejected():
    _rejected(ch03.mean_ablation_hook, _hook_factory(lambda z, ref, h: None), "unchanged")


def test_mean_hook_not_a_hook_rejected():
    _rejected(ch03.mean_ablation_hook, lambda reference, head: reference[:, :, head].mean(0), "hook function")


# 3.3 ------------------------------------------------------------------------------------------------------

def test_resample_hook_reference_passes():
    _passes(ch03.resample_ablation_hook, ablation.resample_ablation_hook)


def test_resample_hook_donor_mean_rejected():
    def edit(z, donor, h):
        z[:, :, h] = donor[:, :, h].mean(0)

    _rejected(ch03.resample_ablation_hook, _hook_factory(edit), "mean ablation")


def test_resample_hook_first_donor_rejected():
    def edit(z, donor, h):
        z[:, :, h] = donor[0, :, h]

    _rejected(ch03.resample_ablation_hook, _hook_factory(edit), "donor row 0")


def test_resample_hook_all_heads_rejected():
    def edit(z, donor, h):
        z[:] = donor

    _rejected(ch03.resample_ablation_hook, _hook_factory(edit), "every head")


def test_resample_hook_zero_rejected():
    _rejected(ch03.resample_ablation_hook, _hook_factory(lambda z, donor, h: z[:, :, h].zero_()), "values differ")


# 3.4 ------------------------------------------------------------------------------------------------------

def _direction(model, io, s):
    return model.W_U[:, io] - model.W_U[:, s]


def test_direct_effect_reference_passes():
    _passes(ch03.head_direct_effect, ablation.head_direct_effect)


def test_direct_effect_via_ln_final_passes():
    def answer(model, z, final, layer, head, io, s):
        out = z[:, -1, head] @ model.W_O[layer, head]
        scale = final[:, -1].pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
        logits = (out / scale) @ model.W_U
        rows = torch.arange(len(io))
        return logits[rows, io] - logits[rows, s]

    _passes(ch03.head_direct_effect, answer)


def test_direct_effect_no_norm_rejected():
    def answer(model, z, final, layer, head, io, s):
        out = z[:, -1, head] @ model.W_O[layer, head]
        return (out * _direction(model, io, s).T).sum(-1)

    _rejected(ch03.head_direct_effect, answer, "final norm")


def test_direct_effect_own_rms_rejected():
    def answer(model, z, final, layer, head, io, s):
        out = z[:, -1, head] @ model.W_O[layer, head]
        return ((out / rms(out)) * _direction(model, io, s).T).sum(-1)

    _rejected(ch03.head_direct_effect, answer, "own rms")


def test_direct_effect_sign_rejected():
    _rejected(ch03.head_direct_effect, lambda *args: -ablation.head_direct_effect(*args), "sign")


def test_direct_effect_io_only_rejected():
    def answer(model, z, final, layer, head, io, s):
        out = z[:, -1, head] @ model.W_O[layer, head]
        return ((out / rms(final[:, -1])) * model.W_U[:, io].T).sum(-1)

    _rejected(ch03.head_direct_effect, answer, "IO unembedding alone")


def test_direct_effect_all_positions_rejected():
    def answer(model, z, final, layer, head, io, s):
        out = (z[:, :, head] @ model.W_O[layer, head]) / rms(final)
        return torch.einsum("bpm,mb->b", out, _direction(model, io, s))

    _rejected(ch03.head_direct_effect, answer, "every position")


def test_direct_effect_wrong_head_rejected():
    def answer(model, z, final, layer, head, io, s):
        return ablation.head_direct_effect(model, z, final, layer, (head + 1) % 9, io, s)

    _rejected(ch03.head_direct_effect, answer, "values differ")
