"""Activation patching, path patching and attribution patching: the course's reference (chapter 04 has the
learner write each piece first; later chapters import these).

Patching asks a causal question: *if this one activation had its value from the other run, how much of the
behaviour moves with it?* Chapter 04 runs IOI prompts ("When Mary and John went to the store, John gave a drink
to") and their **ABC** versions (`IOIDataset.abc`: all three names replaced by three other names, as Wang et al.
2022 did), and measures the logit difference logit(IO) - logit(S), normalised so that the ABC run scores 0 and the
clean run 1 (`normalised_metric`).

- `patch_resid_grid`, `patch_head_grid`: denoising patches (clean into the ABC run), batched: for each layer one
  forward pass from that layer (`utils.ablation.final_resid`, earlier blocks skipped) with one copy of the ABC
  batch per patched position (or head).
- `path_patch`: Wang et al.'s path patching (noising): the clean run with the sender heads' outputs taken from the
  ABC run, every other head frozen at its clean value, and the receivers' inputs (queries, keys or values)
  replaced by what they became; nothing else changes.
- `attribution_patch_heads`: the first-order estimate (clean - ABC) . gradient of every head at once.
- `circuit_logit_diff`: the model with every head outside a circuit replaced (mean ablation, Wang et al. §4).

Readouts map the last block's residual stream `[..., batch, pos, d_model]` to `[..., batch]` (no full unembedding):
`partial(logit_diff_readout, direction=utils.ablation.logit_diff_direction(model, io_tokens, s_tokens))`.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor

from utils.ablation import final_name, final_resid, z_name
from utils.lens import rms


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------


def ioi_logit_diff(logits: Tensor, io_tokens: Tensor, s_tokens: Tensor) -> Tensor:
    """`[batch]`: logit(IO) - logit(S) at the last position. `logits` `[batch, pos, vocab]`; token ids `[batch]`."""
    last = logits[:, -1]
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, io_tokens] - last[rows, s_tokens]


def normalised_metric(value: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
    """(value - corrupted) / (clean - corrupted): 0 = as bad as the corrupted run, 1 = as good as the clean run."""
    return (value - corrupted) / (clean - corrupted)


def logit_diff_readout(final: Tensor, direction: Tensor) -> Tensor:
    """Final residual `[..., batch, pos, d_model]` -> `[..., batch]` logit(IO) - logit(S) at the last position.
    `direction`: `[d_model, batch]`, W_U[:, IO] - W_U[:, S] (utils.ablation.logit_diff_direction)."""
    last = final[..., -1, :]
    return torch.einsum("...bd,db->...b", last / rms(last), direction.to(last.dtype))


def template_means(z: Tensor, groups: Tensor) -> Tensor:
    """`z` `[n_layers, batch, pos, ...]` -> the same shape, prompt b's entry replaced by the mean over the prompts
    of its group `groups[b]` (`[batch]` integer labels, e.g. each prompt's template): Wang et al.'s mean ablation
    takes the mean over the ABC prompts of the same template."""
    out = torch.empty_like(z)
    for group in groups.unique():
        members = groups == group
        out[:, members] = z[:, members].mean(dim=1, keepdim=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# hooks that patch one copy of the batch each
# ---------------------------------------------------------------------------------------------------------


def patch_each_position(act: Tensor, hook, clean_act: Tensor, positions: Tensor) -> Tensor:
    """Hook: `act` is `[n_copies * batch, pos, ...]`, `n_copies` copies of the corrupted batch stacked as blocks.
    `positions` `[n_copies, batch]`: copy i of prompt b gets the clean activation `clean_act[b, positions[i, b]]`
    at position `positions[i, b]` (and only there). `clean_act` is `[batch, pos, ...]`."""
    batch = clean_act.shape[0]
    rows = torch.arange(batch, device=act.device)
    for i in range(positions.shape[0]):
        act[i * batch + rows, positions[i]] = clean_act[rows, positions[i]]
    return act


def patch_each_head(z: Tensor, hook, clean_z: Tensor) -> Tensor:
    """Hook for `hook_z`: `z` is `[n_heads * batch, pos, n_heads, d_head]`, one copy of the corrupted batch per head.
    Copy h gets head h's clean output `clean_z[:, :, h]` (every position); the other heads keep their values."""
    batch, n_heads = clean_z.shape[0], clean_z.shape[2]
    for head in range(n_heads):
        z[head * batch:(head + 1) * batch, :, head] = clean_z[:, :, head]
    return z


def _cache(model, tokens: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    wanted = set(names)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    return {name: cache[name] for name in names}


def stacked_acts(model, tokens: Tensor, name: str) -> Tensor:
    """`[n_layers, batch, pos, ...]`: the activation `name.format(layer=l)` of every layer on a plain run."""
    names = [name.format(layer=layer) for layer in range(model.cfg.n_layers)]
    cache = _cache(model, tokens, names)
    return torch.stack([cache[hook_name] for hook_name in names])


# ---------------------------------------------------------------------------------------------------------
# patching grids (denoising: clean activations into the corrupted run)
# ---------------------------------------------------------------------------------------------------------


def patch_resid_grid(model, clean_tokens: Tensor, corrupted_tokens: Tensor, readout: Callable[[Tensor], Tensor],
                     positions: Tensor, layers: Sequence[int]) -> Tensor:
    """`[len(layers), n_copies, batch]`: `readout` of the corrupted run with the residual stream entering `layer`
    (`hook_resid_pre`) patched from the clean run at position `positions[i, b]` of prompt b (copy i)."""
    batch, n_copies = clean_tokens.shape[0], positions.shape[0]
    names = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    clean, corrupted = _cache(model, clean_tokens, names), _cache(model, corrupted_tokens, names)
    rows = []
    for layer, name in zip(layers, names):
        def hook(act, hook, clean_act=clean[name]):
            return patch_each_position(act, hook, clean_act, positions)

        inputs = corrupted[name].repeat(n_copies, 1, 1)  # the corrupted run entering `layer`, one copy per patch
        final = final_resid(model, inputs, [(name, hook)], start_at_layer=layer)
        rows.append(readout(final.view(n_copies, batch, *final.shape[1:])))
    return torch.stack(rows)


def patch_head_grid(model, clean_tokens: Tensor, corrupted_tokens: Tensor, readout: Callable[[Tensor], Tensor],
                    layers: Sequence[int]) -> Tensor:
    """`[len(layers), n_heads, batch]`: `readout` of the corrupted run with one head's output (`hook_z`, every
    position) patched from the clean run."""
    batch, n_heads = clean_tokens.shape[0], model.cfg.n_heads
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    clean = _cache(model, clean_tokens, [z_name(layer) for layer in layers])
    corrupted = _cache(model, corrupted_tokens, resid_names)
    rows = []
    for layer, resid_name in zip(layers, resid_names):
        def hook(z, hook, clean_z=clean[z_name(layer)]):
            return patch_each_head(z, hook, clean_z)

        inputs = corrupted[resid_name].repeat(n_heads, 1, 1)
        final = final_resid(model, inputs, [(z_name(layer), hook)], start_at_layer=layer)
        rows.append(readout(final.view(n_heads, batch, *final.shape[1:])))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------
# path patching (Wang et al. 2022, noising: sender activations from the ABC run into the clean run)
# ---------------------------------------------------------------------------------------------------------


def path_patch(model, clean_tokens: Tensor, abc_tokens: Tensor, senders: Sequence[tuple[int, int]],
               receivers: Sequence[tuple[int, int]], receiver_input: str,
               readout: Callable[[Tensor], Tensor]) -> Tensor:
    """`[batch]`: `readout` of the clean run when only the path senders -> receivers' `receiver_input` carries the
    ABC run's values.

    1. Cache every head's output (hook_z) on the clean and the ABC run.
    2. Run the clean prompts with the senders' hook_z from the ABC run and every other head frozen at its clean
       hook_z (the MLPs recompute); record the receivers' `blocks.{l}.attn.hook_{receiver_input}` (q: one slice
       per query head; k, v: one per key/value head, so receivers name key/value heads there).
    3. Run the clean prompts with only the receivers' recorded slices patched in; everything else recomputes."""
    return _path_patch(model, clean_tokens, abc_tokens, senders, receivers, receiver_input, readout)


def _path_patch(model, clean_tokens, abc_tokens, senders, receivers, receiver_input, readout, freeze_others=True,
                only_receivers=True):
    """`path_patch`, and (for the checks' diagnoses) the usual mistakes: other heads not frozen, every head of the
    receivers' hook patched."""
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}.")
    n_layers = model.cfg.n_layers
    clean_z = _cache(model, clean_tokens, [z_name(layer) for layer in range(n_layers)])
    abc_z = _cache(model, abc_tokens, [z_name(layer) for layer in range(n_layers)])
    receiver_layers = sorted({layer for layer, _ in receivers})
    last = receiver_layers[-1]
    input_name = lambda layer: f"blocks.{layer}.attn.hook_{receiver_input}"

    def freeze(z, hook, layer):  # step 2: every head clean, the senders from the ABC run
        if freeze_others:
            z[:] = clean_z[z_name(layer)]
        for sender_layer, head in senders:
            if sender_layer == layer:
                z[:, :, head] = abc_z[z_name(layer)][:, :, head]
        return z

    recorded = {}

    def record(x, hook, layer):
        recorded[layer] = x.detach().clone()
        if layer == last:
            raise _Stop

    hooks = [(z_name(layer), lambda z, hook, layer=layer: freeze(z, hook, layer)) for layer in range(last)]
    hooks += [(input_name(layer), lambda x, hook, layer=layer: record(x, hook, layer)) for layer in receiver_layers]
    with torch.no_grad():
        try:
            model.run_with_hooks(clean_tokens, fwd_hooks=hooks)
        except _Stop:
            pass
        finally:
            model.reset_hooks()

    def patch(x, hook, layer):  # step 3: only the receivers' inputs change
        heads = [head for receiver_layer, head in receivers if receiver_layer == layer]
        if not only_receivers:
            heads = list(range(x.shape[2]))
        x[:, :, heads] = recorded[layer][:, :, heads]
        return x

    final = final_resid(model, clean_tokens, [(input_name(layer), lambda x, hook, layer=layer: patch(x, hook, layer))
                                              for layer in receiver_layers])
    return readout(final)


# ---------------------------------------------------------------------------------------------------------
# attribution patching
# ---------------------------------------------------------------------------------------------------------


def attribution_patch_heads(model, clean_tokens: Tensor, corrupted_tokens: Tensor,
                            readout: Callable[[Tensor], Tensor]) -> Tensor:
    """`[n_layers, n_heads]`: the first-order estimate of the change in the mean readout when each head's output
    (hook_z, every position) is patched from the clean run into the corrupted one:
    (clean z - corrupted z) . d(mean readout)/dz on the corrupted run, summed over prompts, positions and d_head."""
    return _attribution(model, clean_tokens, corrupted_tokens, readout)


def _attribution(model, clean_tokens, corrupted_tokens, readout, cut_at_each_head: bool = False):
    """`attribution_patch_heads`; with cut_at_each_head, the mistake of making each hook_z a detached leaf (the
    gradient then misses every path through later heads)."""
    n_layers = model.cfg.n_layers
    names = [z_name(layer) for layer in range(n_layers)]
    clean = _cache(model, clean_tokens, names)
    acts, grabbed = {}, {}

    def keep(z, hook, name):
        if cut_at_each_head:
            z = z.detach()
        leaf = torch.zeros_like(z, requires_grad=True)  # d(metric)/d(leaf) = d(metric)/dz, through every path
        acts[name] = (z.detach().clone(), leaf)
        return z + leaf

    def grab(resid, hook):
        grabbed["final"] = resid
        raise _Stop

    with torch.enable_grad():
        try:
            model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, partial(keep, name=name)) for name in names]
                                 + [(final_name(model), grab)])
        except _Stop:
            pass
        finally:
            model.reset_hooks()
        readout(grabbed["final"]).mean().backward()
    return torch.stack([((clean[name] - acts[name][0]) * acts[name][1].grad).sum(dim=(0, 1, 3)) for name in names])


# ---------------------------------------------------------------------------------------------------------
# circuits
# ---------------------------------------------------------------------------------------------------------


def circuit_logit_diff(model, tokens: Tensor, circuit: Sequence[tuple[int, int]], ablation_z: Tensor,
                       readout: Callable[[Tensor], Tensor]) -> Tensor:
    """`[batch]`: `readout` of the model in which every head *not* in `circuit` has its hook_z replaced by
    `ablation_z` (`[n_layers, batch or 1, pos, n_heads, d_head]`, e.g. template means over the ABC run)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    kept = {(int(layer), int(head)) for layer, head in circuit}
    hooks = []
    for layer in range(n_layers):
        outside = [head for head in range(n_heads) if (layer, head) not in kept]
        if not outside:
            continue

        def hook(z, hook, layer=layer, outside=outside):
            z[:, :, outside] = ablation_z[layer][:, :, outside].expand(z.shape[0], -1, -1, -1)
            return z

        hooks.append((z_name(layer), hook))
    return readout(final_resid(model, tokens, hooks))


# ---------------------------------------------------------------------------------------------------------
# reading heads
# ---------------------------------------------------------------------------------------------------------


def end_attention(pattern: Tensor, key_positions: Tensor) -> Tensor:
    """`[n_heads]`: mean over prompts of the attention from the last position to `key_positions[b]` (one key per
    prompt). `pattern`: one layer's `[batch, n_heads, query_pos, key_pos]`."""
    rows = torch.arange(pattern.shape[0], device=pattern.device)
    return pattern[rows, :, -1, key_positions].mean(0)
