"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME), batched for a CPU.

Three runs of the same prompt:

- **clean**: the prompt as it is; the model gives the answer with probability `p_clean`;
- **corrupted**: Gaussian noise added to the token embeddings of the *subject* tokens only (`hook_embed`), so the
  model no longer knows which subject it is reading; `p_corrupted` is (much) lower;
- **restored**: the corrupted run, except that one activation at one position is overwritten with its clean value.
  If that single state brings the answer back, it carries the fact.

The **indirect effect** of a state is `p_restored - p_corrupted`; `normalised_effect` divides it by
`p_clean - p_corrupted` (1 = restoring this state alone recovers all that the noise destroyed).

Three kinds of state, as in ROME:

- `"resid"`: the hidden state (residual stream) after block `l` (`blocks.{l}.hook_resid_post`);
- `"mlp"` / `"attn"`: the outputs of the MLPs / attention layers of a *window* of `window` consecutive blocks
  centred on `l` (`window_layers`), so that one layer's absence can be made up by its neighbours.

    tokens = model.to_tokens(prompt)
    positions = subject_positions(model, prompt, subject)
    noise = subject_noise(n_samples, len(positions), model.cfg.d_model, std=noise_std(model), seed=0)
    result = trace(model, tokens, positions, noise, answer_token, kind="mlp", window=6)
    result.restored   # [n_layers, n_restored_positions] mean p(answer) over the noise samples

`trace` restores every (layer, position) pair, one batch row per (position, noise sample), and starts each
forward pass at the first block it changes (the blocks before it see exactly the corrupted run, which is cached),
so a 30-layer grid costs about half of 30 full passes per kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

KINDS = ("resid", "mlp", "attn")
NOISE_MULTIPLIER = 3.0  # ROME: noise with 3 x the standard deviation of the embeddings


class _ReachedEnd(Exception):
    """Raised by a hook on the last block's output to skip the full-vocabulary unembedding of every position."""


def subject_positions(model, prompt: str, subject: str) -> list[int]:
    """Token positions (BOS = position 0) of every token that overlaps the subject's characters in `prompt`."""
    start = prompt.index(subject)
    end = start + len(subject)
    pieces = model.to_str_tokens(prompt)[1:]  # without BOS
    if "".join(pieces) != prompt:
        raise ValueError(f"the tokens of {prompt!r} do not spell it out exactly: {pieces}")
    positions, offset = [], 0
    for index, piece in enumerate(pieces):
        if offset < end and offset + len(piece) > start:
            positions.append(index + 1)
        offset += len(piece)
    return positions


def noise_std(model, multiplier: float = NOISE_MULTIPLIER) -> float:
    """`multiplier` x the standard deviation of all entries of the token embedding matrix W_E."""
    return multiplier * float(model.W_E.float().std())


def subject_noise(n_samples: int, n_positions: int, d_model: int, std: float, seed: int = 0) -> Tensor:
    """`[n_samples, n_positions, d_model]` Gaussian noise with standard deviation `std`, from its own generator."""
    generator = torch.Generator().manual_seed(seed)
    return std * torch.randn(n_samples, n_positions, d_model, generator=generator)


def add_subject_noise(embed: Tensor, positions: Sequence[int], noise: Tensor) -> Tensor:
    """`[n_samples, pos, d_model]`: the clean embedding `[1 or n_samples, pos, d_model]` repeated once per noise
    sample, with `noise[s, i]` added at `positions[i]` and every other position untouched."""
    n_samples = noise.shape[0]
    noisy = embed.expand(n_samples, -1, -1).clone()
    noisy[:, list(positions)] += noise.to(noisy.device, noisy.dtype)
    return noisy


def window_layers(center: int, window: int, n_layers: int) -> list[int]:
    """The `window` consecutive layers centred on `center` (ROME: `center - window // 2` up to, not including,
    `center + window - window // 2`), clipped to `0 .. n_layers - 1`."""
    low = max(0, center - window // 2)
    high = min(n_layers, center + window - window // 2)
    return list(range(low, high))


def hook_name(kind: str, layer: int) -> str:
    if kind == "resid":
        return f"blocks.{layer}.hook_resid_post"
    if kind == "mlp":
        return f"blocks.{layer}.hook_mlp_out"
    if kind == "attn":
        return f"blocks.{layer}.hook_attn_out"
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def answer_probs(model, final_resid: Tensor, answer_token: int) -> Tensor:
    """p(answer) at the last position from the residual stream after the last block, `[..., pos, d_model]`."""
    last = final_resid[..., -1, :].float()
    eps = float(getattr(model.cfg, "eps", 1e-5))
    logits = (last / (last.pow(2).mean(-1, keepdim=True) + eps).sqrt()) @ model.W_U + model.b_U
    return logits.softmax(-1)[..., answer_token]


def _final_resid(model, inputs: Tensor, fwd_hooks=(), start_at_layer: int | None = None) -> Tensor:
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    grabbed = {}

    def grab(resid, hook):
        grabbed["resid"] = resid.detach().clone()
        raise _ReachedEnd

    try:
        with torch.no_grad():
            model.run_with_hooks(inputs, fwd_hooks=list(fwd_hooks) + [(name, grab)], start_at_layer=start_at_layer)
    except _ReachedEnd:
        pass
    finally:
        model.reset_hooks()
    return grabbed["resid"]


def _replace_embed(noisy: Tensor):
    def hook(embed, hook):
        return noisy.to(embed.device, embed.dtype)

    return hook


@dataclass
class Runs:
    """The clean and corrupted runs of one prompt (what `trace` needs)."""

    p_clean: float
    p_corrupted: Tensor  # [n_samples]
    clean: dict  # hook name -> [pos, d_model] clean activation
    corrupted_pre: Tensor  # [n_layers + 1, n_samples, pos, d_model]: resid_pre of every block, then the final resid


@torch.no_grad()
def clean_and_corrupted(model, tokens: Tensor, positions: Sequence[int], noise: Tensor, answer_token: int) -> Runs:
    """One clean run (caching every resid_post, mlp_out and attn_out) and one corrupted run per noise sample."""
    n_layers = model.cfg.n_layers
    names = {hook_name(kind, layer) for kind in KINDS for layer in range(n_layers)} | {"hook_embed"}
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    clean = {name: cache[name][0] for name in names}
    p_clean = float(answer_probs(model, cache[hook_name("resid", n_layers - 1)], answer_token)[0])
    noisy = add_subject_noise(cache["hook_embed"], positions, noise)
    pre_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [hook_name("resid", n_layers - 1)]
    model.reset_hooks()
    with model.hooks(fwd_hooks=[("hook_embed", _replace_embed(noisy))]):
        _, corrupted_cache = model.run_with_cache(tokens.expand(noise.shape[0], -1),
                                                  names_filter=lambda name: name in pre_names)
    model.reset_hooks()
    corrupted_pre = torch.stack([corrupted_cache[name] for name in pre_names])
    p_corrupted = answer_probs(model, corrupted_pre[-1], answer_token)
    return Runs(p_clean, p_corrupted, clean, corrupted_pre)


@dataclass
class Trace:
    kind: str
    window: int
    positions: list[int]  # the restored positions (columns of `restored`)
    restored: Tensor  # [n_layers, n_positions]: p(answer) with that state restored, mean over noise samples
    p_clean: float
    p_corrupted: float  # mean over noise samples

    @property
    def effect(self) -> Tensor:
        """Indirect effect `p_restored - p_corrupted`, `[n_layers, n_positions]`."""
        return self.restored - self.p_corrupted

    @property
    def normalised(self) -> Tensor:
        return normalised_effect(self.restored, self.p_corrupted, self.p_clean)


def normalised_effect(restored, corrupted, clean):
    """`(restored - corrupted) / (clean - corrupted)`: the share of the damage that a restoration undoes."""
    return (restored - corrupted) / (clean - corrupted)


@torch.no_grad()
def trace(model, tokens: Tensor, positions: Sequence[int], noise: Tensor, answer_token: int, kind: str = "resid",
          window: int = 1, restore_positions: Sequence[int] | None = None, runs: Runs | None = None,
          layers: Sequence[int] | None = None) -> Trace:
    """Restore each (layer, position) pair in turn; return p(answer) averaged over the noise samples.

    `positions`: the subject's positions (where the noise goes). `restore_positions`: the columns of the result
    (default: every position from the first subject token to the end; earlier positions cannot change, since the
    noise comes later and attention is causal). `kind="resid"` restores one hidden state (`window` is ignored);
    `"mlp"`/`"attn"` restore that sublayer's output at the position in every layer of `window_layers(layer,
    window, n_layers)`. `runs` (from `clean_and_corrupted`) can be passed to share the clean/corrupted runs.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n_layers = model.cfg.n_layers
    n_samples, n_pos = noise.shape[0], tokens.shape[-1]
    runs = runs or clean_and_corrupted(model, tokens, positions, noise, answer_token)
    if restore_positions is None:
        restore_positions = list(range(min(positions), n_pos))
    restore_positions = list(restore_positions)
    n_restore = len(restore_positions)
    rows = torch.arange(n_restore * n_samples)
    row_positions = torch.tensor(restore_positions).repeat_interleave(n_samples)  # rows are [position, sample]
    layers = range(n_layers) if layers is None else layers
    result = torch.full((n_layers, n_restore), float("nan"))
    for layer in layers:
        if kind == "resid":
            clean_state = runs.clean[hook_name("resid", layer)]
            start = layer + 1
            resid = runs.corrupted_pre[start].repeat(n_restore, 1, 1)  # after block `layer`
            resid[rows, row_positions] = clean_state[row_positions]
            final = resid if start == n_layers else _final_resid(model, resid, start_at_layer=start)
        else:
            restored_layers = window_layers(layer, window, n_layers)
            start = restored_layers[0]
            hooks = []
            for restored_layer in restored_layers:
                clean_state = runs.clean[hook_name(kind, restored_layer)]

                def hook(activation, hook, clean_state=clean_state):
                    activation[rows, row_positions] = clean_state[row_positions].to(activation.dtype)
                    return activation

                hooks.append((hook_name(kind, restored_layer), hook))
            resid = runs.corrupted_pre[start].repeat(n_restore, 1, 1)
            final = _final_resid(model, resid, hooks, start_at_layer=start)
        probs = answer_probs(model, final, answer_token).view(n_restore, n_samples)
        result[layer] = probs.mean(-1).cpu()
    return Trace(kind, window if kind != "resid" else 1, restore_positions, result, runs.p_clean,
                 float(runs.p_corrupted.mean()))


@torch.no_grad()
def restore_and_prob(model, tokens: Tensor, noisy_embed: Tensor, clean_acts: dict, position: int,
                     answer_token: int) -> Tensor:
    """The plain (unbatched over positions) version: `[n_samples]` p(answer) at the last position, running
    `tokens` with `hook_embed` replaced by `noisy_embed` `[n_samples, pos, d_model]` and every hook named in
    `clean_acts` (name -> clean activation `[1, pos, d_model]` or `[pos, d_model]`) overwritten at `position`."""
    n_samples = noisy_embed.shape[0]

    def restore(clean):
        def hook(activation, hook):
            activation[:, position] = clean.reshape(-1, *clean.shape[-2:])[0, position].to(activation.dtype)
            return activation

        return hook

    hooks = [("hook_embed", _replace_embed(noisy_embed))] + [(name, restore(clean)) for name, clean in
                                                            clean_acts.items()]
    model.reset_hooks()
    try:
        logits = model.run_with_hooks(tokens.expand(n_samples, -1), fwd_hooks=hooks)
    finally:
        model.reset_hooks()
    return logits[:, -1].float().softmax(-1)[:, answer_token]


TOKEN_GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
                "further tokens", "last token")


def token_groups(positions: Sequence[int], n_pos: int) -> dict[str, list[int]]:
    """ROME's six token groups (their Figure 2), as lists of positions; a group may be empty, and the last token
    counts only as "last token". A one-token subject is its own last subject token (the first-subject group is then
    empty); for "The capital of France is" the first subsequent token is the last token, so that group is empty."""
    first, last = min(positions), max(positions)
    end = n_pos - 1
    groups = {
        "first subject token": [first] if first != last else [],
        "middle subject tokens": list(range(first + 1, last)),
        "last subject token": [last] if last != end else [],
        "first subsequent token": [last + 1] if last + 1 < end else [],
        "further tokens": list(range(last + 2, end)),
        "last token": [end],
    }
    return groups


# ---------------------------------------------------------------------------------------------------------
# The chapter-05 exercises' references (one function per exercise, the signatures the learner writes).
# ---------------------------------------------------------------------------------------------------------


def noise_level(model, facts: Sequence[tuple[str, str]], multiplier: float = NOISE_MULTIPLIER) -> float:
    """ROME's noise level: `multiplier` x the standard deviation of every entry of the token embeddings of the
    subjects' tokens, pooled over `facts` (a list of `(prompt, subject)` pairs)."""
    if not facts:
        raise ValueError("noise_level needs at least one (prompt, subject) pair")
    rows = []
    for prompt, subject in facts:
        tokens = model.to_tokens(prompt)[0]
        rows.append(model.W_E[tokens[subject_positions(model, prompt, subject)]])
    return multiplier * float(torch.cat(rows).float().std())


def corrupt_embeddings(embed: Tensor, positions: Sequence[int], std: float, n_samples: int, seed: int) -> Tensor:
    """`[n_samples, pos, d_model]`: `embed` `[1, pos, d_model]` once per sample, seeded noise on `positions` only."""
    return add_subject_noise(embed, positions, subject_noise(n_samples, len(positions), embed.shape[-1], std, seed))


def _last_position_only(n_layers: int):
    """A hook on the last block's output that keeps only the last position: the unembedding then costs 1 / pos."""
    return (f"blocks.{n_layers - 1}.hook_resid_post", lambda resid, hook: resid[:, -1:])


@torch.no_grad()
def corrupted_prob(model, tokens: Tensor, noisy_embed: Tensor, answer_token: int) -> Tensor:
    """`[n_samples]` p(answer) at the last position when `hook_embed` outputs `noisy_embed` (the corrupted run)."""
    return restore_and_prob(model, tokens, noisy_embed, {}, 0, answer_token)


@torch.no_grad()
def trace_grid(model, tokens: Tensor, noisy_embed: Tensor, clean_acts: dict, answer_token: int, kind: str,
               window: int, positions: Sequence[int], layers: Sequence[int]) -> Tensor:
    """`[len(layers), len(positions)]`: p(answer), averaged over the noise samples (rows of `noisy_embed`), when the
    state `kind` ("resid": `blocks.{l}.hook_resid_post`; "mlp"/"attn": the sublayer outputs of every layer of
    `window_layers(l, window, n_layers)`) is restored to its clean value (`clean_acts[name]`, `[1, pos, d_model]`)
    at one position, for every (layer, position) pair. One forward pass per layer, one row per (position, sample),
    started at the first restored block from the cached corrupted residual stream."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n_layers, n_samples, n_restore = model.cfg.n_layers, noisy_embed.shape[0], len(positions)
    model.reset_hooks()
    _, corrupted = model.run_with_cache(noisy_embed, start_at_layer=0,
                                        names_filter=lambda name: name.endswith("hook_resid_pre"))
    rows = torch.arange(n_restore * n_samples)
    row_positions = torch.tensor(list(positions)).repeat_interleave(n_samples)  # rows: [position, sample]
    result = torch.zeros(len(layers), n_restore)
    for index, layer in enumerate(layers):
        restored = [layer] if kind == "resid" else window_layers(layer, window, n_layers)
        hooks = [_last_position_only(n_layers)]
        for restored_layer in restored:
            clean = clean_acts[hook_name(kind, restored_layer)]

            def restore(activation, hook, clean=clean):
                activation[rows, row_positions] = clean.reshape(-1, *clean.shape[-2:])[0, row_positions].to(
                    activation.dtype)
                return activation

            hooks.insert(0, (hook_name(kind, restored_layer), restore))
        start = restored[0]
        resid = corrupted[f"blocks.{start}.hook_resid_pre"].repeat(n_restore, 1, 1)
        logits = model.run_with_hooks(resid, start_at_layer=start, fwd_hooks=hooks)
        probs = logits[:, -1].float().softmax(-1)[:, answer_token]
        result[index] = probs.view(n_restore, n_samples).mean(-1).cpu()
    model.reset_hooks()
    return result


def clean_cache(model, tokens: Tensor) -> dict:
    """The clean run's `hook_embed` and every resid_post / mlp_out / attn_out, as a dict of `[1, pos, d_model]`."""
    names = {hook_name(kind, layer) for kind in KINDS for layer in range(model.cfg.n_layers)} | {"hook_embed"}
    model.reset_hooks()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    return {name: cache[name] for name in names}


@torch.no_grad()
def trace_facts(model, facts: Sequence[dict], noise_std: float, n_samples: int, kind: str, window: int,
                layers: Sequence[int], trace_fn=None):
    """Trace every fact at its last subject token and its last token.

    facts: dicts with "prompt", "positions" (the subject's token positions) and "answer_token"; fact `i` gets the
    noise of `corrupt_embeddings(..., n_samples, seed=i)`. Returns `(restored [n_facts, len(layers), 2],
    p_clean [n_facts], p_corrupted [n_facts])`, the probabilities averaged over the noise samples of each fact.
    trace_fn: a function with `trace_grid`'s signature (default: the course's)."""
    trace_fn = trace_fn or trace_grid
    restored, p_clean, p_corrupted = [], [], []
    for index, fact in enumerate(facts):
        tokens = model.to_tokens(fact["prompt"])
        cache = clean_cache(model, tokens)
        noisy = corrupt_embeddings(cache["hook_embed"], fact["positions"], noise_std, n_samples, index)
        key_positions = [max(fact["positions"]), tokens.shape[1] - 1]
        restored.append(trace_fn(model, tokens, noisy, cache, fact["answer_token"], kind, window, key_positions,
                                 list(layers)))
        p_clean.append(float(model(tokens)[0, -1].float().softmax(-1)[fact["answer_token"]]))
        p_corrupted.append(float(corrupted_prob(model, tokens, noisy, fact["answer_token"]).mean()))
    return torch.stack(restored), torch.tensor(p_clean), torch.tensor(p_corrupted)


@torch.no_grad()
def severed_trace(model, tokens: Tensor, noisy_embed: Tensor, clean_acts: dict, answer_token: int, position: int,
                  sever: str | None, layers: Sequence[int]) -> Tensor:
    """ROME's Figure 3: `[len(layers)]` p(answer), averaged over the noise samples, when the hidden state after
    block `l` (`blocks.{l}.hook_resid_post`) is restored at `position` while the `sever` sublayer ("mlp" or
    "attn"; None: nothing severed) is frozen, at `position` and in every layer, at its value in the corrupted
    run, so that the restored state can no longer act through it. One forward pass, one row per (layer, sample)."""
    if sever not in (None, "mlp", "attn"):
        raise ValueError(f"sever must be None, 'mlp' or 'attn', got {sever!r}")
    n_layers, n_samples, n_rows = model.cfg.n_layers, noisy_embed.shape[0], len(layers)
    hooks = [_last_position_only(n_layers)]
    if sever is not None:
        names = {hook_name(sever, layer) for layer in range(n_layers)}
        model.reset_hooks()
        _, corrupted = model.run_with_cache(noisy_embed, start_at_layer=0, names_filter=lambda name: name in names)
        for name in names:
            def freeze(activation, hook, frozen=corrupted[name][:, position]):
                activation[:, position] = frozen.repeat(n_rows, 1).to(activation.dtype)
                return activation

            hooks.insert(0, (name, freeze))
    for index, layer in enumerate(layers):
        clean = clean_acts[hook_name("resid", layer)]

        def restore(activation, hook, rows=slice(index * n_samples, (index + 1) * n_samples), clean=clean):
            activation[rows, position] = clean.reshape(-1, *clean.shape[-2:])[0, position].to(activation.dtype)
            return activation

        hooks.insert(0, (hook_name("resid", layer), restore))
    model.reset_hooks()
    logits = model.run_with_hooks(noisy_embed.repeat(n_rows, 1, 1), start_at_layer=0, fwd_hooks=hooks)
    model.reset_hooks()
    probs = logits[:, -1].float().softmax(-1)[:, answer_token]
    return probs.view(n_rows, n_samples).mean(-1).cpu()
