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


ALL_CHECKS = [ch06.expand_kv_heads, ch06.z_from_weights, ch06.residual_components, ch06.direct_logit_attribution,
              ch06.factored_svd, ch06.copying_score, ch06.ov_eigenvalues]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_seven_exercises():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("06")
    assert [entry.number for entry in entries.values()] == ["6.1", "6.2", "6.3", "6.4", "6.5", "6.6", "6.7"]
    assert sum(entry.points for entry in entries.values()) == 11


# 6.1 ------------------------------------------------------------------------------------------------------

def test_expand_kv_heads_reference_passes():
    _passes(ch06.expand_kv_heads, circuits.expand_kv_heads)


def test_expand_kv_heads_tiled_rejected():
    def tiled(W, n_heads):
        return W.repeat(*([1] * (W.ndim - 3)), n_heads // W.shape[-3], 1, 1)

    _rejected(ch06.expand_kv_heads, tiled, "tiled", "repeat_interleave")


def test_expand_kv_heads_no_expansion_rejected():
    _rejected(ch06.expand_kv_heads, lambda W, n_heads: W, "expected shape")


# 6.2 ------------------------------------------------------------------------------------------------------

def test_z_from_weights_reference_passes():
    _passes(ch06.z_from_weights, circuits.z_from_weights)


def test_z_from_weights_tiled_rejected():
    def tiled(pattern, normalized, W_V):
        W = W_V.repeat(pattern.shape[1] // W_V.shape[0], 1, 1)
        values = torch.einsum("bpd,hde->bphe", normalized, W)
        return torch.einsum("bhqk,bkhe->bqhe", pattern, values)

    _rejected(ch06.z_from_weights, tiled, "tiled")


def test_z_from_weights_transposed_pattern_rejected():
    def transposed(pattern, normalized, W_V):
        values = torch.einsum("bpd,hde->bphe", normalized, circuits.expand_kv_heads(W_V, pattern.shape[1]))
        return torch.einsum("bhkq,bkhe->bqhe", pattern, values)

    _rejected(ch06.z_from_weights, transposed, "swapped the query and key")


def test_z_from_weights_per_kv_head_rejected():
    def per_kv(pattern, normalized, W_V):  # forgot to expand: one z per key/value head
        values = torch.einsum("bpd,hde->bphe", normalized, W_V)
        return torch.einsum("bhqk,bkhe->bqhe", pattern[:, :W_V.shape[0]], values)

    _rejected(ch06.z_from_weights, per_kv, "query")


# 6.3 ------------------------------------------------------------------------------------------------------

def test_residual_components_reference_passes():
    _passes(ch06.residual_components, circuits.residual_components)


def test_residual_components_missing_embedding_rejected():
    _rejected(ch06.residual_components, lambda cache, n_layers, pos=-1: circuits.residual_components(
        cache, n_layers, pos)[1:], "embedding")


def test_residual_components_blocked_order_rejected():
    def blocked(cache, n_layers, pos=-1):
        rows = circuits.residual_components(cache, n_layers, pos)
        return torch.cat([rows[:1], rows[1::2], rows[2::2]])

    _rejected(ch06.residual_components, blocked, "order")


def test_residual_components_running_totals_rejected():
    def totals(cache, n_layers, pos=-1):
        rows = [cache["blocks.0.hook_resid_pre"][:, pos]]
        for layer in range(n_layers):
            rows += [cache[f"blocks.{layer}.hook_resid_mid"][:, pos], cache[f"blocks.{layer}.hook_resid_post"][:, pos]]
        return torch.stack(rows)

    _rejected(ch06.residual_components, totals, "running totals")


def test_residual_components_all_positions_rejected():
    def every_position(cache, n_layers, pos=-1):
        rows = [cache["blocks.0.hook_resid_pre"]]
        for layer in range(n_layers):
            rows += [cache[f"blocks.{layer}.hook_attn_out"], cache[f"blocks.{layer}.hook_mlp_out"]]
        return torch.stack(rows)

    _rejected(ch06.residual_components, every_position, "position")


# 6.4 ------------------------------------------------------------------------------------------------------

def test_dla_reference_passes():
    _passes(ch06.direct_logit_attribution, circuits.direct_logit_attribution)


def test_dla_without_norm_rejected():
    _rejected(ch06.direct_logit_attribution, lambda c, f, d: (c * d.T).sum(-1), "final norm")


def test_dla_own_rms_rejected():
    _rejected(ch06.direct_logit_attribution, lambda c, f, d: ((c / rms(c)) * d.T).sum(-1), "own rms")


def test_dla_summed_over_batch_rejected():
    _rejected(ch06.direct_logit_attribution,
              lambda c, f, d: circuits.direct_logit_attribution(c, f, d).sum(-1), "batch")


def test_dla_wrong_sign_rejected():
    _rejected(ch06.direct_logit_attribution, lambda c, f, d: -circuits.direct_logit_attribution(c, f, d), "sign")


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


# 6.6 ------------------------------------------------------------------------------------------------------

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


# 6.7 ------------------------------------------------------------------------------------------------------

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
