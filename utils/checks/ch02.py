"""Checks for chapter 02 — Induction heads.

References come from `utils.heads` (later chapters import the same detectors). The checks run the learner's
function on small synthetic attention patterns and matrices whose right answer is known, and compare a wrong
answer with the usual mistakes (off-by-one offsets, averaging over the wrong positions) to say which one it is.
"""

from __future__ import annotations

import torch

from utils import heads as _heads
from utils.course.checking import CheckFailed, exercise, expect_callable, expect_tensor


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


@exercise("02", "2.1", "repeated_tokens", "Repeated random tokens")
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


@exercise("02", "2.2", "repeat_losses", "Loss on the first and second copy")
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


@exercise("02", "2.3", "previous_token_scores", "Previous-token score")
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


@exercise("02", "2.4", "duplicate_token_scores", "Duplicate-token score")
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


@exercise("02", "2.5", "induction_scores", "Induction score", points=2)
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
# 2.6 — composition score
# ---------------------------------------------------------------------------------------------------------


@exercise("02", "2.6", "composition_score", "Composition score", points=2)
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
