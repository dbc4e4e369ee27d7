"""Chapter 01's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub
is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import lens
from utils.course.checking import run_check
from utils.checks import ch01
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub


def _entry(check):
    return check.exercise


ALL_CHECKS = [ch01.logit_lens, ch01.next_token_ranks, ch01.kl_from_final, ch01.mean_kl_per_layer,
              ch01.fit_translator, ch01.train_translator_kl, ch01.linearised_logit_lens, ch01.linearisation_error]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(_entry(check), _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_nine_exercises():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("01")
    assert [entry.number for entry in entries.values()] == ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8",
                                                                 "1.9"]


# 1.1 ------------------------------------------------------------------------------------------------------

def test_logit_lens_reference_passes(model):
    _passes(ch01.logit_lens, lens.logit_lens)


def test_logit_lens_via_accumulated_resid_passes(model):
    _passes(ch01.logit_lens, lambda model, cache: model.unembed(cache.accumulated_resid(apply_ln=True)))


def test_logit_lens_without_norm_rejected(model):
    _rejected(ch01.logit_lens, lambda model, cache: model.unembed(lens.resid_stack(cache, model.cfg.n_layers)),
              "final norm")


def test_logit_lens_missing_embedding_rejected(model):
    def answer(model, cache):
        rows = [cache[f"blocks.{layer}.hook_resid_post"] for layer in range(model.cfg.n_layers)]
        return model.unembed(model.ln_final(torch.stack(rows)))

    _rejected(ch01.logit_lens, answer, "embedding row")


def test_logit_lens_resid_pre_only_rejected(model):
    def answer(model, cache):
        rows = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(model.cfg.n_layers)]
        return model.unembed(model.ln_final(torch.stack(rows)))

    _rejected(ch01.logit_lens, answer, "last block's output")


def test_logit_lens_with_resid_mid_rejected(model):
    def answer(model, cache):
        return model.unembed(model.ln_final(cache.accumulated_resid(incl_mid=True)))

    _rejected(ch01.logit_lens, answer, "resid_mid")


def test_logit_lens_wrong_axis_rejected(model):
    _rejected(ch01.logit_lens, lambda model, cache: lens.logit_lens(model, cache).transpose(0, 1), "wrong order")


def test_logit_lens_cached_final_scale_rejected(model):
    def answer(model, cache):
        stack = cache.accumulated_resid()
        return model.unembed(cache.apply_ln_to_stack(stack))  # one cached scale for every layer

    _rejected(ch01.logit_lens, answer, "final layer's norm scale")


# 1.2 ------------------------------------------------------------------------------------------------------

def test_ranks_reference_passes(model):
    _passes(ch01.next_token_ranks, lens.next_token_ranks)


def test_ranks_zero_based_rejected(model):
    _rejected(ch01.next_token_ranks, lambda logits, tokens: lens.next_token_ranks(logits, tokens) - 1, "start at 0")


def test_ranks_not_shifted_rejected(model):
    def answer(logits, tokens):
        target = logits[:, :-1].gather(-1, tokens[:-1].view(1, -1, 1).expand(logits.shape[0], -1, 1))
        return (logits[:, :-1] > target).sum(-1) + 1

    _rejected(ch01.next_token_ranks, answer, "own input token")


def test_ranks_ascending_rejected(model):
    def answer(logits, tokens):
        order = logits[:, :-1].argsort(-1)  # ascending: rank 0 = least likely
        return (order == tokens[1:].view(1, -1, 1)).float().argmax(-1) + 1

    _rejected(ch01.next_token_ranks, answer, "least likely")


def test_ranks_all_positions_rejected(model):
    def answer(logits, tokens):
        ranks = lens.next_token_ranks(logits, tokens)
        return torch.cat([ranks, ranks[:, -1:]], dim=1)

    _rejected(ch01.next_token_ranks, answer, "pos - 1")


# 1.3 ------------------------------------------------------------------------------------------------------

def test_kl_reference_passes(model):
    _passes(ch01.kl_from_final, lens.kl_from_final)


def test_kl_with_torch_function_passes(model):
    def answer(final_logits, lens_logits):
        log_q = lens_logits.log_softmax(-1)
        log_p = final_logits.log_softmax(-1).expand_as(log_q)
        return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)

    _passes(ch01.kl_from_final, answer)


def test_kl_reversed_rejected(model):
    _rejected(ch01.kl_from_final, lambda final, lens_logits: lens.kl_from_final(lens_logits, final), "KL(lens || final)")


def test_kl_raw_logits_rejected(model):
    _rejected(ch01.kl_from_final,
              lambda final, lens_logits: (final.softmax(-1) * (final - lens_logits)).sum(-1), "log_softmax")


def test_kl_bits_rejected(model):
    _rejected(ch01.kl_from_final, lambda final, lens_logits: lens.kl_from_final(final, lens_logits) / 0.6931471805599453,
              "bits")


def test_kl_wrong_axis_rejected(model):
    def answer(final, lens_logits):
        log_p, log_q = final.log_softmax(-1), lens_logits.log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(0)

    _rejected(ch01.kl_from_final, answer, "last axis")


# 1.5 ------------------------------------------------------------------------------------------------------

def test_settling_reference_passes():
    _passes(ch01.settling_layer, ch01.settling_layer_from)


def test_settling_hard_coded_layer_rejected():
    _rejected(ch01.settling_layer, lambda curve, threshold: 30, "expected 5")


def test_settling_first_dip_rejected():
    _rejected(ch01.settling_layer, lambda curve, threshold: int((curve < threshold).nonzero()[0]), "stays below")


def test_settling_less_or_equal_rejected():
    def with_equal(curve, threshold):
        above = (curve > threshold).nonzero()
        return 0 if len(above) == 0 else int(above[-1]) + 1

    _rejected(ch01.settling_layer, with_equal, "not <=")


def test_settling_wrong_type_rejected():
    _rejected(ch01.settling_layer, lambda curve, threshold: "layer 20", "expected an int")


def test_settling_stub_not_attempted():
    result = run_check(_entry(ch01.settling_layer), _stub, hidden=True)
    assert not result.passed and result.message.startswith("not attempted"), result.message


def test_settling_layer_from():
    kl = torch.tensor([5.0, 0.5, 2.0, 0.9, 0.2, 0.0])
    assert ch01.settling_layer_from(kl, 1.0) == 3
    assert ch01.settling_layer_from(torch.zeros(4), 1.0) == 0


# 1.6 ------------------------------------------------------------------------------------------------------

def test_translator_reference_passes():
    _passes(ch01.fit_translator, lens.fit_translator)


def test_translator_ridge_to_zero_rejected():
    def answer(x, y, ridge):
        xc, yc = x - x.mean(0), y - y.mean(0)
        weight = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(x.shape[1]), xc.T @ yc)
        return weight, y.mean(0) - x.mean(0) @ weight

    _rejected(ch01.fit_translator, answer, "towards zero")


def test_translator_transposed_rejected():
    def answer(x, y, ridge):
        weight, bias = lens.fit_translator(x, y, ridge)
        return weight.T, bias

    _rejected(ch01.fit_translator, answer, "transpose")


def test_translator_uncentred_rejected():
    def answer(x, y, ridge):
        eye = torch.eye(x.shape[1])
        weight = torch.linalg.solve(x.T @ x + ridge * eye, x.T @ y + ridge * eye)
        return weight, torch.zeros(x.shape[1])

    _rejected(ch01.fit_translator, answer, "intercept")


# 1.8 ------------------------------------------------------------------------------------------------------

def test_linearised_reference_passes(model):
    _passes(ch01.linearised_logit_lens, lens.linearised_logit_lens)


def test_linearised_with_cached_scale_passes(model):
    def answer(model, cache):
        stack = cache.accumulated_resid()
        return model.unembed(cache.apply_ln_to_stack(stack))  # TransformerLens's frozen-scale path

    _passes(ch01.linearised_logit_lens, answer)


def test_linearised_exact_lens_rejected(model):
    _rejected(ch01.linearised_logit_lens, lens.logit_lens, "exact logit lens")


def test_linearised_first_layer_scale_rejected(model):
    def answer(model, cache):
        stack = lens.resid_stack(cache, model.cfg.n_layers)
        return model.unembed(stack / lens.rms(stack[0]))

    _rejected(ch01.linearised_logit_lens, answer, "embedding's scale")


def test_linearised_multiplied_rejected(model):
    def answer(model, cache):
        stack = lens.resid_stack(cache, model.cfg.n_layers)
        return model.unembed(stack * lens.rms(stack[-1]))

    _rejected(ch01.linearised_logit_lens, answer, "multiplied")


# 1.4 ------------------------------------------------------------------------------------------------------

def _mean_kl(norm="own", reverse=False, mean_of_chunks=False):
    def answer(model, resid, chunk):
        return ch01._mean_kl_variant(model, resid, chunk, norm=norm, reverse=reverse, mean_of_chunks=mean_of_chunks)
    return answer


def test_mean_kl_reference_passes(model):
    _passes(ch01.mean_kl_per_layer, lens.mean_logit_lens_kl)


def test_mean_kl_with_ln_final_passes(model):
    def answer(model, resid, chunk):
        total = torch.zeros(resid.shape[0])
        for start in range(0, resid.shape[1], chunk):
            block = resid[:, start:start + chunk]
            logits = model.unembed(model.ln_final(block))
            total += lens.kl_from_final(logits[-1], logits).sum(-1)
        return total / resid.shape[1]

    _passes(ch01.mean_kl_per_layer, answer)


def test_mean_kl_without_norm_rejected(model):
    _rejected(ch01.mean_kl_per_layer, _mean_kl(norm="none"), "final norm")


def test_mean_kl_frozen_scale_rejected(model):
    _rejected(ch01.mean_kl_per_layer, _mean_kl(norm="final"), "frozen-scale")


def test_mean_kl_reversed_rejected(model):
    _rejected(ch01.mean_kl_per_layer, _mean_kl(reverse=True), "KL(lens || final)")


def test_mean_kl_mean_of_chunk_means_rejected(model):
    _rejected(ch01.mean_kl_per_layer, _mean_kl(mean_of_chunks=True), "shorter")


def test_mean_kl_per_token_shape_rejected(model):
    _rejected(ch01.mean_kl_per_layer, lambda model, resid, chunk: lens.mean_logit_lens_kl(model, resid, chunk)[None],
              "[n_rows]")


# 1.7 ------------------------------------------------------------------------------------------------------

def _train(**settings):
    def answer(model, h, h_final, weight, bias, steps, lr, batch_size):
        return ch01._train_variant(model, h, h_final, weight, bias, steps, lr, batch_size, **settings)
    return answer


def test_train_reference_passes(model):
    _passes(ch01.train_translator_kl, lens.train_translator_kl)


def test_train_reversed_kl_rejected(model):
    _rejected(ch01.train_translator_kl, _train(reverse=True), "KL(lens || final)")


def test_train_without_norm_rejected(model):
    _rejected(ch01.train_translator_kl, _train(norm=False), "final norm")


def test_train_same_batch_rejected(model):
    _rejected(ch01.train_translator_kl, _train(cycle=False), "same first batch")


def test_train_summed_loss_rejected(model):
    _rejected(ch01.train_translator_kl, _train(loss_sum=True), "average")


def test_train_no_step_rejected(model):
    _rejected(ch01.train_translator_kl,
              lambda model, h, h_final, weight, bias, steps, lr, batch_size: (weight, bias), "unchanged")


def test_train_one_step_short_rejected(model):
    def answer(model, h, h_final, weight, bias, steps, lr, batch_size):
        return lens.train_translator_kl(model, h, h_final, weight, bias, steps - 1, lr, batch_size)

    _rejected(ch01.train_translator_kl, answer, "too few")


# 1.9 ------------------------------------------------------------------------------------------------------

def _linerr(**settings):
    def answer(model, resid, chunk):
        return ch01._linerr_variant(model, resid, chunk, **settings)
    return answer


def test_linerr_reference_passes(model):
    _passes(ch01.linearisation_error, lens.linearisation_error)


def test_linerr_ratio_trick_passes(model):
    def answer(model, resid, chunk):
        total = torch.zeros(resid.shape[0])
        for start in range(0, resid.shape[1], chunk):
            block = resid[:, start:start + chunk]
            exact = model.unembed(model.ln_final(block))
            ratio = lens.rms(block, model.cfg.eps) / lens.rms(block[-1], model.cfg.eps)
            frozen = (exact - model.b_U) * ratio + model.b_U
            total += lens.kl_from_final(exact, frozen).sum(-1)
        return total / resid.shape[1]

    _passes(ch01.linearisation_error, answer)


def test_linerr_own_scale_rejected(model):
    _rejected(ch01.linearisation_error, lambda model, resid, chunk: torch.zeros(resid.shape[0]), "own scale")


def test_linerr_reversed_rejected(model):
    _rejected(ch01.linearisation_error, _linerr(reverse=True), "KL(frozen || exact)")


def test_linerr_against_final_rejected(model):
    _rejected(ch01.linearisation_error, _linerr(against_final=True), "final output")


def test_linerr_inverse_scale_rejected(model):
    _rejected(ch01.linearisation_error, _linerr(inverse=True), "wrong way")


def test_new_references_reject_bad_shapes(model):
    with pytest.raises(ValueError, match="n_rows"):
        lens.mean_logit_lens_kl(model, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="chunk"):
        lens.linearisation_error(model, torch.zeros(3, 4, 5), 0)
    with pytest.raises(ValueError, match="n_tokens"):
        lens.train_translator_kl(model, torch.zeros(4, 5), torch.zeros(3, 5), torch.eye(5), torch.zeros(5), 1)
