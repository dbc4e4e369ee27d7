"""Chapter 02's checks: the reference passes, the usual mistakes are rejected with a specific message, a stub
is reported as not attempted."""

from __future__ import annotations

import pytest
import torch

from utils import heads
from utils.course.checking import run_check
from utils.checks import ch02
from tests.check_helpers import passes as _passes, rejected as _rejected, stub as _stub


ALL_CHECKS = [ch02.repeated_tokens, ch02.repeat_losses, ch02.previous_token_scores, ch02.duplicate_token_scores,
              ch02.induction_scores, ch02.head_scores, ch02.train_toy, ch02.composition_score, ch02.full_ov_circuit,
              ch02.positional_qk_pattern, ch02.decompose_attention_scores, ch02.ablated_repeat_losses]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_stub_is_not_attempted(check):
    result = run_check(check.exercise, _stub, hidden=True)
    assert not result.passed
    assert result.message.startswith("not attempted"), result.message


def test_registry_lists_twelve_exercises():
    from utils.checks import chapter_exercises

    entries = chapter_exercises("02")
    assert sorted(entry.number for entry in entries.values()) == sorted(f"2.{i}" for i in range(1, 13))
    assert all(entry.reference is not None for entry in entries.values())


# 2.1 ------------------------------------------------------------------------------------------------------

def test_repeated_tokens_reference_passes():
    _passes(ch02.repeated_tokens, heads.repeated_random_tokens)


def test_repeated_tokens_other_generator_passes():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        g = torch.Generator().manual_seed(seed + 99)
        half = low + torch.randint(0, high - low, (n_batch, half_len), generator=g)
        parts = ([torch.full((n_batch, 1), bos)] if bos is not None else []) + [half, half]
        return torch.cat(parts, 1)

    _passes(ch02.repeated_tokens, answer)


def test_repeated_tokens_not_repeated_rejected():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        g = torch.Generator().manual_seed(seed)
        body = torch.randint(low, high, (n_batch, 2 * half_len), generator=g)
        return body if bos is None else torch.cat([torch.full((n_batch, 1), bos), body], 1)

    _rejected(ch02.repeated_tokens, answer, "repeat the first half")


def test_repeated_tokens_always_bos_rejected():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        return heads.repeated_random_tokens(n_batch, half_len, low, high, 0 if bos is None else bos, seed)

    _rejected(ch02.repeated_tokens, answer, "no BOS column")


def test_repeated_tokens_unseeded_rejected():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        return heads.repeated_random_tokens(n_batch, half_len, low, high, bos, int(torch.randint(0, 10**6, ())))

    _rejected(ch02.repeated_tokens, answer, "same seed")


def test_repeated_tokens_high_inclusive_rejected():
    def answer(n_batch, half_len, low, high, bos, seed=0):
        tokens = heads.repeated_random_tokens(n_batch, half_len, low, high, bos, seed)
        body = tokens if bos is None else tokens[:, 1:]
        body[:, 0] = high
        body[:, half_len] = high
        return tokens

    _rejected(ch02.repeated_tokens, answer, "[low, high)")


# 2.2 ------------------------------------------------------------------------------------------------------

def test_previous_token_reference_passes():
    _passes(ch02.previous_token_scores, heads.previous_token_scores)


def test_previous_token_main_diagonal_rejected():
    _rejected(ch02.previous_token_scores, lambda p: p.diagonal(dim1=-2, dim2=-1).mean(dim=(0, -1)), "own position")


def test_previous_token_wrong_denominator_rejected():
    _rejected(ch02.previous_token_scores,
              lambda p: p.diagonal(offset=-1, dim1=-2, dim2=-1).sum(-1).mean(0) / p.shape[-1], "divided")


def test_previous_token_per_batch_rejected():
    _rejected(ch02.previous_token_scores, lambda p: p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1), "shape")


# 2.3 ------------------------------------------------------------------------------------------------------

def test_duplicate_reference_passes():
    _passes(ch02.duplicate_token_scores, heads.duplicate_token_scores)


def test_duplicate_is_induction_rejected():
    _rejected(ch02.duplicate_token_scores, heads.induction_scores, "induction score")


def test_duplicate_off_by_one_rejected():
    _rejected(ch02.duplicate_token_scores, lambda p, h: ch02._offset_score(p, h, -1), "off by one")


def test_duplicate_all_queries_rejected():
    _rejected(ch02.duplicate_token_scores, lambda p, h: ch02._offset_score(p, h, 0, all_queries=True), "first copy")


# 2.4 ------------------------------------------------------------------------------------------------------

def test_induction_reference_passes():
    _passes(ch02.induction_scores, heads.induction_scores)


def test_induction_is_duplicate_rejected():
    _rejected(ch02.induction_scores, heads.duplicate_token_scores, "off by one", "after")


def test_induction_plus_two_rejected():
    _rejected(ch02.induction_scores, lambda p, h: ch02._offset_score(p, h, 2), "off by one", "+ 2")


def test_induction_first_copy_queries_rejected():
    _rejected(ch02.induction_scores, lambda p, h: ch02._offset_score(p, h, 1, all_queries=True), "first copy")


def test_induction_drops_last_query_rejected():
    def answer(p, h):
        q = torch.arange(h + 1, 2 * h)
        return p[:, :, q, q - h + 1].mean(dim=(0, -1))

    _rejected(ch02.induction_scores, answer, "last query")


# 2.5 ------------------------------------------------------------------------------------------------------

def test_repeat_losses_reference_passes():
    _passes(ch02.repeat_losses, heads.repeat_losses)


def test_repeat_losses_unshifted_rejected():
    def answer(logits, tokens, half_len):
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
        losses = losses.view(tokens.shape)
        return losses[:, 2:half_len + 1].mean().item(), losses[:, half_len + 1:].mean().item()

    _rejected(ch02.repeat_losses, answer, "shift")


def test_repeat_losses_swapped_rejected():
    _rejected(ch02.repeat_losses, lambda l, t, h: heads.repeat_losses(l, t, h)[::-1], "swapped")


def test_repeat_losses_includes_unpredictable_token_rejected():
    def answer(logits, tokens, half_len):
        per_pos = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return per_pos[:, 1:half_len].mean().item(), per_pos[:, half_len:].mean().item()

    _rejected(ch02.repeat_losses, answer, "not predictable")


# 2.6 ------------------------------------------------------------------------------------------------------

def test_composition_reference_passes():
    _passes(ch02.composition_score, heads.composition_score)


def test_composition_unnormalised_rejected():
    _rejected(ch02.composition_score, lambda a, b: (a @ b).norm(dim=(-2, -1)), "normalise")


def test_composition_wrong_order_rejected():
    _rejected(ch02.composition_score, lambda a, b: heads.composition_score(b, a), "wrong order")


def test_composition_flattened_norm_rejected():
    _rejected(ch02.composition_score, lambda a, b: (a @ b).norm() / (a.norm() * b.norm()), "shape")


# the toy's training data (utils.heads.toy_induction_batch) ---------------------------------------------------

def test_toy_induction_batch_layout():
    for fixed in (False, True):
        tokens = heads.toy_induction_batch(step=3, batch=16, fixed=fixed)
        assert tokens.shape == (16, 64) and tokens.dtype == torch.long
        assert (tokens[:, 0] == 0).all() and tokens[:, 1:].min() >= 1 and tokens[:, 1:].max() < 500
        assert torch.equal(tokens, heads.toy_induction_batch(step=3, batch=16, fixed=fixed))
    fixed_tokens = heads.toy_induction_batch(step=3, batch=16, fixed=True)
    assert torch.equal(fixed_tokens[:, 32:], fixed_tokens[:, 1:33])  # always 31 back
    variable = heads.toy_induction_batch(step=3, batch=64)
    periods = set()
    for row in variable:
        body = row[1:]
        periods.add(next(p for p in range(8, 32) if torch.equal(body[p:], body[:-p])))
    assert len(periods) > 5  # the repeat distance varies from row to row


# 2.6 head_scores ---------------------------------------------------------------------------------------------

def _scores_by_layer(model, tokens, score, **kwargs):
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    return [score(cache["pattern", layer], **kwargs) for layer in range(model.cfg.n_layers)]


def test_head_scores_transposed_rejected():
    _rejected(ch02.head_scores, lambda m, t, s, **k: torch.stack(_scores_by_layer(m, t, s, **k), dim=1), "[n_heads, n_layers]")


def test_head_scores_reversed_layers_rejected():
    _rejected(ch02.head_scores, lambda m, t, s, **k: torch.stack(_scores_by_layer(m, t, s, **k)[::-1]), "order")


def test_head_scores_skips_last_layer_rejected():
    _rejected(ch02.head_scores, lambda m, t, s, **k: torch.stack(_scores_by_layer(m, t, s, **k)[:-1]), "every layer")


# 2.7 train_toy -----------------------------------------------------------------------------------------------

def _loop(zero_grad=True, log_before=True, weight_decay=0.0, unshifted=False, every=None, callback_ok=True):
    import torch.nn.functional as F

    def train_toy(model, batches, steps, lr, log_every=50, callback=None):
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        log = []
        with torch.enable_grad():
            for step in range(steps):
                tokens = batches(step)
                logits = model(tokens)
                if unshifted:
                    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
                else:
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
                if zero_grad:
                    optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                if step % (every or log_every) == 0 or step == steps - 1:
                    entry = {"step": step, "loss": loss.item()}
                    if callback is not None and callback_ok:
                        with torch.no_grad():
                            entry.update(callback(step, model))
                    log.append(entry)
        return log

    return train_toy


def test_train_toy_hand_written_loop_passes():
    _passes(ch02.train_toy, _loop())


def test_train_toy_default_weight_decay_passes():
    _passes(ch02.train_toy, _loop(weight_decay=0.01))


def test_train_toy_no_zero_grad_rejected():
    _rejected(ch02.train_toy, _loop(zero_grad=False), "zero the gradients")


def test_train_toy_unshifted_loss_rejected():
    _rejected(ch02.train_toy, _loop(unshifted=True), "step 0", "tokens[:, 1:]")


def test_train_toy_wrong_logging_rejected():
    _rejected(ch02.train_toy, _loop(every=1), "logged steps")


def test_train_toy_ignores_callback_rejected():
    _rejected(ch02.train_toy, _loop(callback_ok=False), "callback")


# 2.8 composition (above) · 2.9 full_ov_circuit -----------------------------------------------------------------

def test_full_ov_per_head_rejected():
    _rejected(ch02.full_ov_circuit, lambda E, V, O, U: E @ (V @ O) @ U, "sum")


def test_full_ov_transposed_rejected():
    _rejected(ch02.full_ov_circuit, lambda E, V, O, U: (E @ (V @ O).sum(0) @ U).T, "transposed")


def test_full_ov_without_embeddings_rejected():
    _rejected(ch02.full_ov_circuit, lambda E, V, O, U: (V @ O).sum(0), "W_E on the left")


# 2.10 positional_qk_pattern ----------------------------------------------------------------------------------

def _positional(raw=False, sqrt=True, mask=True, bias=True, centre=True):
    import math

    def positional_qk_pattern(W_pos, W_Q, b_Q, W_K, b_K):
        x = W_pos
        if not raw:
            x = x - x.mean(-1, keepdim=True) if centre else x
            x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        q = x @ W_Q + (b_Q[:, None] if bias else 0)
        k = x @ W_K + (b_K[:, None] if bias else 0)
        scores = q @ k.transpose(-1, -2) / (math.sqrt(W_Q.shape[-1]) if sqrt else 1)
        if mask:
            scores = scores.masked_fill(torch.ones(len(x), len(x), dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1)

    return positional_qk_pattern


def test_positional_hand_written_passes():
    _passes(ch02.positional_qk_pattern, _positional())


def test_positional_raw_rejected():
    _rejected(ch02.positional_qk_pattern, _positional(raw=True), "layer norm")


def test_positional_no_sqrt_rejected():
    _rejected(ch02.positional_qk_pattern, _positional(sqrt=False), "sqrt(d_head)")


def test_positional_no_mask_rejected():
    _rejected(ch02.positional_qk_pattern, _positional(mask=False), "-inf")


def test_positional_no_bias_rejected():
    _rejected(ch02.positional_qk_pattern, _positional(bias=False), "b_Q")


def test_positional_mask_after_softmax_rejected():
    def answer(W_pos, W_Q, b_Q, W_K, b_K):
        return _positional(mask=False)(W_pos, W_Q, b_Q, W_K, b_K).tril()

    _rejected(ch02.positional_qk_pattern, answer, "mask the future keys")


# 2.11 decompose_attention_scores -----------------------------------------------------------------------------

def _decompose(centre=True, scale=True, sqrt=True, bias_source=True, swap=False):
    def decompose_attention_scores(cache, W_O0, b_O0, W_Q, b_Q, W_K, b_K):
        embed = cache["hook_embed"]
        pieces = [embed, cache["hook_pos_embed"].expand_as(embed)]
        z = cache["blocks.0.attn.hook_z"]
        pieces += [z[:, :, h] @ W_O0[h] for h in range(z.shape[2])]
        pieces.append(b_O0.expand_as(embed))
        pieces = torch.stack(pieces)
        if centre:
            pieces = pieces - pieces.mean(-1, keepdim=True)
        if scale:
            pieces = pieces / cache["blocks.1.ln1.hook_scale"]
        q, k = pieces @ W_Q, pieces @ W_K
        if bias_source:
            q = torch.cat([q, b_Q.expand_as(q[:1])])
            k = torch.cat([k, b_K.expand_as(k[:1])])
        out = torch.einsum("sbqe,tbke->stbqk", q, k) / (W_Q.shape[-1] ** 0.5 if sqrt else 1)
        return out.transpose(0, 1) if swap else out

    return decompose_attention_scores


def test_decompose_hand_written_passes():
    _passes(ch02.decompose_attention_scores, _decompose())


def test_decompose_no_bias_source_rejected():
    _rejected(ch02.decompose_attention_scores, _decompose(bias_source=False), "sources instead of", "b_Q")


def test_decompose_no_sqrt_rejected():
    _rejected(ch02.decompose_attention_scores, _decompose(sqrt=False), "sqrt(d_head)")


def test_decompose_no_scale_rejected():
    _rejected(ch02.decompose_attention_scores, _decompose(scale=False), "scale")


def test_decompose_swapped_axes_rejected():
    _rejected(ch02.decompose_attention_scores, _decompose(swap=True), "swapped")


def test_decompose_uncentred_rejected():
    _rejected(ch02.decompose_attention_scores, _decompose(centre=False), "did not centre")


# 2.12 ablated_repeat_losses ----------------------------------------------------------------------------------

def _ablate(kind="mean", leave_hook=False, means=False, first_layer_only=False):
    def ablated_repeat_losses(model, tokens, half_len, heads_):
        layers = sorted({layer for layer, _ in heads_})[:1 if first_layer_only else None]
        names = [f"blocks.{layer}.attn.hook_z" for layer in layers]
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
        hooks = []
        for layer, name in zip(layers, names):
            chosen = [h for l, h in heads_ if l == layer]
            z = cache[name]
            replacement = {"mean": z.mean((0, 1)), "zero": torch.zeros_like(z[0, 0])}[kind]

            def hook(value, hook, chosen=chosen, replacement=replacement):
                value = value.clone()
                value[:, :, chosen] = replacement[chosen]
                return value

            hooks.append((name, hook))
        if leave_hook:
            for name, hook in hooks:
                model.add_hook(name, hook)
            logits = model(tokens)
        else:
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        losses = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        out = torch.stack([losses[:, 1:half_len].mean(-1), losses[:, half_len + 1:2 * half_len].mean(-1)], -1)
        return (out[:, 0].mean().item(), out[:, 1].mean().item()) if means else out

    return ablated_repeat_losses


def test_ablation_hand_written_passes():
    _passes(ch02.ablated_repeat_losses, _ablate())


def test_ablation_zero_rejected():
    _rejected(ch02.ablated_repeat_losses, _ablate(kind="zero"), "zero ablation")


def test_ablation_hook_left_behind_rejected():
    _rejected(ch02.ablated_repeat_losses, _ablate(leave_hook=True), "left a hook")


def test_ablation_batch_means_rejected():
    _rejected(ch02.ablated_repeat_losses, _ablate(means=True), "one row per sequence")


def test_ablation_one_layer_only_rejected():
    _rejected(ch02.ablated_repeat_losses, _ablate(first_layer_only=True), "only the heads of layer")
