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
    for value in replacements.values():
        _check_replacement(model, value, tokens)
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


# ---------------------------------------------------------------------------------------------------------
# Chapter 03's further references: zero ablation, the KL metric, several heads at once, the read-out of
# the every-head sweep that checks can send (a module-level function), and the self-repair decomposition.
# ---------------------------------------------------------------------------------------------------------


def zero_ablation_hook(head: int):
    """A hook for `blocks.{l}.attn.hook_z` setting head `head`'s output to zero (every prompt, every position)."""

    def hook(z, hook):
        z[:, :, head] = 0.0
        return z

    return hook


def last_token_kl(clean_logits: Tensor, ablated_logits: Tensor) -> Tensor:
    """`[batch]`: KL(clean || ablated) of the next-token distributions at the last position, in nats."""
    clean = clean_logits[:, -1].log_softmax(-1)
    ablated = ablated_logits[:, -1].log_softmax(-1)
    return (clean.exp() * (clean - ablated)).sum(-1)


def last_position_logit_diff(final: Tensor, direction: Tensor) -> Tensor:
    """Read-out for `ablate_every_head`: final residual `[..., batch, pos, d_model]` -> `[..., batch]`, the logit
    difference along `direction` (`[d_model, batch]`, e.g. `logit_diff_direction`) at the last position, through
    the final RMS norm (its weight folded into W_U). Module-level, so `functools.partial(..., direction=d)` can be
    sent to a learner's function."""
    last = final[..., -1, :]
    return torch.einsum("...bd,db->...b", last / rms(last), direction)


def _check_replacement(model, replacement: Tensor, tokens: Tensor) -> None:
    n_layers, n_heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    if not isinstance(replacement, Tensor) or replacement.dim() != 5:
        raise ValueError(f"replacement must be a [n_layers, batch or 1, pos, n_heads, d_head] tensor, got "
                         f"{getattr(replacement, 'shape', type(replacement).__name__)}")
    if (replacement.shape[0] != n_layers or replacement.shape[3:] != (n_heads, d_head)
            or replacement.shape[1] not in (1, tokens.shape[0]) or replacement.shape[2] != tokens.shape[1]):
        raise ValueError(f"replacement has shape {tuple(replacement.shape)}; expected [{n_layers}, 1 or "
                         f"{tokens.shape[0]}, {tokens.shape[1]}, {n_heads}, {d_head}] for tokens of shape "
                         f"{tuple(tokens.shape)}")


def _ablation_hooks(heads, replacement: Tensor):
    """One hook per layer that replaces the listed heads' hook_z by `replacement[layer]`."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))

    def make(layer: int, layer_heads: list[int]):
        def hook(z, hook):
            z[:, :, layer_heads] = replacement[layer][:, :, layer_heads].to(z.dtype)
            return z
        return hook

    return [(z_name(layer), make(layer, layer_heads)) for layer, layer_heads in sorted(by_layer.items())]


def ablate_heads(model, tokens: Tensor, heads, replacement: Tensor) -> Tensor:
    """`[batch, pos, d_vocab]` logits with every head in `heads` (pairs (layer, head)) ablated at once: its hook_z
    replaced by `replacement[layer][..., head, :]` (`[n_layers, batch or 1, pos, n_heads, d_head]`). One forward pass;
    no hook is left on the model."""
    _check_replacement(model, replacement, tokens)
    with torch.no_grad():
        try:
            return model.run_with_hooks(tokens, fwd_hooks=_ablation_hooks(heads, replacement))
        finally:
            model.reset_hooks()


def component_direct_effects(model, tokens: Tensor, direction: Tensor, scale: Tensor | None = None, heads=(),
                             replacement: Tensor | None = None) -> dict[str, Tensor]:
    """Direct logit attribution at the last position along `direction` (`[d_model, batch]`) of every component of
    one run (with `heads` ablated to `replacement` if given), through the final norm with its scale frozen at
    `scale` (`[batch, 1]`; default: this run's own RMS of the final residual). Returns a dict of
      "embed" `[batch]`, "heads" `[n_layers, n_heads, batch]`, "mlps" `[n_layers, batch]`: they sum to
      (final residual / scale) · direction;
      "logit_diff" `[batch]`: the run's real logit difference (its own final RMS); "scale" `[batch, 1]`."""
    n_layers = model.cfg.n_layers
    names = ({z_name(layer) for layer in range(n_layers)} | {f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)}
             | {"blocks.0.hook_resid_pre", final_name(model)})
    hooks = []
    if len(heads):
        if replacement is None:
            raise ValueError("heads to ablate were given without a replacement")
        _check_replacement(model, replacement, tokens)
        hooks = _ablation_hooks(heads, replacement)
    with torch.no_grad():
        try:
            for name, hook in hooks:
                model.add_hook(name, hook)
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
        finally:
            model.reset_hooks()
        final = cache[final_name(model)][:, -1]                                      # [batch, d_model]
        scale = rms(final) if scale is None else scale
        z = torch.stack([cache[z_name(layer)][:, -1] for layer in range(n_layers)])   # [layer, batch, head, d_head]
        head_out = torch.einsum("lbhd,lhdm->lhbm", z, model.W_O)                     # [layer, head, batch, d_model]
        mlp_out = torch.stack([cache[f"blocks.{layer}.hook_mlp_out"][:, -1] for layer in range(n_layers)])
        embed = cache["blocks.0.hook_resid_pre"][:, -1]
        project = lambda vectors: torch.einsum("...bm,mb->...b", vectors / scale, direction)  # noqa: E731
        return {"embed": project(embed), "heads": project(head_out), "mlps": project(mlp_out),
                "logit_diff": torch.einsum("bm,mb->b", final / rms(final), direction), "scale": scale}


def self_repair(model, tokens: Tensor, layer: int, head: int, replacement: Tensor, direction: Tensor
                ) -> dict[str, Tensor]:
    """Split the change in logit difference (ablated - clean, at the last position) when head (layer, head) is
    ablated to `replacement` (`[n_layers, batch or 1, pos, n_heads, d_head]`) into, per prompt (`[batch]` each):
      "direct": the change in the head's own direct effect (frozen clean scale),
      "later_heads": the change in the direct effects of all heads of later layers,
      "mlps": the change in the direct effects of the MLPs of this layer and later ones,
      "norm": the rest, the final norm's rescaling (the ablated run's RMS differs from the clean one);
    "total" = direct + later_heads + mlps + norm, the actual change; "heads" `[n_layers, n_heads, batch]` is every
    head's change in direct effect (zero for heads at or before `layer`, except the ablated head itself)."""
    clean = component_direct_effects(model, tokens, direction)
    ablated = component_direct_effects(model, tokens, direction, scale=clean["scale"], heads=[(layer, head)],
                                       replacement=replacement)
    heads = ablated["heads"] - clean["heads"]
    mlps = ablated["mlps"] - clean["mlps"]
    total = ablated["logit_diff"] - clean["logit_diff"]
    frozen = heads.sum((0, 1)) + mlps.sum(0) + (ablated["embed"] - clean["embed"])
    return {"total": total, "direct": heads[layer, head], "later_heads": heads[layer + 1:].sum((0, 1)),
            "mlps": mlps[layer:].sum(0), "norm": total - frozen, "heads": heads}


def logit_diff_metric(logits: Tensor, io_tokens: Tensor, s_tokens: Tensor) -> Tensor:
    """`[batch]`: logits[i, -1, io_tokens[i]] - logits[i, -1, s_tokens[i]]."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, -1, io_tokens] - logits[rows, -1, s_tokens]
