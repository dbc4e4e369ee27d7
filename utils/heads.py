"""Head detectors shared by the chapters: repeated random tokens and per-head attention scores.

Chapter 02 has the learner write each of these as an exercise; its checks compare against the functions here,
and later chapters import them:

    tokens = repeated_random_tokens(n_batch=8, half_len=40, low=100, high=model.cfg.d_vocab, bos=bos_id, seed=0)
    scores = head_scores(model, tokens, induction_scores, half_len=40)        # [n_layers, n_heads]

Layout of a repeated batch: position 0 is BOS, positions 1..half_len the random half, positions
half_len+1..2*half_len the same half again. For a query at position i of the second copy (i > half_len), the
earlier occurrence of the same token is at i - half_len and the token that followed it at i - half_len + 1.

All scores take one layer's attention pattern, shape [batch, n_heads, query_pos, key_pos] (what
`cache["pattern", layer]` holds), and return the mean attention per head, shape [n_heads], in [0, 1].
"""

from __future__ import annotations

from typing import Callable

import torch

Pattern = torch.Tensor  # [batch, n_heads, query_pos, key_pos]


def repeated_random_tokens(n_batch: int, half_len: int, low: int, high: int, bos: int | None, seed: int = 0
                           ) -> torch.Tensor:
    """[n_batch, 1 + 2 * half_len] long tensor: BOS, then half_len tokens uniform in [low, high), then the same again.

    With `bos=None` there is no BOS column (shape [n_batch, 2 * half_len]). The same seed gives the same batch.
    """
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(low, high, (n_batch, half_len), generator=generator)
    parts = [half, half]
    if bos is not None:
        parts.insert(0, torch.full((n_batch, 1), bos, dtype=torch.long))
    return torch.cat(parts, dim=1)


def _second_copy_queries(pattern: Pattern, half_len: int) -> torch.Tensor:
    n_pos = pattern.shape[-1]
    if n_pos != 2 * half_len + 1:
        raise ValueError(f"expected a pattern over 2 * half_len + 1 = {2 * half_len + 1} positions (BOS and two "
                         f"copies), got {n_pos}.")
    return torch.arange(half_len + 1, 2 * half_len + 1, device=pattern.device)


def previous_token_scores(pattern: Pattern) -> torch.Tensor:
    """[n_heads]: mean attention from each query position i >= 1 to position i - 1 (over batch and positions)."""
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))


def duplicate_token_scores(pattern: Pattern, half_len: int) -> torch.Tensor:
    """[n_heads]: mean attention from each query i in the second copy to the earlier occurrence of its own token,
    position i - half_len."""
    queries = _second_copy_queries(pattern, half_len)
    return pattern[:, :, queries, queries - half_len].mean(dim=(0, -1))


def induction_scores(pattern: Pattern, half_len: int) -> torch.Tensor:
    """[n_heads]: mean attention from each query i in the second copy to the token after the earlier occurrence of
    its own token, position i - half_len + 1."""
    queries = _second_copy_queries(pattern, half_len)
    return pattern[:, :, queries, queries - half_len + 1].mean(dim=(0, -1))


def head_scores(model, tokens: torch.Tensor, score: Callable[..., torch.Tensor], **kwargs) -> torch.Tensor:
    """[n_layers, n_heads]: `score(pattern, **kwargs)` for every layer's attention pattern on `tokens`."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return torch.stack([score(cache["pattern", layer], **kwargs) for layer in range(model.cfg.n_layers)])


def repeat_losses(logits: torch.Tensor, tokens: torch.Tensor, half_len: int) -> tuple[float, float]:
    """Mean next-token loss (nats) on the first copy and on the second copy of a repeated batch.

    First copy: predicting tokens 2..half_len (token 1 follows BOS and no model can know it).
    Second copy: predicting tokens half_len+2..2*half_len (token half_len+1 is the first of the copy: it follows
    the end of the first copy, so it cannot be predicted either... in principle; see chapter 02).
    """
    log_probs = logits[:, :-1].log_softmax(dim=-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]  # [batch, pos - 1]; column j predicts token j + 1
    first = losses[:, 1:half_len].mean()
    second = losses[:, half_len + 1:2 * half_len].mean()
    return first.item(), second.item()


def composition_score(W_A: torch.Tensor, W_B: torch.Tensor) -> torch.Tensor:
    """||W_A W_B||_F / (||W_A||_F ||W_B||_F), batched over any leading dimensions."""
    product = W_A @ W_B
    return product.norm(dim=(-2, -1)) / (W_A.norm(dim=(-2, -1)) * W_B.norm(dim=(-2, -1)))


def toy_induction_batch(step: int, batch: int = 32, n_ctx: int = 64, d_vocab: int = 500, seed: int = 0,
                        fixed: bool = False, min_len: int = 8) -> torch.Tensor:
    """[batch, n_ctx] training tokens for chapter 02's toy: BOS (token 0), then in each row one segment of random
    tokens from [1, d_vocab), repeated over and over until the context is full.

    The segment's length (min_len .. (n_ctx - 1) // 2) is drawn per row, so a repeated token is a different
    distance back in every row. `fixed=True` is the version that fools you: the segment is always
    (n_ctx - 1) // 2 tokens long, so every repeated token is the same distance back and a head can find it by
    position alone. The same (step, seed) gives the same batch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    tokens = torch.empty(batch, n_ctx, dtype=torch.long)
    tokens[:, 0] = 0
    for row in range(batch):
        length = (n_ctx - 1) // 2
        if not fixed:
            length = int(torch.randint(min_len, length + 1, (1,), generator=generator))
        segment = torch.randint(1, d_vocab, (length,), generator=generator)
        tokens[row, 1:] = segment.repeat(n_ctx // length + 1)[:n_ctx - 1]
    return tokens
