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


# ---------------------------------------------------------------------------------------------------------
# Attention recomputed from the weights; QK circuits; Wang et al.'s copying score
# ---------------------------------------------------------------------------------------------------------


def attention_from_weights(normalized: Tensor, W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor, W_V: Tensor,
                           b_V: Tensor) -> tuple[Tensor, Tensor]:
    """(pattern `[batch, n_heads, query_pos, key_pos]`, z `[batch, pos, n_heads, d_head]`): one attention layer
    recomputed from its weights, for a model without rotary embeddings (the toy). `normalized` `[batch, pos,
    d_model]` is the layer's input after its norm (`ln1.hook_out`); `W_Q` `[n_heads, d_model, d_head]`, `b_Q`
    `[n_heads, d_head]`; `W_K`, `W_V` `[n_kv_heads, d_model, d_head]`, `b_K`, `b_V` `[n_kv_heads, d_head]`, with
    query head h reading key/value head h // (n_heads // n_kv_heads)."""
    n_heads, d_head = W_Q.shape[0], W_Q.shape[-1]
    group = n_heads // W_K.shape[0]
    W_K, W_V = W_K.repeat_interleave(group, 0), W_V.repeat_interleave(group, 0)
    b_K, b_V = b_K.repeat_interleave(group, 0), b_V.repeat_interleave(group, 0)
    q = torch.einsum("bpd,hde->bhpe", normalized, W_Q) + b_Q[:, None]
    k = torch.einsum("bpd,hde->bhpe", normalized, W_K) + b_K[:, None]
    v = torch.einsum("bpd,hde->bhpe", normalized, W_V) + b_V[:, None]
    scores = q @ k.transpose(-1, -2) / d_head ** 0.5
    n_pos = normalized.shape[1]
    future = torch.ones(n_pos, n_pos, dtype=torch.bool, device=scores.device).triu(1)
    pattern = scores.masked_fill(future, float("-inf")).softmax(-1)
    z = torch.einsum("bhqk,bhke->bqhe", pattern, v)
    return pattern, z


def _ln_pre(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def composed_qk_circuit(W_E: Tensor, W_V0: Tensor, W_O0: Tensor, W_Q1: Tensor, W_K1: Tensor) -> Tensor:
    """`[d_vocab, d_vocab]`: a layer-1 head's QK circuit read through layer-0 heads' OV circuits (K-composition).

    Entry [a, b]: the score a query whose token is a gives a key *whose previous token is* b, if the key side held
    only what the layer-0 heads wrote from b: `LN(W_E)[a] W_Q1 W_K1^T (LN(W_E)[b] sum_h W_V0[h] W_O0[h])^T`, with
    LN the toy's folded layer norm (centre, divide by the root mean square) applied to the embeddings. An
    induction head's row a peaks at b = a. `W_V0` `[n, d_model, d_head]`, `W_O0` `[n, d_head, d_model]` the layer-0
    heads (summed); `W_Q1`, `W_K1` `[d_model, d_head]` the layer-1 head's.
    """
    embed = _ln_pre(W_E)
    written = embed @ (W_V0 @ W_O0).sum(0)  # [d_vocab, d_model]: what the layer-0 heads write, moved from token b
    return (embed @ W_Q1) @ (written @ W_K1).T


def diagonal_ranks(circuit: Tensor) -> Tensor:
    """`[n]` long: for each row a, how many entries of the row beat its diagonal entry (0: the diagonal wins)."""
    diagonal = circuit.diagonal()
    return (circuit > diagonal[:, None]).sum(-1)


def mlp0_copying_scores(model, token_ids: Tensor, heads: list[tuple[int, int]], top_k: int = 5,
                        negative: bool = False) -> Tensor:
    """`[len(heads), n_tokens]` float, 1.0 or 0.0: Wang et al.'s copying score of each head, per token. Each token
    is run alone after BOS ([BOS, token]); the residual stream after the first MLP at the token's position
    (`blocks.0.hook_resid_post`, position 1) is sent through the head's OV circuit and the unembedding
    (sign-flipped when `negative`, for negative heads); 1.0 where the token's own logit is among the `top_k`
    largest. The norms before W_V and W_U only rescale a row by a positive number, which does not change its top k,
    so they are left out. Key/value heads are grouped: query head h reads key/value head h // (n_heads // n_kv_heads).
    """
    bos = int(model.to_tokens("")[0, 0])
    tokens = torch.stack([torch.full_like(token_ids, bos), token_ids], dim=1)  # [n, 2]
    name = "blocks.0.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=name, stop_at_layer=1)
    resid = cache[name][:, 1]  # [n, d_model]
    group = model.cfg.n_heads // model.W_V.shape[1]
    scores = []
    for layer, head in heads:
        logits = resid @ model.W_V[layer, head // group] @ model.W_O[layer, head] @ model.W_U  # [n, d_vocab]
        top = (-logits if negative else logits).topk(top_k, dim=-1).indices
        scores.append((top == token_ids[:, None]).any(-1).float())
    return torch.stack(scores)


def head_roles(head_effect: Tensor, patterns: list[Tensor], positions: dict, threshold: float = 0.1,
               io_over_s1_only: bool = False) -> dict[str, list[tuple[int, int]]]:
    """Chapter 04's rule for the IOI heads, from direct effects and attention from the last position (END).

    `head_effect` `[n_layers, n_heads]` (mean direct effect on logit(IO) - logit(S)), `patterns` one `[batch,
    n_heads, pos, pos]` attention pattern per layer (END is the last position), `positions` {"IO", "S1", "S2"}:
    `[batch]` each. With a the mean attention from END to each name over the prompts: name movers have an effect
    above `threshold` and a["IO"] > max(a["S1"], a["S2"]); negative name movers the same with an effect below
    -threshold; "S2 writers" an effect above `threshold` and a["S2"] > max(a["IO"], a["S1"]). Lists in (layer, head)
    order.
    """
    end = torch.stack([pattern[:, :, -1] for pattern in patterns]).transpose(1, 2)  # [layer, head, batch, key]
    prompts = torch.arange(end.shape[2])
    to = {role: end[:, :, prompts, positions[role]].mean(-1) for role in ("IO", "S1", "S2")}
    s_max = to["S1"] if io_over_s1_only else torch.maximum(to["S1"], to["S2"])
    attends_io = to["IO"] > s_max
    attends_s2 = to["S2"] > torch.maximum(to["IO"], to["S1"])
    masks = {"name movers": (head_effect > threshold) & attends_io,
             "negative name movers": (head_effect < -threshold) & attends_io,
             "S2 writers": (head_effect > threshold) & attends_s2}
    return {role: [(int(l), int(h)) for l, h in mask.nonzero().tolist()] for role, mask in masks.items()}
