"""Checks for chapter 02 — Induction heads.

References come from `utils.heads` (later chapters import the same detectors). The checks run the learner's
function on small synthetic attention patterns and matrices whose right answer is known, and compare a wrong
answer with the usual mistakes (off-by-one offsets, averaging over the wrong positions) to say which one it is.
"""

from __future__ import annotations

import torch

from utils import heads as _heads
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor, hidden_generator


def _close(got, expected, atol: float = 1e-4) -> bool:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(expected.shape):
        return False
    return torch.allclose(got.detach().to("cpu", torch.float32), expected.to(torch.float32), atol=atol, rtol=1e-4)


def _random_pattern(n_batch: int, n_heads: int, n_pos: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    """A causal attention pattern [batch, heads, q, k] with random (but valid) rows."""
    generator = torch.Generator().manual_seed(seed)
    scores = sharpness * torch.randn(n_batch, n_heads, n_pos, n_pos, generator=generator)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def _pattern_cases(hidden: bool):
    cases = [(2, 3, 5, 0), (3, 4, 8, 1)]  # (batch, heads, half_len, seed)
    if hidden:
        cases += [(1, 9, 12, 2), (4, 2, 3, 3)]
    for n_batch, n_heads, half_len, seed in cases:
        yield f"random pattern [batch={n_batch}, heads={n_heads}, half_len={half_len}]", \
            _random_pattern(n_batch, n_heads, 2 * half_len + 1, seed), half_len


def _offset_score(pattern: torch.Tensor, half_len: int, offset: int, all_queries: bool = False) -> torch.Tensor:
    """Mean attention from second-copy queries i to key i - half_len + offset (the reference's relatives)."""
    n_pos = pattern.shape[-1]
    start = half_len + 1 if not all_queries else max(half_len - offset, 0)
    queries = torch.arange(start, n_pos)
    keys = queries - half_len + offset
    keep = (keys >= 0) & (keys <= queries)
    queries, keys = queries[keep], keys[keep]
    return pattern[:, :, queries, keys].mean(dim=(0, -1))


def _check_shape(got, expected, what):
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor of shape {tuple(expected.shape)}, got "
                          f"{type(got).__name__}.")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)} (one score per head: average over the "
                          f"batch and the query positions), got {tuple(got.shape)}.")


# ---------------------------------------------------------------------------------------------------------
# 2.1 — repeated random tokens
# ---------------------------------------------------------------------------------------------------------


@exercise("02", "2.1", "repeated_tokens", "Repeated random tokens", reference=_heads.repeated_random_tokens)
def repeated_tokens(answer, hidden):
    expect_callable(answer, "repeated_tokens")
    cases = [(4, 10, 100, 1000, 1, 0), (2, 7, 5, 50, None, 1)]
    if hidden:
        cases += [(3, 1, 0, 3, 2, 5), (1, 25, 200, 49152, 0, 7)]
    for n_batch, half_len, low, high, bos, seed in cases:
        what = f"repeated_tokens(n_batch={n_batch}, half_len={half_len}, low={low}, high={high}, bos={bos}, seed={seed})"
        got = answer(n_batch, half_len, low, high, bos, seed)
        n_pos = 2 * half_len + (bos is not None)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != (n_batch, n_pos):
            hint = " (with bos=None there is no BOS column)" if bos is None else " (BOS, then the half, then the half again)"
            raise CheckFailed(f"{what}: expected shape {(n_batch, n_pos)}{hint}, got {tuple(got.shape)}.")
        if got.dtype != torch.long:
            raise CheckFailed(f"{what}: token ids must be a long (int64) tensor, got {got.dtype}.")
        body = got if bos is None else got[:, 1:]
        if bos is not None and not (got[:, 0] == bos).all():
            raise CheckFailed(f"{what}: column 0 must be the BOS token {bos} in every row.")
        if not (body[:, :half_len] == body[:, half_len:]).all():
            raise CheckFailed(f"{what}: the second half must repeat the first half exactly, token for token.")
        if body.min() < low or body.max() >= high:
            raise CheckFailed(f"{what}: random tokens must lie in [low, high) = [{low}, {high}); found "
                              f"{int(body.min())}..{int(body.max())}.")
        again = answer(n_batch, half_len, low, high, bos, seed)
        if not torch.equal(got, again):
            raise CheckFailed(f"{what}: two calls with the same seed gave different tokens. Use a "
                              f"torch.Generator seeded with `seed` (not the global random state).")
        if high - low > 100 and half_len > 3:
            other = answer(n_batch, half_len, low, high, bos, seed + 1)
            if torch.equal(got, other):
                raise CheckFailed(f"{what}: seeds {seed} and {seed + 1} gave the same tokens; use the seed.")
            if n_batch > 1 and (body[0] == body[1:]).all():
                raise CheckFailed(f"{what}: every row is the same sequence; draw a different half for each row.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 2.2 — repeat losses
# ---------------------------------------------------------------------------------------------------------


def _loss_cases(hidden: bool):
    cases = [(2, 6, 30, 0), (3, 9, 50, 1)]
    if hidden:
        cases += [(1, 4, 20, 2), (4, 15, 11, 3)]
    for n_batch, half_len, d_vocab, seed in cases:
        generator = torch.Generator().manual_seed(seed)
        tokens = _heads.repeated_random_tokens(n_batch, half_len, 1, d_vocab, bos=0, seed=seed)
        logits = 2.0 * torch.randn(n_batch, 2 * half_len + 1, d_vocab, generator=generator)
        # make the second copy easier to predict, so a mix-up between the halves shows
        logits[:, half_len + 1:-1].scatter_add_(-1, tokens[:, half_len + 2:, None], torch.full_like(
            tokens[:, half_len + 2:, None], 4.0, dtype=torch.float))
        yield f"random logits [batch={n_batch}, half_len={half_len}, d_vocab={d_vocab}]", logits, tokens, half_len


@exercise("02", "2.2", "repeat_losses", "Loss on the first and second copy", reference=_heads.repeat_losses)
def repeat_losses(answer, hidden):
    expect_callable(answer, "repeat_losses")
    for name, logits, tokens, half_len in _loss_cases(hidden):
        got = answer(logits.clone(), tokens.clone(), half_len)
        expected = _heads.repeat_losses(logits, tokens, half_len)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{name}: return a pair (first_copy_loss, second_copy_loss), got {type(got).__name__}.")
        got = tuple(float(v) for v in got)
        if all(abs(g - e) < 1e-3 for g, e in zip(got, expected)):
            continue
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(
            tokens.shape)  # unshifted: logits at p scored against token p
        if abs(got[1] - losses[:, half_len + 1:].mean().item()) < 1e-3:
            raise CheckFailed(f"{name}: you scored the logits at position p against token p. The logits at p "
                              f"predict token p + 1: shift (logits[:, :-1] against tokens[:, 1:]).")
        if abs(got[0] - expected[1]) < 1e-3 and abs(got[1] - expected[0]) < 1e-3:
            raise CheckFailed(f"{name}: your pair is swapped: return (first copy, second copy).")
        log_probs = logits[:, :-1].log_softmax(-1)
        per_pos = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
        if abs(got[1] - per_pos[:, half_len:].mean().item()) < 1e-3:
            raise CheckFailed(f"{name}: your second-copy loss includes predicting the copy's first token (token "
                              f"half_len + 1), which follows the end of the first copy and is not predictable. Score "
                              f"tokens half_len + 2 .. 2 * half_len.")
        if abs(got[0] - per_pos[:, :half_len].mean().item()) < 1e-3:
            raise CheckFailed(f"{name}: your first-copy loss includes the first random token (predicted from BOS "
                              f"alone). Score tokens 2 .. half_len.")
        raise CheckFailed(f"{name}: expected ({expected[0]:.4g}, {expected[1]:.4g}), got ({got[0]:.4g}, "
                          f"{got[1]:.4g}). Mean next-token cross-entropy (nats): first copy = tokens 2..half_len, "
                          f"second copy = tokens half_len+2..2*half_len.")
    return "random logits"


# ---------------------------------------------------------------------------------------------------------
# 2.3 — 2.5: head detectors
# ---------------------------------------------------------------------------------------------------------


@exercise("02", "2.3", "previous_token_scores", "Previous-token score", reference=_heads.previous_token_scores)
def previous_token_scores(answer, hidden):
    expect_callable(answer, "previous_token_scores")
    for name, pattern, half_len in _pattern_cases(hidden):
        got = answer(pattern.clone())
        expected = _heads.previous_token_scores(pattern)
        _check_shape(got, expected, name)
        if _close(got, expected):
            continue
        diagonal = pattern.diagonal(offset=0, dim1=-2, dim2=-1).mean(dim=(0, -1))
        if _close(got, diagonal):
            raise CheckFailed(f"{name}: you measured attention to the query's own position (the main diagonal). "
                              f"The previous token is one key to the left: pattern[..., i, i - 1].")
        if _close(got, pattern.diagonal(offset=1, dim1=-2, dim2=-1).mean(dim=(0, -1))):
            raise CheckFailed(f"{name}: you took the diagonal above the main one (key i + 1), which a causal pattern "
                              f"never attends to. Use offset=-1: key i - 1.")
        n_pos = pattern.shape[-1]
        if _close(got, pattern.diagonal(offset=-1, dim1=-2, dim2=-1).sum(dim=-1).mean(0) / n_pos):
            raise CheckFailed(f"{name}: you divided by all {n_pos} positions; only {n_pos - 1} queries have a "
                              f"previous token. Take the mean over those.")
        expect_tensor(got, expected, name, hint="mean over batch and queries i >= 1 of pattern[b, h, i, i - 1].")
    return "synthetic patterns"


@exercise("02", "2.4", "duplicate_token_scores", "Duplicate-token score", reference=_heads.duplicate_token_scores)
def duplicate_token_scores(answer, hidden):
    expect_callable(answer, "duplicate_token_scores")
    for name, pattern, half_len in _pattern_cases(hidden):
        got = answer(pattern.clone(), half_len)
        expected = _heads.duplicate_token_scores(pattern, half_len)
        _check_shape(got, expected, name)
        if _close(got, expected):
            continue
        if _close(got, _heads.induction_scores(pattern, half_len)):
            raise CheckFailed(f"{name}: that is the induction score (key i - half_len + 1). The duplicate-token "
                              f"head attends to the earlier copy of the *same* token: key i - half_len.")
        for offset in (-1, 1):
            if _close(got, _offset_score(pattern, half_len, offset)):
                raise CheckFailed(f"{name}: off by one: you used key i - half_len {'+' if offset > 0 else '-'} 1. "
                                  f"With BOS at position 0, query i's token first appeared at i - half_len.")
        if _close(got, _offset_score(pattern, half_len, 0, all_queries=True)):
            raise CheckFailed(f"{name}: you included queries in the first copy (or BOS). Only queries "
                              f"i = half_len + 1 .. 2 * half_len have an earlier duplicate.")
        expect_tensor(got, expected, name, hint="mean over batch and queries i in half_len+1..2*half_len of "
                      "pattern[b, h, i, i - half_len].")
    return "synthetic patterns"


@exercise("02", "2.5", "induction_scores", "Induction score", points=2, reference=_heads.induction_scores)
def induction_scores(answer, hidden):
    expect_callable(answer, "induction_scores")
    for name, pattern, half_len in _pattern_cases(hidden):
        got = answer(pattern.clone(), half_len)
        expected = _heads.induction_scores(pattern, half_len)
        _check_shape(got, expected, name)
        if _close(got, expected):
            continue
        if _close(got, _heads.duplicate_token_scores(pattern, half_len)):
            raise CheckFailed(f"{name}: off by one: that is the duplicate-token score (key i - half_len). An "
                              f"induction head attends to the token *after* the earlier occurrence: key "
                              f"i - half_len + 1.")
        if _close(got, _offset_score(pattern, half_len, 2)):
            raise CheckFailed(f"{name}: off by one: you used key i - half_len + 2. Query i's token first appeared at "
                              f"i - half_len (BOS is at 0), so the token after it is at i - half_len + 1.")
        if _close(got, _offset_score(pattern, half_len, 1, all_queries=True)):
            raise CheckFailed(f"{name}: you included queries from the first copy. Only queries i = half_len + 1 .. "
                              f"2 * half_len have seen their token before.")
        shifted = _offset_score(pattern, half_len, 1)
        queries = torch.arange(half_len + 1, 2 * half_len)
        if _close(got, pattern[:, :, queries, queries - half_len + 1].mean(dim=(0, -1))):
            raise CheckFailed(f"{name}: you dropped the last query (position 2 * half_len); average over all "
                              f"half_len queries of the second copy.")
        del shifted
        expect_tensor(got, expected, name, hint="mean over batch and queries i in half_len+1..2*half_len of "
                      "pattern[b, h, i, i - half_len + 1].")
    return "synthetic patterns"


# ---------------------------------------------------------------------------------------------------------
# 2.8 — composition score
# ---------------------------------------------------------------------------------------------------------


@exercise("02", "2.8", "composition_score", "Composition score", points=2, reference=_heads.composition_score)
def composition_score(answer, hidden):
    expect_callable(answer, "composition_score")
    generator = torch.Generator().manual_seed(0)
    cases = [("two random 6x6 matrices", torch.randn(6, 6, generator=generator), torch.randn(6, 6, generator=generator)),
             ("a batch [3, 2] of 5x4 and 4x7 matrices", torch.randn(3, 2, 5, 4, generator=generator),
              torch.randn(3, 2, 4, 7, generator=generator))]
    if hidden:
        a = torch.randn(8, 2, generator=generator) @ torch.randn(2, 8, generator=generator)
        cases += [("low-rank 8x8 and its transpose", a, 3.0 * a.T),
                  ("batched [4] of 10x10", torch.randn(4, 10, 10, generator=generator),
                   torch.randn(4, 10, 10, generator=generator))]
    for name, W_A, W_B in cases:
        got = answer(W_A.clone(), W_B.clone())
        expected = _heads.composition_score(W_A, W_B)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{name}: expected a torch.Tensor, got {type(got).__name__}.")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"{name}: expected shape {tuple(expected.shape)} (one score per leading index; the "
                              f"norms are over the last two axes only), got {tuple(got.shape)}.")
        if _close(got, expected):
            continue
        if _close(got, (W_A @ W_B).norm(dim=(-2, -1))):
            raise CheckFailed(f"{name}: you did not normalise: divide by ||W_A||_F * ||W_B||_F, so the score does "
                              f"not depend on the matrices' scale.")
        spectral = torch.linalg.matrix_norm(W_A @ W_B, ord=2) / (
            torch.linalg.matrix_norm(W_A, ord=2) * torch.linalg.matrix_norm(W_B, ord=2))
        if _close(got, spectral):
            raise CheckFailed(f"{name}: you used the spectral norm; use the Frobenius norm everywhere.")
        if W_A.shape[-1] == W_B.shape[-2] and W_B.shape[-1] == W_A.shape[-2] and _close(
                got, _heads.composition_score(W_B, W_A)):
            raise CheckFailed(f"{name}: you multiplied in the wrong order (W_B @ W_A); we want W_A @ W_B.")
        expect_tensor(got, expected, name, hint="||W_A @ W_B||_F / (||W_A||_F * ||W_B||_F), norms over the last "
                      "two axes.")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 2.6 — every head of a model, scored
# ---------------------------------------------------------------------------------------------------------


def _toy():
    from utils.toy import shipped_toy

    return shipped_toy("toy_induction.pt")


@exercise("02", "2.6", "head_scores", "Score every head of a model", reference=_heads.head_scores)
def head_scores(answer, hidden):
    expect_callable(answer, "head_scores")
    model = _toy()
    cases = [("previous-token scores, 3 x 6 repeated tokens", 3, 6, 0, _heads.previous_token_scores, {}),
             ("induction scores, 2 x 9 repeated tokens", 2, 9, 1, _heads.induction_scores, {"half_len": 9})]
    if hidden:
        seed = int(torch.randint(0, 10**6, (1,), generator=hidden_generator(26)))
        cases += [("duplicate-token scores, 4 x 7 repeated tokens", 4, 7, seed, _heads.duplicate_token_scores,
                   {"half_len": 7})]
    for what, n_batch, half_len, seed, score, kwargs in cases:
        tokens = _heads.repeated_random_tokens(n_batch, half_len, 1, model.cfg.d_vocab, bos=0, seed=seed)
        expected = _heads.head_scores(model, tokens, score, **kwargs)
        got = answer(model, tokens.clone(), score, **kwargs)
        model.reset_hooks()
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (model.cfg.n_heads, model.cfg.n_layers):
            raise CheckFailed(f"{what}: your tensor is [n_heads, n_layers]; stack one row per layer: [n_layers, "
                              f"n_heads].")
        if isinstance(got, torch.Tensor) and got.ndim == 2 and got.shape[0] == model.cfg.n_layers - 1:
            raise CheckFailed(f"{what}: {got.shape[0]} rows for a {model.cfg.n_layers}-layer model: include every "
                              f"layer, 0 .. n_layers - 1.")
        _check_shape(got, expected, what)
        if _close(got, expected):
            continue
        if _close(got[0], expected[1]) or _close(got[1], expected[0]):
            raise CheckFailed(f"{what}: row l must hold layer l's scores; your rows are in another order.")
        expect_tensor(got, expected, what, hint="run the model once with a names_filter for the attention patterns, "
                      "then apply `score(cache['pattern', layer], **kwargs)` to each layer and stack.")
    return f"{len(cases)} cases on the shipped toy"


# ---------------------------------------------------------------------------------------------------------
# 2.7 — the training loop
# ---------------------------------------------------------------------------------------------------------


def _toy_batches(n_ctx: int, d_vocab: int, seed: int):
    import functools

    return functools.partial(_heads.toy_induction_batch, batch=8, n_ctx=n_ctx, d_vocab=d_vocab, seed=seed,
                             min_len=4)


@exercise("02", "2.7", "train_toy", "The training loop", points=3, reference=_heads.train_toy)
def train_toy(answer, hidden):
    expect_callable(answer, "train_toy")
    cases = [(1, 12, 1e-2, 4, None), (2, 9, 3e-3, 4, _heads.loss_probe)]  # model seed, steps, lr, log_every, callback
    if hidden:
        seed = 3 + int(torch.randint(0, 10**6, (1,), generator=hidden_generator(27)))
        cases += [(seed, 10, 5e-3, 3, _heads.loss_probe)]
    for seed, steps, lr, log_every, callback in cases:
        what = (f"a fresh toy (seed {seed}), {steps} steps at lr {lr:g}, logging every {log_every}"
                f"{' with a callback' if callback else ''}")
        batches = _toy_batches(24, 40, seed)
        expected = _heads.train_toy(_heads.fresh_toy(seed), batches, steps=steps, lr=lr, log_every=log_every,
                                    callback=callback)
        got = answer(_heads.fresh_toy(seed), batches, steps=steps, lr=lr, log_every=log_every, callback=callback)
        if not isinstance(got, (list, tuple)) or not all(isinstance(entry, dict) for entry in got):
            raise CheckFailed(f"{what}: return the log, a list of dicts ({{'step': ..., 'loss': ..., ...}}), got "
                              f"{type(got).__name__}.")
        steps_logged = [entry.get("step") for entry in got]
        steps_expected = [entry["step"] for entry in expected]
        if steps_logged != steps_expected:
            raise CheckFailed(f"{what}: you logged steps {steps_logged}; expected {steps_expected} (every "
                              f"log_every steps from step 0, and the last step).")
        for mine, theirs in zip(got, expected):
            missing = set(theirs) - set(mine)
            if missing:
                raise CheckFailed(f"{what}: the entry for step {theirs['step']} lacks {sorted(missing)}"
                                  f"{': merge what callback(step, model) returns into it' if callback else ''}.")
        first, first_expected = float(got[0]["loss"]), expected[0]["loss"]
        if abs(first - first_expected) > 1e-3:
            raise CheckFailed(f"{what}: the loss at step 0 is {first:.4f}, expected {first_expected:.4f} (before any "
                              f"update, so the loss itself is computed differently). Mean next-token cross-entropy: "
                              f"logits[:, :-1] against tokens[:, 1:], over every position. Log the loss of the batch "
                              f"*before* the optimiser step.")
        for mine, theirs in zip(got, expected):
            for key, value in theirs.items():
                if key == "step":
                    continue
                if abs(float(mine[key]) - value) > 2e-3 + 2e-3 * abs(value):
                    raise CheckFailed(
                        f"{what}: at step {theirs['step']}, '{key}' is {float(mine[key]):.4f}, expected {value:.4f}. "
                        f"The first steps agree, so the loss is right but the updates differ: AdamW with "
                        f"weight_decay=0 and the given lr; zero the gradients before every backward(); one "
                        f"optimiser.step() per batch; the batch of step s is batches(s).")
    return f"{len(cases)} fresh toys trained"


# ---------------------------------------------------------------------------------------------------------
# 2.9 — the full OV circuit
# ---------------------------------------------------------------------------------------------------------


def _randn(generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=generator)


@exercise("02", "2.9", "full_ov_circuit", "The full OV circuit, from tokens to logits", reference=_heads.full_ov_circuit)
def full_ov_circuit(answer, hidden):
    expect_callable(answer, "full_ov_circuit")
    generator = torch.Generator().manual_seed(9)
    cases = [("3 heads, d_vocab 7, d_model 5, d_head 2", 3, 7, 5, 2, generator),
             ("1 head, d_vocab 6, d_model 4, d_head 3", 1, 6, 4, 3, generator)]
    if hidden:
        cases += [("4 heads, d_vocab 11, d_model 6, d_head 2", 4, 11, 6, 2, hidden_generator(29))]
    for what, n, d_vocab, d_model, d_head, g in cases:
        W_E, W_U = _randn(g, d_vocab, d_model), _randn(g, d_model, d_vocab)
        W_V, W_O = _randn(g, n, d_model, d_head), _randn(g, n, d_head, d_model)
        expected = _heads.full_ov_circuit(W_E, W_V, W_O, W_U)
        got = answer(W_E.clone(), W_V.clone(), W_O.clone(), W_U.clone())
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, d_vocab, d_vocab) and n > 1:
            raise CheckFailed(f"{what}: you returned one circuit per head {tuple(got.shape)}; sum the heads' OV "
                              f"circuits (they all write into the same residual stream) into one [d_vocab, d_vocab].")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (d_model, d_model):
            raise CheckFailed(f"{what}: that is W_OV alone ({d_model} x {d_model}); read it from tokens to logits: "
                              f"W_E on the left, W_U on the right.")
        _check_shape(got, expected, what)
        if _close(got, expected, atol=1e-3):
            continue
        if _close(got, expected.T, atol=1e-3):
            raise CheckFailed(f"{what}: your circuit is transposed. Row a is the token attended to, column b the "
                              f"logit it changes: W_E @ W_OV @ W_U.")
        expect_tensor(got, expected, what, atol=1e-3, rtol=1e-3,
                      hint="W_E [d_vocab, d_model] @ (sum over heads of W_V[h] @ W_O[h]) @ W_U [d_model, d_vocab].")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 2.10 — the previous-token head's QK circuit over positions
# ---------------------------------------------------------------------------------------------------------


def _positional_variants(W_pos, W_Q, b_Q, W_K, b_K) -> dict[str, torch.Tensor]:
    import math

    def pattern(x, scale=True, mask=True, bias=True):
        q = x @ W_Q + (b_Q[:, None] if bias else 0)
        k = x @ W_K + (b_K[:, None] if bias else 0)
        scores = q @ k.transpose(-1, -2) / (math.sqrt(W_Q.shape[-1]) if scale else 1.0)
        if mask:
            scores = scores.masked_fill(torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1)

    centred = W_pos - W_pos.mean(-1, keepdim=True)
    return {
        "raw": pattern(W_pos),
        "no centring": pattern(W_pos / (W_pos.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()),
        "no rescaling": pattern(centred),
        "no sqrt": pattern(_heads._ln_pre(W_pos), scale=False),
        "no mask": pattern(_heads._ln_pre(W_pos), mask=False),
        "no bias": pattern(_heads._ln_pre(W_pos), bias=False),
    }


@exercise("02", "2.10", "positional_qk_pattern", "Attention from positions alone",
          reference=_heads.positional_qk_pattern)
def positional_qk_pattern(answer, hidden):
    expect_callable(answer, "positional_qk_pattern")
    toy = _heads.induction_toy()
    cases = [("the toy's layer 0", toy.W_pos[:20], toy.W_Q[0], toy.b_Q[0], toy.W_K[0], toy.b_K[0])]
    g = torch.Generator().manual_seed(10)
    cases.append(("random weights, 2 heads, n_ctx 7", _randn(g, 7, 6) + 0.5, _randn(g, 2, 6, 3), _randn(g, 2, 3),
                  _randn(g, 2, 6, 3), _randn(g, 2, 3)))
    if hidden:
        g = hidden_generator(30)
        cases.append(("random weights, 3 heads, n_ctx 9", _randn(g, 9, 8) - 0.3, _randn(g, 3, 8, 4),
                      _randn(g, 3, 4), _randn(g, 3, 8, 4), _randn(g, 3, 4)))
    for what, W_pos, W_Q, b_Q, W_K, b_K in cases:
        W_pos, W_Q, b_Q, W_K, b_K = (w.detach().clone() for w in (W_pos, W_Q, b_Q, W_K, b_K))
        expected = _heads.positional_qk_pattern(W_pos, W_Q, b_Q, W_K, b_K)
        got = answer(W_pos.clone(), W_Q.clone(), b_Q.clone(), W_K.clone(), b_K.clone())
        _check_shape(got, expected, what)
        if _close(got, expected, atol=1e-4):
            continue
        if (got.detach().triu(1).abs() > 1e-6).any():
            raise CheckFailed(f"{what}: query i attends to keys after it. Mask the scores of keys j > i with -inf "
                              f"*before* the softmax (a causal model never looks ahead).")
        if not torch.allclose(got.detach().sum(-1), torch.ones(got.shape[:-1]), atol=1e-4):
            raise CheckFailed(f"{what}: the rows of your pattern do not sum to 1. Mask the future keys with -inf "
                              f"*before* the softmax, not after it.")
        for mistake, pattern in _positional_variants(W_pos, W_Q, b_Q, W_K, b_K).items():
            if _close(got, pattern, atol=1e-4):
                raise CheckFailed(f"{what}: {_POSITIONAL_HINTS[mistake]}")
        expect_tensor(got, expected, what, hint="layer-norm W_pos (centre, divide by the root mean square), then "
                      "q = x W_Q + b_Q, k = x W_K + b_K, scores / sqrt(d_head), causal mask, softmax over keys.")
    return f"{len(cases)} cases"


_POSITIONAL_HINTS = {
    "raw": "you fed W_pos in as it is. The head reads the residual stream through its (folded) layer norm: centre "
           "each row over d_model and divide it by its root mean square first.",
    "no centring": "you rescaled W_pos but did not centre it: subtract each row's mean over d_model first.",
    "no rescaling": "you centred W_pos but did not divide each row by its root mean square (the layer norm's scale).",
    "no sqrt": "you forgot to divide the scores by sqrt(d_head).",
    "no mask": "your pattern is not causal: mask keys j > i with -inf before the softmax.",
    "no bias": "you left out the biases b_Q and b_K (the folded layer norm moved its bias into them).",
}


# ---------------------------------------------------------------------------------------------------------
# 2.11 — attention scores, split by source
# ---------------------------------------------------------------------------------------------------------


def _decompose_case(g, n_batch: int, n_pos: int, n_heads: int, d_model: int, d_head: int):
    cache = {"hook_embed": _randn(g, n_batch, n_pos, d_model), "hook_pos_embed": _randn(g, n_batch, n_pos, d_model),
             "blocks.0.attn.hook_z": _randn(g, n_batch, n_pos, n_heads, d_head),
             "blocks.1.ln1.hook_scale": 0.5 + torch.rand(n_batch, n_pos, 1, generator=g)}
    weights = (_randn(g, n_heads, d_head, d_model), _randn(g, d_model), _randn(g, d_model, d_head), _randn(g, d_head),
               _randn(g, d_model, d_head), _randn(g, d_head))
    return cache, weights


def _toy_decompose_case():
    toy = _heads.induction_toy()
    tokens = _heads.repeated_random_tokens(2, 6, 1, toy.cfg.d_vocab, bos=0, seed=11)
    names = ("hook_embed", "hook_pos_embed", "blocks.0.attn.hook_z", "blocks.1.ln1.hook_scale")
    with torch.no_grad():
        _, cache = toy.run_with_cache(tokens, names_filter=lambda name: name in names)
    head = 4
    weights = (toy.W_O[0], toy.b_O[0], toy.W_Q[1, head], toy.b_Q[1, head], toy.W_K[1, head], toy.b_K[1, head])
    return {name: cache[name].clone() for name in names}, tuple(w.detach().clone() for w in weights)


@exercise("02", "2.11", "decompose_attention_scores", "Attention scores, split by source", points=3,
          reference=_heads.decompose_attention_scores)
def decompose_attention_scores(answer, hidden):
    expect_callable(answer, "decompose_attention_scores")
    cases = [("the toy's L1H4 on 2 x 6 repeated tokens", *_toy_decompose_case()),
             ("random tensors: batch 2, 5 positions, 3 layer-0 heads", *_decompose_case(
                 torch.Generator().manual_seed(11), 2, 5, 3, 6, 2))]
    if hidden:
        cases.append(("random tensors: batch 1, 7 positions, 2 layer-0 heads",
                      *_decompose_case(hidden_generator(31), 1, 7, 2, 5, 3)))
    for what, cache, weights in cases:
        expected = _heads.decompose_attention_scores(cache, *weights)
        got = answer({name: value.clone() for name, value in cache.items()}, *(w.clone() for w in weights))
        n_src = expected.shape[0]
        if isinstance(got, torch.Tensor) and got.ndim == 5 and got.shape[0] == n_src - 1:
            raise CheckFailed(f"{what}: {got.shape[0]} sources instead of {n_src}: embed, pos, one per layer-0 head, "
                              f"layer 0's bias b_O0, and last the biases of the query and key themselves (b_Q, b_K).")
        _check_shape(got, expected, what)
        if _close(got, expected, atol=1e-3):
            continue
        if _close(got.sum((0, 1)), expected.sum((0, 1)), atol=1e-3):
            if _close(got, expected.transpose(0, 1), atol=1e-3):
                raise CheckFailed(f"{what}: the pieces sum correctly but your axes are swapped: axis 0 is the query's "
                                  f"source, axis 1 the key's.")
            raise CheckFailed(f"{what}: the pieces sum to the right scores but are split wrongly: check the order of "
                              f"the sources (embed, pos, L0H0 .., L0 bias, QK bias) and that each piece is centred "
                              f"on its own.")
        z, W_O0, b_O0 = cache["blocks.0.attn.hook_z"], weights[0], weights[1]
        resid = cache["hook_embed"] + cache["hook_pos_embed"] + torch.einsum("bphe,hem->bpm", z, W_O0) + b_O0
        normal = (resid - resid.mean(-1, keepdim=True)) / cache["blocks.1.ln1.hook_scale"]
        full = (normal @ weights[2] + weights[3]) @ (normal @ weights[4] + weights[5]).transpose(-1, -2)
        d_head = weights[2].shape[-1]
        if _close(got.sum((0, 1)), full, atol=1e-3):
            raise CheckFailed(f"{what}: you forgot to divide the scores by sqrt(d_head) = {d_head ** 0.5:.3g}.")
        uncentred = resid / cache["blocks.1.ln1.hook_scale"]
        full_uncentred = (uncentred @ weights[2] + weights[3]) @ (uncentred @ weights[4] + weights[5]).transpose(-1, -2)
        if _close(got.sum((0, 1)), full_uncentred / d_head ** 0.5, atol=1e-3):
            raise CheckFailed(f"{what}: you did not centre the pieces. The layer norm subtracts the mean over d_model "
                              f"first; centring is linear, so centre each piece on its own.")
        unscaled = (resid - resid.mean(-1, keepdim=True))
        full_unscaled = (unscaled @ weights[2] + weights[3]) @ (unscaled @ weights[4] + weights[5]).transpose(-1, -2)
        if _close(got.sum((0, 1)), full_unscaled / d_head ** 0.5, atol=1e-3):
            raise CheckFailed(f"{what}: you did not divide the pieces by the layer norm's scale "
                              f"(cache['blocks.1.ln1.hook_scale'], one number per position, the same for every piece).")
        expect_tensor(got, expected, what, atol=1e-3, rtol=1e-3,
                      hint="pieces: embed, pos, z_h @ W_O0[h], b_O0; centre each, divide by the scale; q_s = piece_s "
                           "@ W_Q and k_t = piece_t @ W_K, plus b_Q and b_K as a last source; score[s, t] = q_s . k_t "
                           "/ sqrt(d_head).")
    return f"{len(cases)} cases"


# ---------------------------------------------------------------------------------------------------------
# 2.12 — the causal test: ablate heads, measure the in-context loss
# ---------------------------------------------------------------------------------------------------------


def _ablation_variants(model, tokens, heads):
    """Logits of the usual mistakes: zero ablation, and the mean over the batch only (one mean per position)."""
    layers = sorted({layer for layer, _ in heads})
    names = {f"blocks.{layer}.attn.hook_z" for layer in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    out = {}
    for mistake in ("zero", "per-position mean"):
        hooks = []
        for layer in layers:
            chosen = [head for l, head in heads if l == layer]
            z_clean = cache[f"blocks.{layer}.attn.hook_z"]
            value = torch.zeros_like(z_clean) if mistake == "zero" else z_clean.mean(0, keepdim=True).expand_as(z_clean)

            def hook(z, hook, chosen=chosen, value=value):
                z = z.clone()
                z[:, :, chosen] = value[:, :, chosen]
                return z

            hooks.append((f"blocks.{layer}.attn.hook_z", hook))
        with torch.no_grad():
            out[mistake] = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return out


@exercise("02", "2.12", "ablated_repeat_losses", "Ablate heads, measure the in-context loss", points=3,
          reference=_heads.ablated_repeat_losses)
def ablated_repeat_losses(answer, hidden):
    expect_callable(answer, "ablated_repeat_losses")
    model = _toy()
    cases = [("heads L1H1, L1H4 on 3 x 8 repeated tokens", 3, 8, 0, [(1, 1), (1, 4)]),
             ("heads L0H4, L1H2 (two layers at once) on 2 x 11 repeated tokens", 2, 11, 1, [(0, 4), (1, 2)]),
             ("no heads (a clean run) on 2 x 5 repeated tokens", 2, 5, 2, [])]
    if hidden:
        g = hidden_generator(32)
        chosen = sorted((int(i) // 8, int(i) % 8) for i in torch.randperm(16, generator=g)[:3])
        cases.append((f"heads {chosen} on 4 x 9 repeated tokens", 4, 9,
                      int(torch.randint(0, 10**6, (1,), generator=g)), chosen))
    clean_check = _heads.repeated_random_tokens(1, 4, 1, model.cfg.d_vocab, bos=0, seed=99)
    with torch.no_grad():
        clean_logits = model(clean_check)
    for what, n_batch, half_len, seed, heads in cases:
        tokens = _heads.repeated_random_tokens(n_batch, half_len, 1, model.cfg.d_vocab, bos=0, seed=seed)
        expected = _heads.ablated_repeat_losses(model, tokens, half_len, list(heads))
        got = answer(model, tokens.clone(), half_len, list(heads))
        with torch.no_grad():
            left_behind = not torch.allclose(model(clean_check), clean_logits, atol=1e-4)
        model.reset_hooks()
        if left_behind:
            raise CheckFailed(f"{what}: your function left a hook on the model, so every later run is ablated too. "
                              f"Use model.run_with_hooks(...) (it removes its hooks), or model.reset_hooks().")
        if isinstance(got, (tuple, list)) and len(got) == 2 and not isinstance(got[0], torch.Tensor):
            raise CheckFailed(f"{what}: return one row per sequence, a [batch, 2] tensor (first-copy loss, second-copy "
                              f"loss), not the batch means: the chapter puts confidence intervals on them.")
        _check_shape(got, expected, what)
        if _close(got, expected, atol=1e-3):
            continue
        if _close(got, expected.flip(-1), atol=1e-3):
            raise CheckFailed(f"{what}: your two columns are swapped: column 0 is the first copy, column 1 the second.")
        if len({layer for layer, _ in heads}) > 1:
            for layer in {layer for layer, _ in heads}:
                one_layer = _heads.ablated_repeat_losses(model, tokens, half_len, [p for p in heads if p[0] == layer])
                if _close(got, one_layer, atol=1e-3):
                    raise CheckFailed(f"{what}: only the heads of layer {layer} were ablated. Put one hook on every "
                                      f"layer that has a head in the list, all in the same run.")
        for mistake, logits in _ablation_variants(model, tokens, heads).items():
            per_copy = _per_sequence_losses(logits, tokens, half_len)
            if _close(got, per_copy, atol=1e-3):
                raise CheckFailed(f"{what}: that is a {mistake} ablation. Replace the heads' hook_z by its mean over "
                                  f"the batch *and* all positions (one [d_head] vector per head), from a clean run "
                                  f"of the same tokens.")
        expect_tensor(got, expected, what, atol=1e-3, rtol=1e-3,
                      hint="clean run -> mean hook_z over batch and positions per layer; rerun with one hook per "
                           "layer on blocks.{layer}.attn.hook_z that writes those means into the ablated heads; "
                           "per-sequence next-token loss on tokens 2..half_len and half_len+2..2*half_len.")
    return f"{len(cases)} cases on the shipped toy"


def _per_sequence_losses(logits, tokens, half_len):
    losses = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.stack([losses[:, 1:half_len].mean(-1), losses[:, half_len + 1:2 * half_len].mean(-1)], dim=-1)
