"""Chapter 04's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub
is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import ablation, patching
from utils.course.checking import run_check
from utils.checks import ch04
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub


ALL_CHECKS = [ch04.ioi_logit_diff, ch04.normalised_metric, ch04.patch_each_position, ch04.patch_resid_grid,
              ch04.patch_each_head, ch04.patch_head_grid, ch04.end_attention, ch04.path_patch,
              ch04.attribution_patch_heads, ch04.template_means, ch04.circuit_logit_diff]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_reference_passes(check):
    _passes(check, getattr(patching, check.exercise.key))


def test_registry_lists_eleven_exercises_in_order():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("04")
    assert [entry.number for entry in entries.values()] == [f"4.{i}" for i in range(1, 12)]


# 4.1 ------------------------------------------------------------------------------------------------------

def _ld(logits, io, s, position=-1):
    rows = torch.arange(logits.shape[0])
    return logits[rows, position, io] - logits[rows, position, s]


def test_logit_diff_sign_rejected():
    _rejected(ch04.ioi_logit_diff, lambda logits, io, s: -_ld(logits, io, s), "wrong sign")


def test_logit_diff_first_position_rejected():
    _rejected(ch04.ioi_logit_diff, lambda logits, io, s: _ld(logits, io, s, 0), "position 0")


def test_logit_diff_broadcast_rejected():
    _rejected(ch04.ioi_logit_diff, lambda logits, io, s: logits[:, -1, io] - logits[:, -1, s], "pairs every prompt")


def test_logit_diff_mean_rejected():
    _rejected(ch04.ioi_logit_diff, lambda logits, io, s: _ld(logits, io, s).mean(), "one logit difference per prompt")


# 4.2 ------------------------------------------------------------------------------------------------------

def test_metric_flipped_rejected():
    _rejected(ch04.normalised_metric, lambda v, clean, corr: (v - clean) / (corr - clean), "flipped")


def test_metric_no_baseline_rejected():
    _rejected(ch04.normalised_metric, lambda v, clean, corr: v / clean, "corrupted baseline")


def test_metric_wrong_denominator_rejected():
    _rejected(ch04.normalised_metric, lambda v, clean, corr: (v - corr) / clean, "gap")


def test_metric_mean_rejected():
    _rejected(ch04.normalised_metric, lambda v, clean, corr: ((v - corr) / (clean - corr)).mean(), "shape")


# 4.3 ------------------------------------------------------------------------------------------------------

def test_position_nothing_patched_rejected():
    _rejected(ch04.patch_each_position, lambda act, hook, clean, positions: act, "nothing was patched")


def test_position_returns_none_rejected():
    def answer(act, hook, clean, positions):
        patching.patch_each_position(act, hook, clean, positions)

    _rejected(ch04.patch_each_position, answer, "returned none")


def test_position_interleaved_rejected():
    def answer(act, hook, clean, positions):
        n, batch = positions.shape
        for i in range(n):
            for b in range(batch):
                act[b * n + i, positions[i, b]] = clean[b, positions[i, b]]
        return act

    _rejected(ch04.patch_each_position, answer, "row layout")


def test_position_first_prompts_position_rejected():
    def answer(act, hook, clean, positions):
        batch = clean.shape[0]
        for i in range(positions.shape[0]):
            act[i * batch:(i + 1) * batch, positions[i, 0]] = clean[:, positions[i, 0]]
        return act

    _rejected(ch04.patch_each_position, answer, "own position")


def test_position_crossed_rejected():
    def answer(act, hook, clean, positions):
        batch = clean.shape[0]
        for i in range(positions.shape[0]):
            for b in range(batch):
                act[i * batch + b, positions[i]] = clean[b, positions[i]]
        return act

    _rejected(ch04.patch_each_position, answer, "own position")


# 4.4 ------------------------------------------------------------------------------------------------------

def test_resid_grid_backwards_rejected():
    def answer(model, clean, corrupted, readout, positions, layers):
        return patching.patch_resid_grid(model, corrupted, clean, readout, positions, layers)

    _rejected(ch04.patch_resid_grid, answer, "other way round")


def test_resid_grid_resid_post_rejected():
    def answer(model, clean, corrupted, readout, positions, layers):
        return patching.patch_resid_grid(model, clean, corrupted, readout, positions, [l + 1 for l in layers])

    _rejected(ch04.patch_resid_grid, answer, "resid_post")


def test_resid_grid_no_patch_rejected():
    def answer(model, clean, corrupted, readout, positions, layers):
        base = readout(ablation.final_resid(model, corrupted))
        return base.expand(len(layers), positions.shape[0], -1).clone()

    _rejected(ch04.patch_resid_grid, answer, "unpatched")


# 4.5 ------------------------------------------------------------------------------------------------------

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


# 4.6 ------------------------------------------------------------------------------------------------------

def test_head_grid_backwards_rejected():
    def answer(model, clean, corrupted, readout, layers):
        return patching.patch_head_grid(model, corrupted, clean, readout, layers)

    _rejected(ch04.patch_head_grid, answer, "other way round")


def test_head_grid_last_position_rejected():
    def answer(model, clean, corrupted, readout, layers):
        clean_z, _ = ablation.head_z(model, clean)
        resid = ablation.resid_pre(model, corrupted)
        batch, n_heads = clean.shape[0], model.cfg.n_heads
        rows = []
        for layer in layers:
            def hook(z, hook, layer=layer):
                for h in range(n_heads):
                    z[h * batch:(h + 1) * batch, -1, h] = clean_z[layer][:, -1, h]
                return z
            final = ablation.final_resid(model, resid[layer].repeat(n_heads, 1, 1), [(ablation.z_name(layer), hook)],
                                         start_at_layer=layer)
            rows.append(readout(final.view(n_heads, batch, *final.shape[1:])))
        return torch.stack(rows)

    _rejected(ch04.patch_head_grid, answer, "last position only")


def test_head_grid_no_patch_rejected():
    def answer(model, clean, corrupted, readout, layers):
        base = readout(ablation.final_resid(model, corrupted))
        return base.expand(len(layers), model.cfg.n_heads, -1).clone()

    _rejected(ch04.patch_head_grid, answer, "unpatched")


# 4.7 ------------------------------------------------------------------------------------------------------

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


# 4.8 ------------------------------------------------------------------------------------------------------

def test_path_patch_unfrozen_rejected():
    def answer(*args):
        return patching._path_patch(*args, freeze_others=False)

    _rejected(ch04.path_patch, answer, "freeze")


def test_path_patch_every_head_rejected():
    def answer(*args):
        return patching._path_patch(*args, only_receivers=False)

    _rejected(ch04.path_patch, answer, "every head")


def test_path_patch_whole_sender_rejected():
    def answer(model, clean, abc, senders, receivers, receiver_input, readout):
        abc_z, _ = ablation.head_z(model, abc)

        def make(layer):
            def hook(z, hook):
                for l, h in senders:
                    if l == layer:
                        z[:, :, h] = abc_z[layer][:, :, h]
                return z
            return hook

        return readout(ablation.final_resid(model, clean, [(ablation.z_name(l), make(l)) for l in {l for l, _ in
                                                                                                    senders}]))

    _rejected(ch04.path_patch, answer, "whole output")


def test_path_patch_clean_run_rejected():
    def answer(model, clean, abc, senders, receivers, receiver_input, readout):
        return readout(ablation.final_resid(model, clean))

    _rejected(ch04.path_patch, answer, "clean run")


# 4.9 ------------------------------------------------------------------------------------------------------

def test_attribution_sign_rejected():
    _rejected(ch04.attribution_patch_heads, lambda *args: -patching.attribution_patch_heads(*args), "wrong sign")


def test_attribution_sum_metric_rejected():
    def answer(model, clean, corrupted, readout):
        return patching.attribution_patch_heads(model, clean, corrupted, readout) * clean.shape[0]

    _rejected(ch04.attribution_patch_heads, answer, "too large")


def test_attribution_cut_graph_rejected():
    _rejected(ch04.attribution_patch_heads, lambda *args: patching._attribution(*args, cut_at_each_head=True),
              "detached")


# 4.10 -----------------------------------------------------------------------------------------------------

def test_template_means_global_rejected():
    _rejected(ch04.template_means, lambda z, groups: z.mean(1, keepdim=True).expand_as(z).clone(), "every prompt")


def test_template_means_unchanged_rejected():
    _rejected(ch04.template_means, lambda z, groups: z, "unchanged")


# 4.11 -----------------------------------------------------------------------------------------------------

def test_circuit_inverted_rejected():
    def answer(model, tokens, circuit, ablation_z, readout):
        every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
        rest = [x for x in every if x not in set(circuit)]
        return patching.circuit_logit_diff(model, tokens, rest, ablation_z, readout)

    _rejected(ch04.circuit_logit_diff, answer, "outside")


def test_circuit_zero_ablation_rejected():
    def answer(model, tokens, circuit, ablation_z, readout):
        return patching.circuit_logit_diff(model, tokens, circuit, torch.zeros_like(ablation_z), readout)

    _rejected(ch04.circuit_logit_diff, answer, "zero-ablated")


def test_circuit_full_model_rejected():
    def answer(model, tokens, circuit, ablation_z, readout):
        return readout(ablation.final_resid(model, tokens))

    _rejected(ch04.circuit_logit_diff, answer, "full model")
