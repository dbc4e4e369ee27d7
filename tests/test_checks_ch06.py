"""Chapter 06's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub
is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import circuits
from utils.course.checking import run_check
from utils.checks import ch06
from utils.lens import rms
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub

ALL_CHECKS = [ch06.attention_from_weights, ch06.neuron_direct_effects, ch06.head_roles, ch06.factored_svd,
              ch06.copying_score, ch06.ov_eigenvalues, ch06.composed_qk_circuit, ch06.mlp0_copying_scores]

@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_eight_exercises():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("06")
    assert sorted(entry.number for entry in entries.values()) == [f"6.{i}" for i in range(1, 9)]
    assert all(entry.reference is not None for entry in entries.values())


# 6.1 attention_from_weights -----------------------------------------------------------------------------------

def _attention(tile=False, sqrt=True, mask=True, q_bias=True, v_bias=True):
    def attention_from_weights(normalized, W_Q, b_Q, W_K, b_K, W_V, b_V):
        group = W_Q.shape[0] // W_K.shape[0]
        expand = (lambda w: w.repeat(group, *([1] * (w.ndim - 1)))) if tile else (lambda w: w.repeat_interleave(group, 0))
        W_K, b_K, W_V, b_V = expand(W_K), expand(b_K), expand(W_V), expand(b_V)
        q = torch.einsum("bpd,hde->bhpe", normalized, W_Q) + (b_Q[:, None] if q_bias else 0)
        k = torch.einsum("bpd,hde->bhpe", normalized, W_K) + b_K[:, None]
        v = torch.einsum("bpd,hde->bhpe", normalized, W_V) + (b_V[:, None] if v_bias else 0)
        scores = q @ k.transpose(-1, -2) / (W_Q.shape[-1] ** 0.5 if sqrt else 1)
        if mask:
            n = normalized.shape[1]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        pattern = scores.softmax(-1)
        return pattern, torch.einsum("bhqk,bhke->bqhe", pattern, v)

    return attention_from_weights


def test_attention_hand_written_passes():
    _passes(ch06.attention_from_weights, _attention())


def test_attention_tiled_rejected():
    _rejected(ch06.attention_from_weights, _attention(tile=True), "tiled")


def test_attention_no_sqrt_rejected():
    _rejected(ch06.attention_from_weights, _attention(sqrt=False), "sqrt(d_head)")


def test_attention_no_mask_rejected():
    _rejected(ch06.attention_from_weights, _attention(mask=False), "mask")


def test_attention_no_query_bias_rejected():
    _rejected(ch06.attention_from_weights, _attention(q_bias=False), "b_Q")


def test_attention_no_value_bias_rejected():
    _rejected(ch06.attention_from_weights, _attention(v_bias=False), "b_V")


def test_attention_reproduces_the_toy():
    from utils.heads import induction_toy, repeated_random_tokens

    toy = induction_toy()
    tokens = repeated_random_tokens(2, 6, 1, 500, bos=0, seed=0)
    _, cache = toy.run_with_cache(tokens)
    for layer in range(2):
        pattern, z = circuits.attention_from_weights(cache[f"blocks.{layer}.ln1.hook_out"], toy.W_Q[layer],
                                                     toy.b_Q[layer], toy.W_K[layer], toy.b_K[layer], toy.W_V[layer],
                                                     toy.b_V[layer])
        assert torch.allclose(pattern, cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-5)
        assert torch.allclose(z, cache[f"blocks.{layer}.attn.hook_z"], atol=1e-4)


# 6.2 neuron_direct_effects -------------------------------------------------------------------------------------

def test_neuron_effects_hand_written_passes():
    _passes(ch06.neuron_direct_effects,
            lambda post, W_out, final, d: torch.einsum("lbn,lnm,mb->lnb", post, W_out, d) / rms(final)[:, 0])


def test_neuron_effects_without_norm_rejected():
    _rejected(ch06.neuron_direct_effects, lambda post, W_out, final, d: torch.einsum("lbn,lnm,mb->lnb", post, W_out, d),
              "final norm")


def test_neuron_effects_wrong_layout_rejected():
    _rejected(ch06.neuron_direct_effects,
              lambda post, W_out, final, d: torch.einsum("lbn,lnm,mb->lbn", post, W_out, d) / rms(final)[:, 0, None],
              "[n_layers, d_mlp, batch]")


def test_neuron_effects_wrong_sign_rejected():
    _rejected(ch06.neuron_direct_effects, lambda *a: -circuits.neuron_direct_effects(*a), "sign")


# 6.3 head_roles -----------------------------------------------------------------------------------------------

def _roles(s1_only=False, per_prompt_first=False):
    def head_roles(effect, patterns, positions, threshold):
        pattern = torch.stack([p[:, :, -1] for p in patterns]).transpose(1, 2)
        rows = torch.arange(pattern.shape[2])
        to = {r: pattern[:, :, rows, positions[r]].mean(-1) for r in ("IO", "S1", "S2")}
        s = to["S1"] if s1_only else torch.maximum(to["S1"], to["S2"])
        io = to["IO"] > s
        s2 = to["S2"] > torch.maximum(to["IO"], to["S1"])
        if per_prompt_first:  # a different (wrong) reading: the first prompt only
            io = pattern[:, :, 0, positions["IO"][0]] > pattern[:, :, 0, positions["S1"][0]]
        masks = {"name movers": (effect > threshold) & io, "negative name movers": (effect < -threshold) & io,
                 "S2 writers": (effect > threshold) & s2}
        return {k: [tuple(x) for x in m.nonzero().tolist()] for k, m in masks.items()}

    return head_roles


def test_head_roles_hand_written_passes():
    _passes(ch06.head_roles, _roles())


def test_head_roles_s1_only_rejected():
    _rejected(ch06.head_roles, _roles(s1_only=True), "S1 only")


def test_head_roles_first_prompt_rejected():
    _rejected(ch06.head_roles, _roles(per_prompt_first=True), "over the prompts")


def test_head_roles_wrong_keys_rejected():
    _rejected(ch06.head_roles, lambda *a: {"movers": []}, "keys")


# 6.7 composed_qk_circuit --------------------------------------------------------------------------------------

def _ln(x):
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()


def test_composed_qk_hand_written_passes():
    _passes(ch06.composed_qk_circuit,
            lambda E, V0, O0, Q1, K1: (_ln(E) @ Q1) @ (_ln(E) @ (V0 @ O0).sum(0) @ K1).T)


def test_composed_qk_raw_embeddings_rejected():
    _rejected(ch06.composed_qk_circuit, lambda E, V0, O0, Q1, K1: (E @ Q1) @ (E @ (V0 @ O0).sum(0) @ K1).T, "raw")


def test_composed_qk_direct_circuit_rejected():
    _rejected(ch06.composed_qk_circuit, lambda E, V0, O0, Q1, K1: (_ln(E) @ Q1) @ (_ln(E) @ K1).T, "direct QK")


def test_composed_qk_transposed_rejected():
    _rejected(ch06.composed_qk_circuit,
              lambda E, V0, O0, Q1, K1: ((_ln(E) @ Q1) @ (_ln(E) @ (V0 @ O0).sum(0) @ K1).T).T, "transposed")


# 6.8 mlp0_copying_scores --------------------------------------------------------------------------------------

def test_mlp0_tiled_rejected():
    _rejected(ch06.mlp0_copying_scores,
              lambda m, ids, hs, k, neg: ch06._mlp0_variant(m, ids, hs, k, neg, tiled=True), "tiled")


def test_mlp0_raw_embeddings_rejected():
    _rejected(ch06.mlp0_copying_scores,
              lambda m, ids, hs, k, neg: ch06._mlp0_variant(m, ids, hs, k, neg, embed_only=True), "first MLP")


def test_mlp0_ignores_negative_rejected():
    _rejected(ch06.mlp0_copying_scores,
              lambda m, ids, hs, k, neg: ch06._mlp0_variant(m, ids, hs, k, False), "flip the sign")


def test_mlp0_name_movers_copy():
    from utils import ioi
    from utils.models import model_for_checks

    model = model_for_checks()
    ids = torch.tensor([ioi.single_token_id(model, n) for n in ioi.NAMES if ioi._is_single_token(model, n)])
    scores = circuits.mlp0_copying_scores(model, ids, [(23, 0), (23, 2), (29, 0)]).mean(-1)
    assert scores[0] > 0.5 and scores[1] > 0.5 and scores[2] < 0.5


# 6.4 - 6.6 (factored SVD, copying score, OV eigenvalues) ------------------------------------------------------
# 6.5 ------------------------------------------------------------------------------------------------------

def test_factored_svd_reference_passes():
    _passes(ch06.factored_svd, circuits.factored_svd)


def test_factored_svd_direct_thin_svd_passes():
    def direct(A, B):
        r = A.shape[-1]
        U, S, Vh = torch.linalg.svd(A @ B, full_matrices=False)
        return U[..., :r], S[..., :r], Vh[..., :r, :]

    _passes(ch06.factored_svd, direct)


def test_factored_svd_full_matrices_rejected():
    _rejected(ch06.factored_svd, lambda A, B: torch.linalg.svd(A @ B), "thin")


def test_factored_svd_core_vectors_not_rotated_back_rejected():
    def unrotated(A, B):
        _, R_A = torch.linalg.qr(A)
        _, R_B = torch.linalg.qr(B.transpose(-1, -2))
        U, S, Vh = torch.linalg.svd(R_A @ R_B.transpose(-1, -2))
        return A @ U, S, Vh @ B  # not orthonormal

    _rejected(ch06.factored_svd, unrotated, "orthonormal")


def test_factored_svd_ascending_rejected():
    def ascending(A, B):
        U, S, Vh = circuits.factored_svd(A, B)
        return U.flip(-1), S.flip(-1), Vh.flip(-2)

    _rejected(ch06.factored_svd, ascending, "descending")


# 6.5 ------------------------------------------------------------------------------------------------------

def test_copying_score_reference_passes():
    _passes(ch06.copying_score, circuits.copying_score)


def test_copying_score_abs_numerator_rejected():
    _rejected(ch06.copying_score, lambda e: e.real.abs().sum(-1) / e.abs().sum(-1), "signed real parts")


def test_copying_score_real_denominator_rejected():
    _rejected(ch06.copying_score, lambda e: e.real.sum(-1) / e.real.abs().sum(-1), "modulus")


def test_copying_score_complex_rejected():
    _rejected(ch06.copying_score, lambda e: e.sum(-1) / e.abs().sum(-1), "real")


def test_copying_score_wrong_axis_rejected():
    _rejected(ch06.copying_score, lambda e: e.real.sum() / e.abs().sum(), "last axis")


# 6.6 ------------------------------------------------------------------------------------------------------

def test_ov_eigenvalues_reference_passes():
    _passes(ch06.ov_eigenvalues, circuits.ov_eigenvalues)


def test_ov_eigenvalues_transposed_core_passes():
    # (W_O W_UE W_V)^T has the same eigenvalues
    _passes(ch06.ov_eigenvalues, lambda W_V, W_O, W_UE: torch.linalg.eigvals(
        W_V.transpose(-1, -2) @ W_UE.transpose(-1, -2) @ W_O.transpose(-1, -2)))


def test_ov_eigenvalues_d_model_product_rejected():
    _rejected(ch06.ov_eigenvalues, lambda W_V, W_O, W_UE: torch.linalg.eigvals(W_V @ W_O @ W_UE), "d_head")


def test_ov_eigenvalues_without_embeddings_rejected():
    _rejected(ch06.ov_eigenvalues, lambda W_V, W_O, W_UE: torch.linalg.eigvals(W_O @ W_V), "W_OV alone")


def test_ov_eigenvalues_transposed_w_ue_rejected():
    _rejected(ch06.ov_eigenvalues, lambda W_V, W_O, W_UE: torch.linalg.eigvals(W_O @ W_UE.T @ W_V), "transposed")


def test_ov_eigenvalues_real_only_rejected():
    _rejected(ch06.ov_eigenvalues, lambda W_V, W_O, W_UE: torch.linalg.eigvals(W_O @ W_UE @ W_V).real, "complex")
