"""Chapter 08's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub is
reported as not attempted. (tests/test_checks_generic.py adds: hard-coded visible outputs are rejected.)"""

from __future__ import annotations

import pytest
import torch

from tests.check_helpers import passes, rejected, stub
from utils import dashboards, sae
from utils.checks import ch08
from utils.course.checking import run_check

ALL_CHECKS = [ch08.topk_activation, ch08.sae_forward, ch08.sae_loss, ch08.train_sae,
              ch08.fraction_variance_explained, ch08.latent_statistics, ch08.spliced_loss, ch08.ce_loss_recovered,
              ch08.top_activations, ch08.promoted_tokens, ch08.dashboard_statistics, ch08.clamp_latent,
              ch08.generate_clamped, ch08.continuation_perplexity]


@pytest.fixture(scope="module")
def model():
    from utils.models import load_model

    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    yield load_model()
    torch.set_grad_enabled(previous)


def test_registry_lists_fourteen_exercises():
    from utils.checks import chapter_exercises

    assert [entry.number for entry in chapter_exercises("08").values()] == [f"8.{i}" for i in range(1, 15)]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, stub, hidden=True)
    assert not result.passed and result.message.startswith("not attempted"), result.message


@pytest.mark.parametrize("check", [c for c in ALL_CHECKS if c not in (ch08.spliced_loss, ch08.generate_clamped,
                                                                       ch08.continuation_perplexity)],
                         ids=lambda check: check.__name__)
def test_reference_passes_without_the_model(check):
    passes(check, check.exercise.reference)


# 8.1 ------------------------------------------------------------------------------------------------------

def test_topk_without_relu_rejected():
    def answer(pre, k):
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    rejected(ch08.topk_activation, answer, "ReLU")


def test_topk_smallest_rejected():
    rejected(ch08.topk_activation, lambda pre, k: (-sae.topk_activation(-pre, k)).relu(), "smallest")


def test_topk_wrong_dim_rejected():
    rejected(ch08.topk_activation, lambda pre, k: sae.topk_activation(pre.transpose(0, -1), k).transpose(0, -1),
             "wrong dimension")


def test_topk_k_plus_one_rejected():
    rejected(ch08.topk_activation, lambda pre, k: sae.topk_activation(pre, k + 1), "more than k")


def test_topk_in_place_rejected():
    def answer(pre, k):
        out = sae.topk_activation(pre, k)
        pre.zero_()
        return out

    rejected(ch08.topk_activation, answer, "in place")


# 8.2 ------------------------------------------------------------------------------------------------------

def test_forward_without_b_dec_centring_rejected():
    def answer(x, params, architecture, k):
        return sae.sae_forward(x + params["b_dec"], params, architecture, k)

    rejected(ch08.sae_forward, answer, "b_dec")


def test_forward_swapped_outputs_rejected():
    rejected(ch08.sae_forward, lambda x, p, a, k: sae.sae_forward(x, p, a, k)[::-1], "(reconstruction, activations)")


def test_forward_decode_without_bias_rejected():
    def answer(x, params, architecture, k):
        acts = sae.encode(x, params, architecture, k)
        return acts @ params["W_dec"], acts

    rejected(ch08.sae_forward, answer, "lacks b_dec")


def test_forward_relu_for_topk_rejected():
    def answer(x, params, architecture, k):
        acts = sae.encode(x, params, "standard")
        return sae.decode(acts, params), acts

    rejected(ch08.sae_forward, answer, "k largest")


def test_forward_without_b_enc_rejected():
    def answer(x, params, architecture, k):
        params = {**params, "b_enc": torch.zeros_like(params["b_enc"])}
        return sae.sae_forward(x, params, architecture, k)

    rejected(ch08.sae_forward, answer, "b_enc")


# 8.3 ------------------------------------------------------------------------------------------------------

def test_loss_mse_mean_over_d_in_rejected():
    def answer(x, params, architecture, k, l1_coefficient):
        out = sae.sae_loss(x, params, architecture, k, l1_coefficient)
        mse = out["mse"] / x.shape[1]
        return {"mse": mse, "l1": out["l1"], "loss": mse + l1_coefficient * out["l1"]}

    rejected(ch08.sae_loss, answer, "averaged over d_in")


def test_loss_l1_without_decoder_norms_rejected():
    def answer(x, params, architecture, k, l1_coefficient):
        recon, acts = sae.sae_forward(x, params, architecture, k)
        mse = (recon - x).pow(2).sum(-1).mean()
        l1 = acts.sum(-1).mean()
        return {"mse": mse, "l1": l1, "loss": mse + l1_coefficient * l1}

    rejected(ch08.sae_loss, answer, "decoder norms")


def test_loss_without_coefficient_rejected():
    def answer(x, params, architecture, k, l1_coefficient):
        out = sae.sae_loss(x, params, architecture, k, l1_coefficient)
        return {**out, "loss": out["mse"] + out["l1"]}

    rejected(ch08.sae_loss, answer, "without l1_coefficient")


# 8.4 ------------------------------------------------------------------------------------------------------

def _loop(activations, d_sae, architecture, k, l1_coefficient, n_steps, batch_size, lr, seed, normalise=True,
          sign=1.0):
    params = sae.init_sae(activations.shape[1], d_sae, seed, b_dec=activations.mean(0))
    for tensor in params.values():
        tensor.requires_grad_(True)
    optimiser = torch.optim.Adam(params.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(n_steps):
            batch = activations[torch.randint(0, len(activations), (batch_size,), generator=generator)]
            loss = sign * sae.sae_loss(batch, params, architecture, k, l1_coefficient)["loss"]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if normalise:
                with torch.no_grad():
                    params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
    return {name: tensor.detach() for name, tensor in params.items()}


def test_train_simple_loop_passes():
    passes(ch08.train_sae, _loop)


def test_train_without_decoder_normalisation_rejected():
    rejected(ch08.train_sae, lambda *args: _loop(*args, normalise=False), "unit norm")


def test_train_untrained_rejected():
    rejected(ch08.train_sae, lambda acts, d_sae, *rest: sae.init_sae(acts.shape[1], d_sae, rest[-1],
                                                                    b_dec=acts.mean(0)), "reference's")


def test_train_gradient_ascent_rejected():
    rejected(ch08.train_sae, lambda *args: _loop(*args, sign=-1.0), "untrained")


def test_train_ignoring_seed_rejected():
    def answer(activations, d_sae, architecture, k, l1_coefficient, n_steps, batch_size, lr, seed):
        return sae.train_sae(activations, d_sae, architecture, k, l1_coefficient, n_steps, batch_size, lr,
                             int(torch.randint(0, 10**6, ())))

    rejected(ch08.train_sae, answer, "same seed")


def test_train_without_l1_rejected():
    def answer(activations, d_sae, architecture, k, l1_coefficient, n_steps, batch_size, lr, seed):
        return sae.train_sae(activations, d_sae, architecture, k, 0.0, n_steps, batch_size, lr, seed)

    rejected(ch08.train_sae, answer, "L1 penalty")


# 8.5 ------------------------------------------------------------------------------------------------------

def test_fve_uncentred_rejected():
    rejected(ch08.fraction_variance_explained, lambda x, r: 1 - (x - r).pow(2).sum() / x.pow(2).sum(), "mean")


def test_fve_per_dimension_rejected():
    def answer(x, recon):
        x, recon = x.reshape(-1, x.shape[-1]), recon.reshape(-1, x.shape[-1])
        return (1 - (x - recon).pow(2).sum(0) / (x - x.mean(0)).pow(2).sum(0)).mean()

    rejected(ch08.fraction_variance_explained, answer, "per-dimension")


def test_fve_batch_mean_only_rejected():
    rejected(ch08.fraction_variance_explained, lambda x, r: 1 - (x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum(),
             "flatten")


def test_fve_unexplained_rejected():
    rejected(ch08.fraction_variance_explained, lambda x, r: 1 - sae.fraction_variance_explained(x, r), "unexplained")


# 8.6 ------------------------------------------------------------------------------------------------------

def test_l0_as_fraction_rejected():
    def answer(acts, threshold):
        out = sae.latent_statistics(acts, threshold)
        return {**out, "l0": float((acts > 0).float().mean())}

    rejected(ch08.latent_statistics, answer, "per token")


def test_l0_as_l1_rejected():
    def answer(acts, threshold):
        out = sae.latent_statistics(acts, threshold)
        return {**out, "l0": float(acts.reshape(-1, acts.shape[-1]).sum(-1).mean())}

    rejected(ch08.latent_statistics, answer, "L1")


def test_dense_at_or_above_rejected():
    def answer(acts, threshold):
        out = sae.latent_statistics(acts, threshold)
        return {**out, "n_dense": int((out["firing_rate"] > threshold / 2).sum())}

    rejected(ch08.latent_statistics, answer, "dense_threshold")


def test_firing_rate_over_wrong_axis_rejected():
    def answer(acts, threshold):
        out = sae.latent_statistics(acts, threshold)
        return {**out, "firing_rate": (acts.reshape(-1, acts.shape[-1]) > 0).float().mean(-1)}

    rejected(ch08.latent_statistics, answer, "firing_rate")


# 8.7 ------------------------------------------------------------------------------------------------------

def test_splice_including_bos_rejected(model):
    def answer(model, tokens, hook_name, params, architecture, k, mode, mean_activation=None):
        if mode == "clean":
            return sae.spliced_loss(model, tokens, hook_name, params, architecture, k, mode, mean_activation)
        return torch.tensor(ch08._spliced_everywhere(model, tokens, hook_name, params, architecture, k, mode,
                                                     mean_activation))

    rejected(ch08.spliced_loss, answer, "BOS")


def test_splice_misaligned_rejected(model):
    def answer(model, tokens, hook_name, params, architecture, k, mode, mean_activation=None):
        return torch.tensor(ch08._misaligned_loss(model, tokens, hook_name, params, architecture, k, mode,
                                                  mean_activation))

    rejected(ch08.spliced_loss, answer, "t + 1")


def test_splice_hook_not_returned_rejected(model):
    def answer(model, tokens, hook_name, params, architecture, k, mode, mean_activation=None):
        return sae.spliced_loss(model, tokens, hook_name, params, architecture, k, "clean", mean_activation)

    rejected(ch08.spliced_loss, answer, "never took effect")


def test_splice_hook_left_behind_rejected(model):
    def answer(model, tokens, hook_name, params, architecture, k, mode, mean_activation=None):
        model.add_hook(hook_name, lambda activation, hook: activation)
        return sae.spliced_loss(model, tokens, hook_name, params, architecture, k, mode, mean_activation)

    rejected(ch08.spliced_loss, answer, "left a hook")


# 8.8 ------------------------------------------------------------------------------------------------------

def test_loss_recovered_inverted_rejected():
    rejected(ch08.ce_loss_recovered, lambda c, s, a: (s - c) / (a - c), "lost")


def test_loss_recovered_divided_by_ablated_rejected():
    rejected(ch08.ce_loss_recovered, lambda c, s, a: (a - s) / a, "not by ablated")


def test_loss_recovered_clipped_rejected():
    rejected(ch08.ce_loss_recovered, lambda c, s, a: max(0.0, min(1.0, (a - s) / (a - c))), "clip")


# 8.9 ------------------------------------------------------------------------------------------------------

def test_top_activations_with_zeros_rejected():
    def answer(acts, n):
        values, indices = acts.flatten().topk(n)
        return values, indices // acts.shape[1], indices % acts.shape[1]

    rejected(ch08.top_activations, answer, "zeros")


def test_top_activations_swapped_rejected():
    rejected(ch08.top_activations, lambda acts, n: (lambda v, s, p: (v, p, s))(*sae.top_activations(acts, n)),
             "swapped")


def test_top_activations_ascending_rejected():
    rejected(ch08.top_activations, lambda acts, n: tuple(t.flip(0) for t in sae.top_activations(acts, n)),
             "largest first")


# 8.10 -----------------------------------------------------------------------------------------------------

def test_promoted_bottom_order_rejected():
    def answer(direction, W_U, n):
        top_ids, top_values, _, _ = sae.promoted_tokens(direction, W_U, n)
        bottom = (direction @ W_U).topk(n, largest=False)
        return top_ids, top_values, bottom.indices.flip(0), bottom.values.flip(0)

    rejected(ch08.promoted_tokens, answer, "most negative first")


def test_promoted_transposed_rejected():
    rejected(ch08.promoted_tokens, lambda d, W, n: sae.promoted_tokens(-d, W, n), "top ids")


# 8.11 -----------------------------------------------------------------------------------------------------

def test_dashboard_negative_window_start_rejected():
    def answer(acts, tokens, direction, W_U, n_top, window, n_bins):
        out = dashboards.dashboard_statistics(acts, tokens, direction, W_U, n_top, window, n_bins)
        values, seqs, positions = sae.top_activations(acts, n_top)
        out["contexts"] = [tokens[s, p - window:p + window + 1].tolist() for s, p in zip(seqs.tolist(),
                                                                                            positions.tolist())]
        return out

    rejected(ch08.dashboard_statistics, answer, "clip the window")


def test_dashboard_highlight_off_rejected():
    def answer(acts, tokens, direction, W_U, n_top, window, n_bins):
        out = dashboards.dashboard_statistics(acts, tokens, direction, W_U, n_top, window, n_bins)
        return {**out, "highlight": [window] * len(out["highlight"])}

    rejected(ch08.dashboard_statistics, answer, "highlight")


def test_dashboard_histogram_with_zeros_rejected():
    def answer(acts, tokens, direction, W_U, n_top, window, n_bins):
        out = dashboards.dashboard_statistics(acts, tokens, direction, W_U, n_top, window, n_bins)
        return {**out, "histogram": torch.histc(acts.flatten(), bins=n_bins, min=0, max=float(acts.max()))}

    rejected(ch08.dashboard_statistics, answer, "zeros included")


# 8.12 -----------------------------------------------------------------------------------------------------

def test_clamp_adds_without_subtracting_rejected():
    rejected(ch08.clamp_latent, lambda r, p, a, k, latent, v: r + v * p["W_dec"][latent], "current activation")


def test_clamp_drops_error_rejected():
    def answer(resid, params, architecture, k, latent, value):
        acts = sae.encode(resid, params, architecture, k)
        acts[..., latent] = value
        return sae.decode(acts, params)

    rejected(ch08.clamp_latent, answer, "error")


def test_clamp_along_encoder_rejected():
    def answer(resid, params, architecture, k, latent, value):
        acts = sae.encode(resid, params, architecture, k)
        return resid + (value - acts[..., latent, None]) * params["W_enc"][:, latent]

    rejected(ch08.clamp_latent, answer, "decoder row")


# 8.13 -----------------------------------------------------------------------------------------------------

def test_generate_unclamped_rejected(model):
    def answer(model, tokens, hook_name, params, architecture, k, latent, value, max_new_tokens):
        return sae.generate_clamped(model, tokens, hook_name, params, architecture, k, None, None, max_new_tokens)

    rejected(ch08.generate_clamped, answer, "unclamped")


def test_generate_new_tokens_only_rejected(model):
    def answer(model, tokens, *args):
        return sae.generate_clamped(model, tokens, *args)[:, tokens.shape[1]:]

    rejected(ch08.generate_clamped, answer, "only the new tokens")


def test_generate_clamp_prompt_only_rejected(model):
    def answer(model, tokens, hook_name, params, architecture, k, latent, value, max_new_tokens):
        return ch08._prompt_only_clamp(model, tokens, hook_name, params, architecture, k, latent, value,
                                       max_new_tokens)

    rejected(ch08.generate_clamped, answer, "only the first new token")


# 8.14 -----------------------------------------------------------------------------------------------------

def test_perplexity_off_by_one_rejected(model):
    rejected(ch08.continuation_perplexity, lambda m, t, n: sae.continuation_perplexity(m, t, n + 1), "position")


def test_perplexity_log_rejected(model):
    rejected(ch08.continuation_perplexity, lambda m, t, n: sae.continuation_perplexity(m, t, n).log(), "exp")


def test_perplexity_one_number_rejected(model):
    rejected(ch08.continuation_perplexity, lambda m, t, n: sae.continuation_perplexity(m, t, n).mean(),
             "one perplexity per row")


def test_perplexity_whole_text_rejected(model):
    rejected(ch08.continuation_perplexity, lambda m, t, n: sae.continuation_perplexity(m, t, 1), "prompt too")
