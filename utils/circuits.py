"""Reading a transformer's weights: per-head weights under grouped-query attention, the residual stream as a sum
of components, direct logit attribution, factored (low-rank) circuits and the eigenvalue copying score.

Chapter 06 has the learner write these first; its checks compare against the functions here, and later chapters
import them.

    W = head_weights(model)                                  # W_Q, W_K, W_V, W_O: [n_layers, n_heads, ...]
    parts = residual_components(cache, model.cfg.n_layers)   # [2 * n_layers + 1, batch, d_model] (last position)
    dla = direct_logit_attribution(parts, final_resid, direction)   # [2 * n_layers + 1, batch]
    W_UE = model.W_U @ model.W_E                             # [d_model, d_model], computed once
    scores = copying_score(ov_eigenvalues(W["W_V"], W["W_O"], W_UE))   # [n_layers, n_heads]

Conventions (TransformerLens, row vectors): a head reads `x @ W_V` and writes `z @ W_O`, so its OV circuit is
`W_OV = W_V @ W_O` (`[d_model, d_model]`, rank <= d_head) and its QK circuit is `W_QK = W_Q @ W_K.T` (the score is
`q_x @ W_QK @ k_x.T`, before rotary embeddings and the 1/sqrt(d_head) scale). The full OV circuit from tokens to
logits is `W_E @ W_OV @ W_U` (`[d_vocab, d_vocab]`: too big to build for SmolLM2, 49152^2 floats = 9.7 GB). Its
nonzero eigenvalues equal those of `W_O @ (W_U @ W_E) @ W_V` (`[d_head, d_head]`), because AB and BA share their
nonzero eigenvalues.

Grouped-query attention: SmolLM2 stores `W_K`, `W_V` per key/value head (`[n_layers, n_kv_heads, d_model,
d_head]`, 3 of them) and `W_Q`, `W_O` per query head (9). Query head h reads key/value head
h // (n_heads // n_kv_heads): consecutive query heads share one (`repeat_interleave`, not `repeat`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from utils.lens import rms


# ---------------------------------------------------------------------------------------------------------
# Per-head weights
# ---------------------------------------------------------------------------------------------------------


def expand_kv_heads(W: Tensor, n_heads: int) -> Tensor:
    """Repeat grouped key/value weights `[..., n_kv_heads, a, b]` to one per query head `[..., n_heads, a, b]`:
    query head h gets key/value head h // (n_heads // n_kv_heads)."""
    n_kv = W.shape[-3]
    if n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of the number of key/value heads ({n_kv}).")
    return W.repeat_interleave(n_heads // n_kv, dim=-3)


def kv_group(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The key/value head query head `head` reads."""
    return head // (n_heads // n_kv_heads)


def head_weights(model) -> dict[str, Tensor]:
    """{"W_Q", "W_K", "W_V", "W_O"}: every head's weights, `[n_layers, n_heads, d_model, d_head]` (W_O:
    `[n_layers, n_heads, d_head, d_model]`), key/value weights repeated to one per query head."""
    n_heads = model.cfg.n_heads
    return {"W_Q": model.W_Q, "W_K": expand_kv_heads(model.W_K, n_heads),
            "W_V": expand_kv_heads(model.W_V, n_heads), "W_O": model.W_O}


def z_from_weights(pattern: Tensor, normalized: Tensor, W_V: Tensor) -> Tensor:
    """`[batch, pos, n_heads, d_head]`: what `hook_z` holds, recomputed from the weights.

    `pattern` `[batch, n_heads, query_pos, key_pos]` (hook_pattern), `normalized` `[batch, pos, d_model]` the
    attention's input (`ln1.hook_out`), `W_V` `[n_kv_heads or n_heads, d_model, d_head]` one layer's value weights.
    """
    W_V = expand_kv_heads(W_V, pattern.shape[1])
    values = torch.einsum("bpd,hde->bphe", normalized, W_V)
    return torch.einsum("bhqk,bkhe->bqhe", pattern, values)


def head_results(z: Tensor, W_O: Tensor) -> Tensor:
    """`[batch, pos, n_heads, d_model]`: each head's write to the residual stream (what `hook_result` would hold;
    SmolLM2's attention has no output bias, so they sum to `hook_attn_out`)."""
    return torch.einsum("bphe,hem->bphm", z, W_O)


# ---------------------------------------------------------------------------------------------------------
# The residual stream as a sum, and direct logit attribution
# ---------------------------------------------------------------------------------------------------------


def component_labels(n_layers: int) -> list[str]:
    """Names of the rows of `residual_components`: "embed", "0_attn", "0_mlp", "1_attn", ..."""
    return ["embed"] + [f"{layer}_{part}" for layer in range(n_layers) for part in ("attn", "mlp")]


def residual_components(cache, n_layers: int, pos: int = -1) -> Tensor:
    """`[2 * n_layers + 1, batch, d_model]`: the pieces that add up to the final residual stream at position `pos`:
    the embedding (`blocks.0.hook_resid_pre`; rotary models have no positional embedding), then each layer's
    attention output and MLP output in the order they are added. `cache` maps hook names to `[batch, pos, d_model]`."""
    rows = [cache["blocks.0.hook_resid_pre"][:, pos]]
    for layer in range(n_layers):
        rows += [cache[f"blocks.{layer}.hook_attn_out"][:, pos], cache[f"blocks.{layer}.hook_mlp_out"][:, pos]]
    return torch.stack(rows)


def component_filter(n_layers: int):
    """`names_filter` for `residual_components` (plus the final residual stream)."""
    names = {"blocks.0.hook_resid_pre", f"blocks.{n_layers - 1}.hook_resid_post"}
    names |= {f"blocks.{layer}.hook_{part}_out" for layer in range(n_layers) for part in ("attn", "mlp")}
    return lambda name: name in names


def direct_logit_attribution(components: Tensor, final_resid: Tensor, direction: Tensor) -> Tensor:
    """`[..., batch]`: each component's direct contribution to a logit difference, through the final norm with its
    scale frozen at the run's own final residual.

    `components` `[..., batch, d_model]`, `final_resid` `[batch, d_model]` (before the final norm), `direction`
    `[d_model, batch]` (e.g. W_U[:, IO] - W_U[:, S] per prompt; the final norm's weight is folded into W_U). With
    a zero unembedding bias the rows of `residual_components` sum to the logit difference itself.
    """
    return ((components / rms(final_resid)) * direction.T).sum(-1)


def neuron_direct_effects(post: Tensor, W_out: Tensor, final_resid: Tensor, direction: Tensor) -> Tensor:
    """`[n_layers, d_mlp, batch]`: each MLP neuron's direct contribution (activation x output row), as in
    `direct_logit_attribution`. `post` `[n_layers, batch, d_mlp]` (mlp.hook_post at one position), `W_out`
    `[n_layers, d_mlp, d_model]`."""
    # contract W_out with the direction first: [n_layers, d_mlp, batch] (a single three-way einsum may build a
    # [n_layers, batch, d_mlp, d_model] intermediate, 3.4 GB for SmolLM2 and 32 prompts)
    per_neuron_direction = torch.einsum("lnm,mb->lnb", W_out, direction / rms(final_resid).T)
    return per_neuron_direction * post.transpose(-1, -2)


# ---------------------------------------------------------------------------------------------------------
# Factored circuits
# ---------------------------------------------------------------------------------------------------------


def factored_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the product `A @ B` without forming it: `A` `[..., m, r]`, `B` `[..., r, n]` with r small.

    Returns `U` `[..., m, r]` (orthonormal columns), `S` `[..., r]` (descending) and `Vh` `[..., r, n]`
    (orthonormal rows) with `U @ diag(S) @ Vh == A @ B`. Cost O((m + n) r^2) instead of O(m n r).
    """
    Q_A, R_A = torch.linalg.qr(A)  # A = Q_A R_A, Q_A [m, r]
    Q_B, R_B = torch.linalg.qr(B.transpose(-1, -2))  # B^T = Q_B R_B, Q_B [n, r]
    U_small, S, Vh_small = torch.linalg.svd(R_A @ R_B.transpose(-1, -2))  # the [r, r] core
    return Q_A @ U_small, S, Vh_small @ Q_B.transpose(-1, -2)


def ov_eigenvalues(W_V: Tensor, W_O: Tensor, W_UE: Tensor) -> Tensor:
    """`[..., d_head]` complex: the nonzero eigenvalues (at most d_head) of the full OV circuit
    `W_E @ W_V @ W_O @ W_U` (`[d_vocab, d_vocab]`), computed as those of `W_O @ W_UE @ W_V` (`[d_head, d_head]`).

    `W_V` `[..., d_model, d_head]`, `W_O` `[..., d_head, d_model]`, `W_UE = W_U @ W_E` `[d_model, d_model]`.
    """
    return torch.linalg.eigvals(W_O @ W_UE @ W_V)


def copying_score(eigenvalues: Tensor) -> Tensor:
    """`[...]`: sum(Re lambda) / sum(|lambda|) over the last axis, in [-1, 1]. 1: every eigenvalue is positive
    real (the circuit copies: a token raises its own logit); -1: all negative (suppresses); near 0: neither."""
    return eigenvalues.real.sum(-1) / eigenvalues.abs().sum(-1)


def top_heads(scores: Tensor, k: int, largest: bool = True) -> list[tuple[int, int]]:
    """The k (layer, head) pairs with the largest (or smallest) score in a `[n_layers, n_heads]` tensor."""
    n_heads = scores.shape[1]
    indices = scores.flatten().topk(k, largest=largest).indices
    return [(int(i) // n_heads, int(i) % n_heads) for i in indices]
