"""Activation patching, path patching and attribution patching (chapter 04 has the learner write the pieces first).

Patching asks a causal question: *if this one activation had its value from the clean run, how much of the clean
behaviour comes back?* We run the **corrupted** prompts (IOI with the second subject replaced by a third name,
`IOIDataset.corrupted`) and copy in one **clean** activation at a time (a layer's residual stream at one position,
one head's output, ...). The metric is the logit difference logit(IO) - logit(S), normalised so that the corrupted
run scores 0 and the clean run scores 1 (`normalised_metric`).

Every grid here is batched: a forward pass starts at the patched layer (`start_at_layer`; the earlier blocks are
not affected) with one copy of the corrupted batch per patched position or head, and stops at the last block's
residual stream (the read-out unembeds only what it needs, see `utils.ablation.ioi_readout`).

    grid = patch_grid(model, corrupted_resid, readout, "blocks.{layer}.hook_attn_out",
                      lambda layer: partial(patch_each_position, clean_act=clean_attn_out[layer], positions=pos),
                      n_copies=len(pos))                            # [n_layers, len(pos), batch] logit diffs
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from utils.ablation import final_name, final_resid, z_name


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def normalised_metric(value: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
    """(value - corrupted) / (clean - corrupted): 0 = as bad as the corrupted run, 1 = as good as the clean run.

    `clean` and `corrupted` are the mean logit differences of the two runs (numbers or 0-d tensors); `value` any
    tensor of logit differences (already averaged over prompts)."""
    return (value - corrupted) / (clean - corrupted)


def patch_each_position(act: Tensor, hook, clean_act: Tensor, positions: Sequence[int]) -> Tensor:
    """Hook: `act` is `[n_copies * batch, pos, ...]`, `n_copies = len(positions)` copies of the corrupted batch.
    Copy i gets the clean activation `clean_act` `[batch, pos, ...]` at position `positions[i]` (and only there)."""
    batch = clean_act.shape[0]
    for i, position in enumerate(positions):
        act[i * batch:(i + 1) * batch, position] = clean_act[:, position]
    return act


def patch_each_head(z: Tensor, hook, clean_z: Tensor) -> Tensor:
    """Hook for `hook_z`: `z` is `[n_heads * batch, pos, n_heads, d_head]`, one copy of the corrupted batch per head.
    Copy h gets head h's clean output `clean_z[:, :, h]` (every position); the other heads keep their values."""
    batch, n_heads = clean_z.shape[0], clean_z.shape[2]
    for head in range(n_heads):
        z[head * batch:(head + 1) * batch, :, head] = clean_z[:, :, head]
    return z


def stacked_acts(model, tokens: Tensor, name: str) -> Tensor:
    """`[n_layers, batch, pos, ...]`: the activation `name.format(layer=l)` of every layer on a plain run."""
    names = [name.format(layer=layer) for layer in range(model.cfg.n_layers)]
    wanted = set(names)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda hook_name: hook_name in wanted)
    return torch.stack([cache[hook_name] for hook_name in names])


def patch_grid(model, corrupted_resid: Tensor, readout: Callable[[Tensor], Tensor], hook_name: str,
               make_hook: Callable[[int], Callable], n_copies: int, layers=None, progress: bool = False,
               desc: str = "patching") -> Tensor:
    """`[n_layers, n_copies, batch]`: `readout` of the final residual for every layer and copy.

    For each layer the forward pass starts at that layer from the corrupted run's `resid_pre`
    (`corrupted_resid`: `[n_layers, batch, pos, d_model]`) repeated `n_copies` times, with the hook
    `make_hook(layer)` on `hook_name.format(layer=layer)` (it patches copy i of the batch)."""
    batch = corrupted_resid.shape[1]
    layers = range(model.cfg.n_layers) if layers is None else layers
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc=desc)
    rows = []
    for layer in layers:
        inputs = corrupted_resid[layer].repeat(n_copies, 1, 1)
        final = final_resid(model, inputs, [(hook_name.format(layer=layer), make_hook(layer))],
                            start_at_layer=layer)
        rows.append(readout(final.view(n_copies, batch, *final.shape[1:])))
    return torch.stack(rows)


def patch_resid_grid(model, corrupted_resid: Tensor, clean_resid: Tensor, positions: Sequence[int],
                     readout: Callable[[Tensor], Tensor], layers=None, progress: bool = False) -> Tensor:
    """`[n_layers, len(positions), batch]`: the residual stream entering each layer patched at one position."""
    return patch_grid(model, corrupted_resid, readout, "blocks.{layer}.hook_resid_pre",
                      lambda layer: _position_hook(clean_resid[layer], positions), len(positions),
                      layers=layers, progress=progress, desc="patching resid_pre")


def _position_hook(clean_act: Tensor, positions: Sequence[int]):
    def hook(act, hook):
        return patch_each_position(act, hook, clean_act, positions)

    return hook


def patch_every_head(model, corrupted_resid: Tensor, clean_z: Tensor, readout: Callable[[Tensor], Tensor],
                     layers=None, progress: bool = False) -> Tensor:
    """`[n_layers, n_heads, batch]`: each head's output (`hook_z`, every position) patched from the clean run."""

    def make_hook(layer):
        def hook(z, hook):
            return patch_each_head(z, hook, clean_z[layer])

        return hook

    return patch_grid(model, corrupted_resid, readout, "blocks.{layer}.attn.hook_z", make_hook,
                      model.cfg.n_heads, layers=layers, progress=progress, desc="patching heads")


def head_output_delta(clean_z: Tensor, corrupted_z: Tensor, W_O: Tensor, head: int) -> Tensor:
    """`[batch, pos, d_model]`: what head `head` writes to the residual stream on the clean run minus what it writes
    on the corrupted run. `clean_z`, `corrupted_z`: one layer's hook_z `[batch, pos, n_heads, d_head]`; `W_O`: that
    layer's `[n_heads, d_head, d_model]`."""
    return (clean_z[:, :, head] - corrupted_z[:, :, head]) @ W_O[head]


def path_patch_to_queries(model, corrupted_resid: Tensor, clean_z: Tensor, corrupted_z: Tensor,
                          senders: Sequence[tuple[int, int]], receivers: Sequence[tuple[int, int]],
                          readout: Callable[[Tensor], Tensor], query_position: int = -1,
                          delta_fn: Callable = head_output_delta) -> Tensor:
    """`[len(senders), batch]`: `readout` when only the path sender -> receivers' queries carries the clean signal.

    For each sender head, the receivers' queries (at `query_position`) are recomputed from the corrupted residual
    stream plus the sender's clean-minus-corrupted output (`delta_fn`), added directly at the receiver's layer (so
    nothing between the sender and the receiver recomputes). Then the corrupted run is repeated with only those
    queries replaced; everything downstream recomputes. One copy of the batch per sender."""
    n_senders, batch = len(senders), corrupted_resid.shape[1]
    deltas = torch.stack([delta_fn(clean_z[layer], corrupted_z[layer], model.W_O[layer], head)
                          for layer, head in senders])  # [n_senders, batch, pos, d_model]
    sender_layers = torch.tensor([layer for layer, _ in senders], device=deltas.device)
    receiver_layers = sorted({layer for layer, _ in receivers})
    new_q = {}
    for layer in receiver_layers:
        mask = (sender_layers < layer).to(deltas.dtype)[:, None, None, None]  # only earlier heads reach the input
        inputs = (corrupted_resid[layer][None] + mask * deltas).flatten(0, 1)
        grabbed = {}

        def grab(q, hook):
            grabbed["q"] = q.detach().clone()
            raise _Stop

        with torch.no_grad():
            try:
                model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{layer}.attn.hook_q", grab)], start_at_layer=layer)
            except _Stop:
                pass
        model.reset_hooks()
        new_q[layer] = grabbed["q"]

    def make_hook(layer):
        heads = [head for receiver_layer, head in receivers if receiver_layer == layer]

        def hook(q, hook):
            q[:, query_position, heads] = new_q[layer][:, query_position, heads]
            return q

        return hook

    inputs = corrupted_resid[receiver_layers[0]].repeat(n_senders, 1, 1)
    hooks = [(f"blocks.{layer}.attn.hook_q", make_hook(layer)) for layer in receiver_layers]
    final = final_resid(model, inputs, hooks, start_at_layer=receiver_layers[0])
    return readout(final.view(n_senders, batch, *final.shape[1:]))


def attribution_scores(clean_z: Tensor, corrupted_z: Tensor, grad_z: Tensor) -> Tensor:
    """`[n_layers, n_heads]`: the first-order estimate of how much patching each head changes the metric:
    (clean - corrupted) . gradient, summed over prompts, positions and d_head. All inputs `[n_layers, batch, pos,
    n_heads, d_head]`; `grad_z` is the gradient of the metric (the mean logit difference over the prompts) on the
    corrupted run, so it already carries the 1 / batch of the mean."""
    return ((clean_z - corrupted_z) * grad_z).sum(dim=(1, 2, 4))


def acts_and_grads(model, tokens: Tensor, metric: Callable[[Tensor], Tensor],
                   name: str = "blocks.{layer}.attn.hook_z") -> tuple[Tensor, Tensor]:
    """(the activation `name.format(layer=l)` of every layer, the metric's gradient with respect to it), both
    `[n_layers, batch, pos, ...]`, from one forward and one backward pass. `metric` maps the final residual
    `[batch, pos, d_model]` to a scalar (e.g. the mean logit difference)."""
    names = [name.format(layer=layer) for layer in range(model.cfg.n_layers)]
    leaves, values, grabbed = {}, {}, {}

    def make_leaf_hook(hook_name):
        def add_leaf(act, hook):
            values[hook_name] = act.detach().clone()
            leaf = torch.zeros_like(act, requires_grad=True)  # d(metric)/d(leaf) = d(metric)/d(act)
            leaves[hook_name] = leaf
            return act + leaf

        return add_leaf

    def grab(resid, hook):
        grabbed["resid"] = resid
        raise _Stop

    with torch.enable_grad():
        try:
            # hook names one by one: a filter function would not see compatibility aliases such as hook_resid_pre
            model.run_with_hooks(tokens, fwd_hooks=[(hook_name, make_leaf_hook(hook_name)) for hook_name in names]
                                 + [(final_name(model), grab)])
        except _Stop:
            pass
        finally:
            model.reset_hooks()
        metric(grabbed["resid"]).backward()
    return (torch.stack([values[hook_name] for hook_name in names]),
            torch.stack([leaves[hook_name].grad for hook_name in names]))


def end_attention(pattern: Tensor, key_positions: Tensor) -> Tensor:
    """`[n_heads]`: mean over prompts of the attention from the last position to `key_positions[b]` (one key per
    prompt). `pattern`: one layer's `[batch, n_heads, query_pos, key_pos]`."""
    rows = torch.arange(pattern.shape[0], device=pattern.device)
    return pattern[rows, :, -1, key_positions].mean(0)
