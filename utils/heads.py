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

import functools
import math
from typing import Callable

import torch

from utils.course.remote import course_object

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


# ---------------------------------------------------------------------------------------------------------
# The toy, trained and reverse-engineered (chapter 02, sections 2 and 4). The toy's layer norms are folded into
# its weights (`induction_toy`), so `W_Q`, `b_Q`, ... act on the centred residual stream divided by its scale.
# ---------------------------------------------------------------------------------------------------------


@course_object  # checks pass it to learners' functions; the grader rebuilds it in the kernel by name
@functools.lru_cache(maxsize=2)
def induction_toy(filename: str = "toy_induction.pt"):
    """The shipped induction toy (data/, made by scripts/train_toy_induction.py) with its layer norms folded into
    the weights (TransformerLens's weight processing: fold_ln, centre the writing weights and the unembedding).
    Same log-probabilities as `utils.toy.shipped_toy(filename)` (to 1e-4); `.toy_metadata` holds the training log."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources import boot_native

    from utils.toy import DATA

    checkpoint = torch.load(DATA / filename, map_location="cpu", weights_only=True)
    config = dict(checkpoint["config"])
    config["d_mlp"] = None if config["attn_only"] else config["d_mlp"]
    config["act_fn"] = None if config["attn_only"] else config["act_fn"]
    model = boot_native(TransformerBridgeConfig(**config))
    model.original_model.load_state_dict(checkpoint["state_dict"])
    model.enable_compatibility_mode(disable_warnings=True)  # with weight processing: the layer norms are folded
    model.eval()
    model.toy_metadata = checkpoint.get("metadata", {})
    return model


@course_object  # a new, untrained toy; each seed is a different model (not cached: training changes it)
def fresh_toy(seed: int = 0, n_layers: int = 1, d_model: int = 32, n_heads: int = 4, d_vocab: int = 40,
              n_ctx: int = 24):
    """A freshly initialised attention-only toy (the global generator is seeded with `seed` first)."""
    from utils.toy import build_toy

    torch.manual_seed(seed)
    return build_toy(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_vocab=d_vocab, n_ctx=n_ctx,
                     attn_only=True, seed=seed)


def train_toy(model, batches: Callable[[int], torch.Tensor], steps: int, lr: float, log_every: int = 50,
              callback: Callable | None = None) -> list[dict]:
    """AdamW (weight decay 0) on next-token loss; `batches(step)` gives the [batch, pos] tokens of each step. At step
    0, every `log_every` steps and at the last step, appends {"step", "loss", **callback(step, model)} to the log it
    returns (the loss of that step's batch, before the update; the callback runs in eval mode without gradients).
    The same updates as `utils.toy.train`, without its progress bar."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    log: list[dict] = []
    with torch.enable_grad():
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        model.train()
        for step in range(steps):
            tokens = batches(step)
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step % log_every == 0 or step == steps - 1:
                entry = {"step": step, "loss": loss.item()}
                if callback is not None:
                    model.eval()
                    with torch.no_grad():
                        entry.update(callback(step, model))
                    model.train()
                log.append(entry)
    model.eval()
    return log


def loss_probe(step: int, model) -> dict:
    """A `train_toy` callback for tests and checks: the loss on one fixed held-out batch of the model's size."""
    tokens = toy_induction_batch(10_000, batch=4, n_ctx=model.cfg.n_ctx, d_vocab=model.cfg.d_vocab,
                                 min_len=min(8, (model.cfg.n_ctx - 1) // 2))
    logits = model(tokens)
    losses = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])
    return {"held_out_loss": losses.mean().item()}


def full_ov_circuit(W_E: torch.Tensor, W_V: torch.Tensor, W_O: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """[d_vocab, d_vocab]: W_E (sum_h W_V[h] W_O[h]) W_U, the heads' summed OV circuit read from tokens to logits.
    Row a: how attending to token a changes every logit. `W_V` [n_heads, d_model, d_head], `W_O` [n_heads, d_head,
    d_model] (the heads to sum; pass one head as [1, ...])."""
    return W_E @ (W_V @ W_O).sum(0) @ W_U


def diagonal_accuracy(circuit: torch.Tensor) -> float:
    """Fraction of rows whose largest entry is on the diagonal (row a's own column a)."""
    return (circuit.argmax(-1) == torch.arange(circuit.shape[-2])).float().mean().item()


def _ln_pre(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """What a folded layer norm does: centre over d_model, divide by the root mean square."""
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def positional_qk_pattern(W_pos: torch.Tensor, W_Q: torch.Tensor, b_Q: torch.Tensor, W_K: torch.Tensor,
                          b_K: torch.Tensor) -> torch.Tensor:
    """[n_heads, n_ctx, n_ctx]: the attention pattern each head would have if its input were the positional
    embeddings alone (layer-normed: centred, divided by their root mean square): query i's scores on keys j <= i,
    (q_i . k_j) / sqrt(d_head), causally masked, softmaxed over j. `W_pos` [n_ctx, d_model], `W_Q`, `W_K`
    [n_heads, d_model, d_head], `b_Q`, `b_K` [n_heads, d_head]."""
    x = _ln_pre(W_pos)
    q = x @ W_Q + b_Q[:, None]  # [n_heads, n_ctx, d_head]
    k = x @ W_K + b_K[:, None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(W_Q.shape[-1])
    n_ctx = W_pos.shape[0]
    future = torch.ones(n_ctx, n_ctx, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def attention_sources(n_heads: int) -> list[str]:
    """Names of the sources `decompose_attention_scores` splits a layer-1 score by, in order."""
    return ["embed", "pos"] + [f"L0H{h}" for h in range(n_heads)] + ["L0 bias", "QK bias"]


def decompose_attention_scores(cache: dict, W_O0: torch.Tensor, b_O0: torch.Tensor, W_Q: torch.Tensor,
                               b_Q: torch.Tensor, W_K: torch.Tensor, b_K: torch.Tensor) -> torch.Tensor:
    """[n_src, n_src, batch, query_pos, key_pos]: one layer-1 head's attention scores split by where its query and
    its key came from. Sources (`attention_sources`): the token embedding, the positional embedding, each layer-0
    head's output (z_h @ W_O0[h]), layer 0's output bias b_O0, and last the query's / key's own bias (b_Q, b_K).

    `cache` holds "hook_embed", "hook_pos_embed" [batch, pos, d_model], "blocks.0.attn.hook_z" [batch, pos,
    n_heads, d_head] and "blocks.1.ln1.hook_scale" [batch, pos, 1]; `W_O0` [n_heads, d_head, d_model], `b_O0`
    [d_model]; `W_Q`, `W_K` [d_model, d_head] and `b_Q`, `b_K` [d_head] of the layer-1 head. The pieces sum (over
    both source axes) to the head's scores before the causal mask, (q . k) / sqrt(d_head).
    """
    z = cache["blocks.0.attn.hook_z"]
    heads_out = torch.einsum("bphe,hem->hbpm", z, W_O0)  # [n_heads, batch, pos, d_model]
    pieces = torch.cat([cache["hook_embed"][None], cache["hook_pos_embed"][None].expand_as(cache["hook_embed"][None]),
                        heads_out, b_O0.expand_as(cache["hook_embed"])[None]])
    # the folded layer norm: centre each piece (centring is linear), divide all by the run's scale
    pieces = (pieces - pieces.mean(-1, keepdim=True)) / cache["blocks.1.ln1.hook_scale"]
    q = torch.cat([pieces @ W_Q, b_Q.expand(1, *pieces.shape[1:3], -1)])  # [n_src, batch, pos, d_head]
    k = torch.cat([pieces @ W_K, b_K.expand(1, *pieces.shape[1:3], -1)])
    return torch.einsum("sbqe,tbke->stbqk", q, k) / math.sqrt(W_Q.shape[-1])


def ablated_repeat_losses(model, tokens: torch.Tensor, half_len: int, heads: list[tuple[int, int]]) -> torch.Tensor:
    """[batch, 2]: each sequence's mean loss on the first and on the second copy (as `repeat_losses`) while the
    (layer, head) pairs in `heads` are mean-ablated: each one's hook_z replaced by its mean over this batch and all
    positions, measured on a clean run of the same tokens. All of them are ablated in one run."""
    layers = sorted({layer for layer, _ in heads})
    names = {f"blocks.{layer}.attn.hook_z" for layer in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)

        def ablation_hook(layer):
            chosen = [head for l, head in heads if l == layer]
            mean_z = cache[f"blocks.{layer}.attn.hook_z"].mean(dim=(0, 1))  # [n_heads, d_head]

            def ablate(z, hook):
                z = z.clone()
                z[:, :, chosen] = mean_z[chosen]
                return z

            return ablate

        hooks = [(f"blocks.{layer}.attn.hook_z", ablation_hook(layer)) for layer in layers]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    log_probs = logits[:, :-1].log_softmax(-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]  # column j predicts token j + 1
    return torch.stack([losses[:, 1:half_len].mean(-1), losses[:, half_len + 1:2 * half_len].mean(-1)], dim=-1)
