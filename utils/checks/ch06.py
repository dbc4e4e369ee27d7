"""Checks for chapter 06 — Reading the weights.

References come from `utils.circuits`. Most checks run the learner's function on small synthetic tensors whose
right answer is known, plus one case from the real model (the shipped toy, or SmolLM2 for the copying score through
MLP0), and compare a wrong answer with the usual mistakes (tiling instead of grouping key/value heads, a missing
mask or bias, taking eigenvalues of the wrong product) to say which one it is. Hidden cases draw their random
tensors from `hidden_generator`, afresh for every grading run.
"""

from __future__ import annotations

import torch

from utils import circuits as _circuits
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor, hidden_generator
from utils.lens import rms as _rms


def _close(got, expected, atol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    if got.is_complex() or expected.is_complex():
        return torch.allclose(got.detach().to(torch.complex64), expected.to(torch.complex64), atol=atol, rtol=1e-4)
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to(torch.float32), atol=atol, rtol=1e-4)


def _expect_shape(got, shape: tuple, what: str, hint: str = "") -> None:
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor of shape {shape}, got {type(got).__name__}.")
    if tuple(got.shape) != tuple(shape):
        raise CheckFailed(f"{what}: expected shape {tuple(shape)}, got {tuple(got.shape)}.{' ' + hint if hint else ''}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _toy():
    from utils.heads import induction_toy

    return induction_toy()


# ---------------------------------------------------------------------------------------------------------
# 6.1 — an attention layer from its weights
# ---------------------------------------------------------------------------------------------------------


def _attention_case(g, n_batch, n_pos, n_heads, n_kv, d_model, d_head):
    return (torch.randn(n_batch, n_pos, d_model, generator=g), torch.randn(n_heads, d_model, d_head, generator=g),
            torch.randn(n_heads, d_head, generator=g), torch.randn(n_kv, d_model, d_head, generator=g),
            torch.randn(n_kv, d_head, generator=g), torch.randn(n_kv, d_model, d_head, generator=g),
            torch.randn(n_kv, d_head, generator=g))


def _toy_attention_case():
    from utils.heads import repeated_random_tokens

    toy = _toy()
    tokens = repeated_random_tokens(2, 5, 1, toy.cfg.d_vocab, bos=0, seed=61)
    with torch.no_grad():
        _, cache = toy.run_with_cache(tokens, names_filter="blocks.1.ln1.hook_out")
    layer = 1
    weights = (toy.W_Q[layer], toy.b_Q[layer], toy.W_K[layer], toy.b_K[layer], toy.W_V[layer], toy.b_V[layer])
    return (cache["blocks.1.ln1.hook_out"].clone(), *(w.detach().clone() for w in weights))


@exercise("06", "6.1", "attention_from_weights", "An attention layer, recomputed from its weights", points=3,
          reference=_circuits.attention_from_weights)
def attention_from_weights(answer, hidden):
    expect_callable(answer, "attention_from_weights")
    cases = [("the toy's layer 1 (8 heads) on 2 x 5 repeated tokens", _toy_attention_case()),
             ("random weights, 6 query heads sharing 3 key/value heads",
              _attention_case(_gen(61), 2, 5, 6, 3, 8, 4))]
    if hidden:
        cases.append(("random weights, 4 query heads sharing 2 key/value heads, 7 positions",
                      _attention_case(hidden_generator(61), 1, 7, 4, 2, 6, 3)))
    for what, args in cases:
        expected_pattern, expected_z = _circuits.attention_from_weights(*args)
        got = answer(*(a.clone() for a in args))
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{what}: return the pair (pattern, z), got {type(got).__name__}.")
        pattern, z = got
        _expect_shape(pattern, tuple(expected_pattern.shape), what + ", pattern", "[batch, n_heads, query_pos, key_pos].")
        if not _close(pattern, expected_pattern, atol=1e-4):
            if (pattern.detach().triu(1).abs() > 1e-6).any():
                raise CheckFailed(f"{what}: your pattern attends to later positions: mask keys j > i with -inf before "
                                  f"the softmax.")
            normalized, W_Q, b_Q, W_K, b_K = args[:5]
            group = W_Q.shape[0] // W_K.shape[0]
            if group > 1:
                tiled = _circuits.attention_from_weights(normalized, W_Q, b_Q, W_K.repeat(group, 1, 1),
                                                         b_K.repeat(group, 1), args[5].repeat(group, 1, 1),
                                                         args[6].repeat(group, 1))[0]
                if _close(pattern, tiled, atol=1e-4):
                    raise CheckFailed(f"{what}: you tiled the key/value heads (0, 1, 2, 0, 1, 2, ...). Query head h reads "
                                      f"key/value head h // (n_heads // n_kv_heads): repeat_interleave.")
            d_head = W_Q.shape[-1]
            q = torch.einsum("bpd,hde->bhpe", normalized, W_Q) + b_Q[:, None]
            k = torch.einsum("bpd,hde->bhpe", normalized, W_K.repeat_interleave(group, 0)) + \
                b_K.repeat_interleave(group, 0)[:, None]
            mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1)
            unscaled = (q @ k.transpose(-1, -2)).masked_fill(mask, float("-inf")).softmax(-1)
            if _close(pattern, unscaled, atol=1e-4):
                raise CheckFailed(f"{what}: you forgot to divide the scores by sqrt(d_head) = {d_head ** 0.5:.3g}.")
            no_bias = (torch.einsum("bpd,hde->bhpe", normalized, W_Q) @ k.transpose(-1, -2) / d_head ** 0.5) \
                .masked_fill(mask, float("-inf")).softmax(-1)
            if _close(pattern, no_bias, atol=1e-4):
                raise CheckFailed(f"{what}: you left out b_Q (the folded layer norm moved its bias into b_Q, b_K, b_V).")
            expect_tensor(pattern, expected_pattern, what + ", pattern",
                          hint="q = x W_Q + b_Q, k = x W_K + b_K per head; scores q.k / sqrt(d_head); causal mask; "
                               "softmax over keys.")
        _expect_shape(z, tuple(expected_z.shape), what + ", z", "[batch, pos, n_heads, d_head], the layout of hook_z.")
        if not _close(z, expected_z, atol=1e-4):
            v_no_bias = _circuits.attention_from_weights(*args[:6], torch.zeros_like(args[6]))[1]
            if _close(z, v_no_bias, atol=1e-4):
                raise CheckFailed(f"{what}: your z leaves out b_V: v = x W_V + b_V.")
            expect_tensor(z, expected_z, what + ", z", hint="v = x W_V + b_V; z[b, q, h] = sum over keys k of "
                          "pattern[b, h, q, k] v[b, k, h].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.2 — direct logit attribution, neuron by neuron
# ---------------------------------------------------------------------------------------------------------


@exercise("06", "6.2", "neuron_direct_effects", "Direct effects of single neurons", points=2,
          reference=_circuits.neuron_direct_effects)
def neuron_direct_effects(answer, hidden):
    expect_callable(answer, "neuron_direct_effects")
    cases = [(2, 3, 5, 4, _gen(62)), (3, 2, 6, 3, _gen(63))]  # layers, batch, d_mlp, d_model
    if hidden:
        cases.append((1, 4, 7, 5, hidden_generator(62)))
    for n_layers, n_batch, d_mlp, d_model, g in cases:
        post = torch.randn(n_layers, n_batch, d_mlp, generator=g)
        W_out = torch.randn(n_layers, d_mlp, d_model, generator=g)
        final = 3.0 * torch.randn(n_batch, d_model, generator=g)
        direction = torch.randn(d_model, n_batch, generator=g)
        what = f"{n_layers} layers, {n_batch} prompts, d_mlp {d_mlp}"
        expected = _circuits.neuron_direct_effects(post, W_out, final, direction)
        got = answer(post.clone(), W_out.clone(), final.clone(), direction.clone())
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n_layers, n_batch, d_mlp):
            raise CheckFailed(f"{what}: your tensor is [n_layers, batch, d_mlp]; return [n_layers, d_mlp, batch].")
        _expect_shape(got, tuple(expected.shape), what, "One number per layer, neuron and prompt.")
        if _close(got, expected):
            continue
        if _close(got, expected * _rms(final)[:, 0]):
            raise CheckFailed(f"{what}: you left out the final norm. Divide by the final residual's root mean square "
                              f"(rms(final_resid)), the same frozen scale for every neuron.")
        if _close(got, -expected):
            raise CheckFailed(f"{what}: wrong sign.")
        if n_batch > 1 and _close(got, torch.einsum("lbn,lnm,mc->lnbc", post, W_out, direction / _rms(final).T)
                                  .diagonal(dim1=-2, dim2=-1).flip(-1)):
            raise CheckFailed(f"{what}: prompt b must use its own direction, direction[:, b].")
        expect_tensor(got, expected, what, hint="effect[l, n, b] = post[l, b, n] * (W_out[l, n] . direction[:, b]) "
                      "/ rms(final_resid[b]).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.3 — which heads are name movers? (chapter 04's rule)
# ---------------------------------------------------------------------------------------------------------


def _roles_case(g, n_layers, n_heads, n_batch, n_pos):
    effect = 0.3 * torch.randn(n_layers, n_heads, generator=g)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    pattern = [(3 * torch.randn(n_batch, n_heads, n_pos, n_pos, generator=g)).masked_fill(~causal, float("-inf"))
               .softmax(-1) for _ in range(n_layers)]
    positions = {"IO": torch.randint(1, n_pos // 3, (n_batch,), generator=g),
                 "S1": torch.randint(n_pos // 3, 2 * n_pos // 3, (n_batch,), generator=g),
                 "S2": torch.randint(2 * n_pos // 3, n_pos - 1, (n_batch,), generator=g)}
    return effect, pattern, positions


@exercise("06", "6.3", "head_roles", "Name movers, by chapter 04's rule", points=2, reference=_circuits.head_roles)
def head_roles(answer, hidden):
    expect_callable(answer, "head_roles")
    cases = [("4 layers x 3 heads, 5 prompts", _roles_case(_gen(63), 4, 3, 5, 12), 0.1),
             ("3 layers x 4 heads, 2 prompts", _roles_case(_gen(64), 3, 4, 2, 9), 0.2)]
    if hidden:
        cases.append(("5 layers x 4 heads, 6 prompts", _roles_case(hidden_generator(63), 5, 4, 6, 15), 0.15))
    for what, (effect, pattern, positions), threshold in cases:
        expected = _circuits.head_roles(effect, pattern, positions, threshold)
        got = answer(effect.clone(), [p.clone() for p in pattern], {k: v.clone() for k, v in positions.items()},
                     threshold)
        if not isinstance(got, dict) or set(got) != set(expected):
            raise CheckFailed(f"{what}: return a dict with the keys {sorted(expected)}, got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        for role, heads in expected.items():
            mine = sorted(tuple(int(x) for x in pair) for pair in got[role])
            if mine == sorted(heads):
                continue
            if role != "S2 writers" and mine == sorted(_circuits.head_roles(effect, pattern, positions, threshold,
                                                                            io_over_s1_only=True)[role]):
                raise CheckFailed(f"{what}: your {role} compare attention to IO with S1 only; the rule asks for more "
                                  f"attention to IO than to *either* S (S1 and S2).")
            raise CheckFailed(f"{what}: your {role} are {mine}, expected {sorted(heads)}. Average each head's "
                              f"attention to IO, S1 and S2 over the prompts first (each prompt at its own positions), "
                              f"then apply the rule: |direct effect| above the threshold with the right sign, and "
                              f"the most attention on the name the role names. The attention that counts is from END, "
                              f"the last query position of each layer's pattern.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.7 — the induction head's QK circuit, read through the previous-token head
# ---------------------------------------------------------------------------------------------------------


@exercise("06", "6.7", "composed_qk_circuit", "A QK circuit through K-composition", points=2,
          reference=_circuits.composed_qk_circuit)
def composed_qk_circuit(answer, hidden):
    expect_callable(answer, "composed_qk_circuit")
    toy = _toy()
    cases = [("the toy: L1H4 reading L0H4, first 30 tokens",
              (toy.W_E[:30], toy.W_V[0, [4]], toy.W_O[0, [4]], toy.W_Q[1, 4], toy.W_K[1, 4]))]
    g = _gen(67)
    cases.append(("random weights: 2 layer-0 heads, d_vocab 9",
                  (torch.randn(9, 6, generator=g) + 0.4, torch.randn(2, 6, 3, generator=g),
                   torch.randn(2, 3, 6, generator=g), torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g))))
    if hidden:
        g = hidden_generator(67)
        cases.append(("random weights: 3 layer-0 heads, d_vocab 11",
                      (torch.randn(11, 8, generator=g) - 0.3, torch.randn(3, 8, 2, generator=g),
                       torch.randn(3, 2, 8, generator=g), torch.randn(8, 2, generator=g),
                       torch.randn(8, 2, generator=g))))
    for what, weights in cases:
        weights = tuple(w.detach().clone() for w in weights)
        expected = _circuits.composed_qk_circuit(*weights)
        got = answer(*(w.clone() for w in weights))
        _expect_shape(got, tuple(expected.shape), what, "[d_vocab, d_vocab]: query token a, key whose previous token "
                      "is b. Sum the layer-0 heads' OV circuits.")
        if _close(got, expected, atol=1e-3):
            continue
        W_E, W_V0, W_O0, W_Q1, W_K1 = weights
        if _close(got, expected.T, atol=1e-3):
            raise CheckFailed(f"{what}: your circuit is transposed: rows are the query's token, columns the key's "
                              f"previous token.")
        raw = (W_E @ W_Q1) @ (W_E @ (W_V0 @ W_O0).sum(0) @ W_K1).T
        if _close(got, raw, atol=1e-3):
            raise CheckFailed(f"{what}: you used the raw embeddings. Both heads read through a (folded) layer norm: "
                              f"centre each embedding and divide it by its root mean square first.")
        no_ov = (_circuits._ln_pre(W_E) @ W_Q1) @ (_circuits._ln_pre(W_E) @ W_K1).T
        if _close(got, no_ov, atol=1e-3):
            raise CheckFailed(f"{what}: that is the direct QK circuit (token to token). The key side reads what the "
                              f"layer-0 heads *wrote*: send the key's embedding through W_V0 W_O0 first.")
        expect_tensor(got, expected, what, atol=1e-3, rtol=1e-3,
                      hint="x = LN(W_E); queries x @ W_Q1; keys (x @ sum_h W_V0[h] W_O0[h]) @ W_K1; scores = "
                           "queries @ keys^T.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.8 — Wang et al.'s copying score, through MLP0
# ---------------------------------------------------------------------------------------------------------


def _names():
    from utils import ioi
    from utils.models import model_for_checks

    model = model_for_checks()
    return model, [ioi.single_token_id(model, name) for name in ioi.NAMES if ioi._is_single_token(model, name)]


@exercise("06", "6.8", "mlp0_copying_scores", "The copying score through MLP0", points=3,
          reference=_circuits.mlp0_copying_scores)
def mlp0_copying_scores(answer, hidden):
    expect_callable(answer, "mlp0_copying_scores")
    model, names = _names()
    cases = [("12 names, heads L23H0, L23H4, L24H4 (top 5)", names[:12], [(23, 0), (23, 4), (24, 4)], 5, False),
             ("10 names, heads L24H4, L23H3 as negative heads (top 5)", names[10:20], [(24, 4), (23, 3)], 5, True)]
    if hidden:
        g = hidden_generator(68)
        pick = torch.randperm(len(names), generator=g)[:9].tolist()
        layer = int(torch.randint(20, 30, (1,), generator=g))
        cases.append((f"9 names, heads of layer {layer} (top 3)", [names[i] for i in pick],
                      [(layer, h) for h in range(0, 9, 2)], 3, False))
    for what, ids, heads, top_k, negative in cases:
        token_ids = torch.tensor(ids)
        expected = _circuits.mlp0_copying_scores(model, token_ids, heads, top_k, negative)
        got = answer(model, token_ids.clone(), list(heads), top_k, negative)
        model.reset_hooks()
        _expect_shape(got, tuple(expected.shape), what, "[len(heads), n_tokens]: 1.0 where the token is in the top "
                      "k, else 0.0 (the chapter averages and bootstraps them).")
        if _close(got.float(), expected, atol=1e-6):
            continue
        if negative and _close(got.float(), _mlp0_variant(model, token_ids, heads, top_k, False), atol=1e-6):
            raise CheckFailed(f"{what}: with negative=True, flip the sign of the logits before taking the top k (a "
                              f"negative head lowers the logit of what it copies).")
        tiled = _mlp0_variant(model, token_ids, heads, top_k, negative, tiled=True)
        if _close(got.float(), tiled, atol=1e-6):
            raise CheckFailed(f"{what}: you tiled the key/value heads. Query head h reads W_V of key/value head "
                              f"h // (n_heads // n_kv_heads) (SmolLM2: h // 3).")
        embed_only = _mlp0_variant(model, token_ids, heads, top_k, negative, embed_only=True)
        if _close(got.float(), embed_only, atol=1e-6):
            raise CheckFailed(f"{what}: you used the raw token embeddings. Wang et al. read the residual stream after "
                              f"the first MLP (blocks.0.hook_resid_post at the token's position in [BOS, token]).")
        raise CheckFailed(f"{what}: your scores differ from the reference in {int((got.float() != expected).sum())} "
                          f"of {expected.numel()} places. resid = blocks.0.hook_resid_post at position 1 of [BOS, "
                          f"token]; logits = resid @ W_V[layer, kv] @ W_O[layer, head] @ W_U; 1.0 if the token is "
                          f"in the top {top_k}.")
    return f"{len(cases)} cases on SmolLM2"


def _mlp0_variant(model, token_ids, heads, top_k, negative, tiled=False, embed_only=False):
    bos = int(model.to_tokens("")[0, 0])
    tokens = torch.stack([torch.full_like(token_ids, bos), token_ids], dim=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", stop_at_layer=1)
    resid = model.W_E[token_ids] if embed_only else cache["blocks.0.hook_resid_post"][:, 1]
    n_kv = model.W_V.shape[1]
    rows = []
    for layer, head in heads:
        kv = head % n_kv if tiled else head // (model.cfg.n_heads // n_kv)
        logits = resid @ model.W_V[layer, kv] @ model.W_O[layer, head] @ model.W_U
        top = (-logits if negative else logits).topk(top_k, dim=-1).indices
        rows.append((top == token_ids[:, None]).any(-1).float())
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------
# 6.4 — factored SVD
# ---------------------------------------------------------------------------------------------------------


@exercise("06", "6.4", "factored_svd", "SVD of a low-rank product without forming it", points=2,
          reference=_circuits.factored_svd)
def factored_svd(answer, hidden):
    expect_callable(answer, "factored_svd")
    cases = [((), 12, 3, 10, 0), ((2,), 9, 4, 15, 1)]  # batch shape, m, r, n, seed
    if hidden:
        cases += [((3, 2), 7, 2, 7, 2), ((), 40, 5, 30, 3)]
    for lead, m, r, n, seed in cases:
        generator = hidden_generator(60 + seed) if seed >= 2 else _gen(seed)
        A = torch.randn(*lead, m, r, generator=generator)
        B = torch.randn(*lead, r, n, generator=generator)
        what = f"A {tuple(A.shape)} @ B {tuple(B.shape)}"
        got = answer(A.clone(), B.clone())
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise CheckFailed(f"{what}: return the triple (U, S, Vh), got {type(got).__name__}.")
        U, S, Vh = got
        expected_S = torch.linalg.svdvals(A @ B)[..., :r]
        if isinstance(U, torch.Tensor) and tuple(U.shape) == (*lead, m, m):
            raise CheckFailed(f"{what}: U is square {tuple(U.shape)}: return the thin SVD, U [..., m, r] with "
                              f"r = {r} columns (the product has rank at most r).")
        _expect_shape(U, (*lead, m, r), what + ", U", "U has one column per factor dimension r.")
        _expect_shape(S, (*lead, r), what + ", S")
        _expect_shape(Vh, (*lead, r, n), what + ", Vh", "Vh has one row per factor dimension r.")
        eye = torch.eye(r).expand(*lead, r, r)
        if not _close(U.transpose(-1, -2) @ U, eye, atol=1e-3):
            raise CheckFailed(f"{what}: the columns of U are not orthonormal (U^T U != I). Orthonormalise A's columns "
                              f"(QR) before taking the SVD of the small core.")
        if not _close(Vh @ Vh.transpose(-1, -2), eye, atol=1e-3):
            raise CheckFailed(f"{what}: the rows of Vh are not orthonormal (Vh Vh^T != I). Orthonormalise B's rows "
                              f"(QR of B^T).")
        if not (S[..., :-1] >= S[..., 1:] - 1e-5).all():
            raise CheckFailed(f"{what}: singular values must be in descending order.")
        expect_tensor(S, expected_S, what + ", singular values", atol=1e-3, rtol=1e-3,
                      hint="the singular values of the small core R_A @ R_B^T are those of A @ B.")
        expect_tensor(U @ torch.diag_embed(S) @ Vh, A @ B, what + ", U diag(S) Vh vs A @ B", atol=1e-3, rtol=1e-3,
                      hint="rotate the core's singular vectors back: U = Q_A @ U_core, Vh = Vh_core @ Q_B^T.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.5 — copying score
# ---------------------------------------------------------------------------------------------------------


@exercise("06", "6.5", "copying_score", "The eigenvalue copying score", reference=_circuits.copying_score)
def copying_score(answer, hidden):
    expect_callable(answer, "copying_score")
    generator = _gen(0)
    mixed = torch.complex(torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator))
    cases = [("positive reals [1, 2, 3]", torch.tensor([1.0, 2.0, 3.0]).to(torch.complex64)),
             ("random complex [4, 6]", mixed),
             ("mostly negative with a conjugate pair", torch.tensor([-3.0 + 0j, -1.0 + 0j, 0.5 + 2j, 0.5 - 2j]))]
    if hidden:
        generator = hidden_generator(65)
        cases += [("random complex [2, 3, 5]", torch.complex(torch.randn(2, 3, 5, generator=generator),
                                                            torch.randn(2, 3, 5, generator=generator))),
                  ("pure imaginary pair", torch.tensor([1j, -1j]))]
    for what, eigenvalues in cases:
        got = answer(eigenvalues.clone())
        expected = _circuits.copying_score(eigenvalues)
        _expect_shape(got, tuple(expected.shape), what, "One score per matrix: reduce over the last axis only.")
        if got.is_complex():
            raise CheckFailed(f"{what}: the score is a real number; take the real part of the eigenvalues.")
        if _close(got, expected, atol=1e-5):
            continue
        real = eigenvalues.real
        if _close(got, real.abs().sum(-1) / eigenvalues.abs().sum(-1), atol=1e-5):
            raise CheckFailed(f"{what}: you took |Re lambda| in the numerator, so a suppressing head scores like a "
                              f"copying one. Sum the signed real parts.")
        if _close(got, real.sum(-1) / real.abs().sum(-1), atol=1e-5):
            raise CheckFailed(f"{what}: you divided by sum |Re lambda|; divide by sum |lambda| (the modulus), so "
                              f"eigenvalues with a large imaginary part (rotations, not copying) lower the score.")
        expect_tensor(got, expected, what, atol=1e-5, hint="sum(Re lambda) / sum(|lambda|) over the last axis.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 6.6 — eigenvalues of the full OV circuit, cheaply
# ---------------------------------------------------------------------------------------------------------


def _same_spectrum(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-3) -> bool:
    """Equal as multisets, up to order (compares sorted moduli, real parts and |imaginary parts|)."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    got = got.detach().to(torch.complex64)
    expected = expected.to(torch.complex64)
    for f in (torch.abs, lambda x: x.real, lambda x: x.imag.abs()):
        if not torch.allclose(f(got).sort(-1).values, f(expected).sort(-1).values, atol=atol, rtol=1e-3):
            return False
    return True


@exercise("06", "6.6", "ov_eigenvalues", "Eigenvalues of the full OV circuit, cheaply", points=2,
          reference=_circuits.ov_eigenvalues)
def ov_eigenvalues(answer, hidden):
    expect_callable(answer, "ov_eigenvalues")
    cases = [((), 20, 6, 2, 0), ((3,), 30, 8, 3, 1)]  # head batch, d_vocab, d_model, d_head, seed
    if hidden:
        cases += [((2, 2), 15, 5, 2, 2), ((), 50, 10, 4, 3)]
    for lead, d_vocab, d_model, d_head, seed in cases:
        generator = hidden_generator(60 + seed) if seed >= 2 else _gen(seed)
        W_E = torch.randn(d_vocab, d_model, generator=generator)
        W_U = torch.randn(d_model, d_vocab, generator=generator)
        W_V = torch.randn(*lead, d_model, d_head, generator=generator)
        W_O = torch.randn(*lead, d_head, d_model, generator=generator)
        W_UE = W_U @ W_E
        what = f"heads {lead or '(one)'}, d_model {d_model}, d_head {d_head}"
        got = answer(W_V.clone(), W_O.clone(), W_UE.clone())
        expected = _circuits.ov_eigenvalues(W_V, W_O, W_UE)
        if isinstance(got, torch.Tensor) and got.shape[-1:] == (d_model,):
            raise CheckFailed(f"{what}: you returned {d_model} eigenvalues (a d_model x d_model product). Multiply in "
                              f"the order W_O @ W_UE @ W_V to get the d_head x d_head matrix with the same nonzero "
                              f"eigenvalues.")
        _expect_shape(got, tuple(expected.shape), what, "d_head eigenvalues per head.")
        if not got.is_complex():
            raise CheckFailed(f"{what}: eigenvalues of a non-symmetric matrix are complex: use torch.linalg.eigvals "
                              f"(not eigvalsh, and keep the imaginary parts).")
        if _same_spectrum(got, expected):
            continue
        if _same_spectrum(got, torch.linalg.eigvals(W_O @ W_V)):
            raise CheckFailed(f"{what}: those are the eigenvalues of W_OV alone. The copying score reads the circuit "
                              f"from tokens to logits: include W_UE = W_U @ W_E between W_O and W_V.")
        if _same_spectrum(got, torch.linalg.eigvals(W_O @ W_UE.transpose(-1, -2) @ W_V)):
            raise CheckFailed(f"{what}: you used W_UE transposed (W_E^T W_U^T); the argument is already W_U @ W_E.")
        full = torch.linalg.eigvals(W_E @ W_V @ W_O @ W_U)
        order = full.abs().argsort(dim=-1, descending=True)[..., :d_head]
        raise CheckFailed(f"{what}: your eigenvalues differ from the nonzero eigenvalues of W_E W_V W_O W_U (largest "
                          f"moduli {[round(v, 3) for v in full.gather(-1, order).abs().flatten()[:d_head].tolist()]}). Compute "
                          f"eigvals(W_O @ W_UE @ W_V).")
    return f"{len(cases)} cases"
