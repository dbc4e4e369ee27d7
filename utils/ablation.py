"""Head ablation helpers shared by the chapters (chapter 03 has the learner write the pieces first).

An attention head's output is `hook_z[:, :, head] @ W_O[layer, head]` (SmolLM2 has no attention output bias), so
replacing a head's `hook_z` slice replaces everything the head writes. Three replacements:

- zero ablation: `hook_z[:, :, head] = 0`;
- mean ablation: the mean of `hook_z[:, :, head]` over a reference set of prompts, **per position** (the IOI and
  repeated-token prompts are aligned: every prompt has the same length and each role sits at the same position);
- resample ablation: `hook_z[:, :, head]` from a *donor* prompt of the same template (another prompt, other names).

    z = head_z(model, tokens)                                   # [n_layers, batch, pos, n_heads, d_head]
    effect = ablate_every_head(model, tokens, torch.zeros_like(z[:, :1]), readout)  # [n_layers, n_heads, batch, ...]

`ablate_every_head` runs one forward pass per layer with one batch copy of the prompts per head (rows
`h * batch ... (h + 1) * batch` ablate head `h`; several kinds of replacement, given as a dict, share the pass),
starting at that layer's clean residual stream and stopping at the last block's output, so the readout unembeds
only the positions it needs.

Starting at a layer: TransformerLens 4's `start_at_layer` gives the right answer but still runs the earlier blocks
(on the injected residual, then discards them), so a pass from layer 29 costs as much as a full one. `final_resid`
therefore also turns the earlier blocks into pass-throughs for the duration of the call (`_skip_blocks`), which
makes a pass from layer l cost (n_layers - l) blocks.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from utils.lens import rms


class _ReachedEnd(Exception):
    """Raised by a hook on the last block's output to skip the full-vocabulary unembedding."""


def z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def final_name(model) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def head_z(model, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(`[n_layers, batch, pos, n_heads, d_head]` every head's hook_z, `[batch, pos, d_model]` final residual)."""
    names = {z_name(layer) for layer in range(model.cfg.n_layers)} | {final_name(model)}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    z = torch.stack([cache[z_name(layer)] for layer in range(model.cfg.n_layers)])
    return z, cache[final_name(model)]


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def _skip_blocks(model, n_blocks: int):
    """Blocks 0 .. n_blocks - 1 return their input unchanged while the context is open (their wrapped HuggingFace
    layers' `forward` is shadowed on the instance, and the shadow removed on exit, even after an exception)."""
    layers = [block.original_component for block in list(model.blocks)[:n_blocks]]
    patched = []
    try:
        for layer in layers:
            if "forward" in vars(layer):
                raise RuntimeError("a block's forward is already patched; is another _skip_blocks still open?")
            object.__setattr__(layer, "forward", _passthrough)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            vars(layer).pop("forward", None)


def final_resid(model, inputs: Tensor, fwd_hooks=(), start_at_layer: int | None = None) -> Tensor:
    """`[batch, pos, d_model]`: the residual stream after the last block (before the final norm), with hooks.
    With `start_at_layer=l`, `inputs` is the residual stream entering block l and blocks 0 .. l-1 are skipped."""
    grabbed = {}

    def grab(resid, hook):
        grabbed["resid"] = resid.detach().clone()
        raise _ReachedEnd

    with torch.no_grad(), _skip_blocks(model, start_at_layer or 0):
        try:
            model.run_with_hooks(inputs, fwd_hooks=list(fwd_hooks) + [(final_name(model), grab)],
                                 start_at_layer=start_at_layer)
        except _ReachedEnd:
            pass
        finally:
            model.reset_hooks()
    return grabbed["resid"]


def resid_pre(model, tokens: Tensor) -> Tensor:
    """`[n_layers, batch, pos, d_model]`: the residual stream entering each block on a clean run."""
    names = {f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    return torch.stack([cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(model.cfg.n_layers)])


def logit_diff_direction(model, io_tokens: Tensor, s_tokens: Tensor) -> Tensor:
    """`[d_model, batch]`: W_U[:, IO] - W_U[:, S] per prompt (the final norm's weight is folded into W_U)."""
    return model.W_U[:, io_tokens] - model.W_U[:, s_tokens]


def ioi_readout(model, io_tokens: Tensor, s_tokens: Tensor) -> Callable[[Tensor], Tensor]:
    """Readout for `ablate_every_head`: final residual `[..., batch, pos, d_model]` -> `[..., batch]` logit(IO) -
    logit(S) at the last position."""
    direction = logit_diff_direction(model, io_tokens, s_tokens)

    def readout(final: Tensor) -> Tensor:
        last = final[..., -1, :]
        return torch.einsum("...bd,db->...b", last / rms(last), direction)

    return readout


def repeat_loss_readout(model, tokens: Tensor, half_len: int) -> Callable[[Tensor], Tensor]:
    """Readout: final residual `[..., batch, pos, d_model]` -> `[..., batch]` mean next-token loss (nats) on the
    second copy of a repeated batch (positions half_len + 1 .. 2 * half_len - 1 predicting tokens half_len + 2 ..
    2 * half_len), the same positions as `utils.heads.repeat_losses`."""
    targets = tokens[:, half_len + 2:2 * half_len + 1]

    def readout(final: Tensor) -> Tensor:
        resid = final[..., half_len + 1:2 * half_len, :]
        logits = (resid / rms(resid)) @ model.W_U + model.b_U
        index = targets.expand(*logits.shape[:-1])[..., None]
        return (logits.logsumexp(-1) - logits.gather(-1, index)[..., 0]).mean(-1)

    return readout


def ablate_every_head(model, tokens: Tensor, replacement: Tensor | dict[str, Tensor],
                      readout: Callable[[Tensor], Tensor], layers=None, progress: bool = False,
                      desc: str = "ablating heads", resid: Tensor | None = None) -> Tensor | dict[str, Tensor]:
    """`[n_layers, n_heads, batch, ...]`: `readout` of the final residual when head (layer, head) is ablated.

    `replacement` is `[n_layers, batch or 1, pos, n_heads, d_head]`: the value each head's hook_z takes when it is
    ablated (zeros, a per-position mean with batch 1, or donor activations with one row per prompt). A dict of such
    tensors (e.g. {"zero": ..., "mean": ..., "resample": ...}) runs them all in the same passes and returns a dict
    of results. `resid` (`resid_pre(model, tokens)`) may be passed to reuse a clean run.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    batch = tokens.shape[0]
    single = not isinstance(replacement, dict)
    replacements = {"": replacement} if single else dict(replacement)
    n_kinds = len(replacements)
    resid = resid_pre(model, tokens) if resid is None else resid
    layers = range(n_layers) if layers is None else layers
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc=desc)
    rows = {}
    for layer in layers:
        values = [value[layer] for value in replacements.values()]

        def hook(z, hook, values=values):
            for k, value in enumerate(values):
                for head in range(n_heads):
                    start = (k * n_heads + head) * batch
                    z[start:start + batch, :, head] = value[..., head, :]
            return z

        inputs = resid[layer].repeat(n_kinds * n_heads, 1, 1)
        final = final_resid(model, inputs, [(z_name(layer), hook)], start_at_layer=layer)
        rows[layer] = readout(final.view(n_kinds, n_heads, batch, *final.shape[1:]))
    stacked = torch.stack([rows[layer] for layer in sorted(rows)], dim=1)  # [kind, layer, head, batch, ...]
    if single:
        return stacked[0]
    return {kind: stacked[k] for k, kind in enumerate(replacements)}


def mean_ablation_hook(reference_z: Tensor, head: int):
    """A hook for `blocks.{l}.attn.hook_z` replacing head `head` by its mean over the reference prompts, per position.
    `reference_z` is that layer's hook_z on the reference prompts, `[n_ref, pos, n_heads, d_head]`."""
    mean = reference_z[:, :, head].mean(0)

    def hook(z, hook):
        z[:, :, head] = mean
        return z

    return hook


def resample_ablation_hook(donor_z: Tensor, head: int):
    """A hook replacing head `head`'s hook_z in row i by the donor's, `donor_z[i, :, head]` (`donor_z` is that
    layer's hook_z on the donor prompts, one per prompt, `[batch, pos, n_heads, d_head]`)."""

    def hook(z, hook):
        z[:, :, head] = donor_z[:, :, head]
        return z

    return hook


def head_direct_effect(model, z: Tensor, final: Tensor, layer: int, head: int, io_tokens: Tensor,
                       s_tokens: Tensor) -> Tensor:
    """`[batch]`: head (layer, head)'s direct contribution to logit(IO) - logit(S) at the last position, through the
    final norm with its scale frozen at the run's own final residual `final` `[batch, pos, d_model]`.
    `z` is that layer's hook_z `[batch, pos, n_heads, d_head]`."""
    out = z[:, -1, head] @ model.W_O[layer, head]  # [batch, d_model]
    direction = logit_diff_direction(model, io_tokens, s_tokens)  # [d_model, batch]
    return ((out / rms(final[:, -1])) * direction.T).sum(-1)


def all_direct_effects(model, z: Tensor, final: Tensor, io_tokens: Tensor, s_tokens: Tensor) -> Tensor:
    """`[n_layers, n_heads, batch]`: `head_direct_effect` for every head at once (z: `[n_layers, batch, pos, n_heads,
    d_head]`)."""
    out = torch.einsum("lbhd,lhdm->lhbm", z[:, :, -1], model.W_O)
    direction = logit_diff_direction(model, io_tokens, s_tokens)
    return torch.einsum("lhbm,mb->lhb", out / rms(final[:, -1]), direction)
