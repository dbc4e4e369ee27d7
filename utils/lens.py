"""Lenses: read an intermediate residual stream as a next-token prediction.

Chapter 01 builds these by hand; later chapters import them from here.

    logit lens     logits_l = unembed(ln_final(h_l))                   (nostalgebraist, 2020)
    tuned lens     logits_l = unembed(ln_final(h_l @ W_l + b_l))       (Belrose et al., 2023)
    linearised     logits_l = unembed(h_l / rms(h_final))              (the final norm's scale frozen)

`h_l` is the residual stream after l blocks: h_0 is the embedding output, h_l (l >= 1) is `blocks.{l-1}.hook_resid_post`,
so a model with n_layers blocks has n_layers + 1 lens rows and the last one is the model's own output.
With `load_model()` (compatibility mode) the final RMSNorm's weight is folded into W_U, so `model.ln_final`
only divides by the root mean square.
"""

from __future__ import annotations

import torch
from torch import Tensor


def resid_filter(name: str) -> bool:
    """`names_filter` keeping the residual stream (resid_pre / resid_mid / resid_post of every block) and the
    final norm's scale: everything a lens needs and little else (about 3 x n_layers tensors)."""
    return "hook_resid_" in name or name == "ln_final.hook_scale"


def resid_stack(cache, n_layers: int) -> Tensor:
    """`[n_layers + 1, *batch_pos, d_model]`: the embedding output, then every block's resid_post."""
    rows = [cache["blocks.0.hook_resid_pre"]] + [cache[f"blocks.{layer}.hook_resid_post"] for layer in range(n_layers)]
    return torch.stack(rows, dim=0)


def rms(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Root mean square over the last axis, kept as a size-1 axis: what RMSNorm divides by."""
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def unembed(model, normalised: Tensor) -> Tensor:
    """Logits from an already-normalised residual (any leading shape)."""
    return normalised @ model.W_U + model.b_U


def logit_lens(model, cache) -> Tensor:
    """The logit lens: `[n_layers + 1, batch, pos, d_vocab]` logits, the final norm applied to every row."""
    return model.unembed(model.ln_final(resid_stack(cache, model.cfg.n_layers)))


def linearised_logit_lens(model, cache) -> Tensor:
    """The logit lens with the final norm's scale frozen at its value on the *final* residual stream."""
    n_layers = model.cfg.n_layers
    stack = resid_stack(cache, n_layers)
    final_scale = rms(cache[f"blocks.{n_layers - 1}.hook_resid_post"], _norm_eps(model))
    return unembed(model, stack / final_scale)


def _norm_eps(model) -> float:
    return float(getattr(model.cfg, "eps", 1e-5))


def kl_from_final(final_logits: Tensor, lens_logits: Tensor) -> Tensor:
    """KL(final || lens) in nats, summed over the last (vocabulary) axis; leading axes broadcast.

    The direction of Belrose et al. (2023): the expectation is under the model's own output distribution, so
    the lens pays for every token the model finds likely and the lens does not.
    """
    log_p = final_logits.float().log_softmax(-1)
    log_q = lens_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def next_token_ranks(logits: Tensor, tokens: Tensor) -> Tensor:
    """`[..., pos - 1]` rank (1 = top prediction) of the true next token, from `[..., pos, d_vocab]` logits and
    `[pos]` token ids. Ties count in the token's favour (rank = 1 + number of strictly larger logits)."""
    logits = logits[..., :-1, :]
    target = tokens[1:].to(logits.device)
    index = target.view(*([1] * (logits.ndim - 2)), -1, 1).expand(*logits.shape[:-1], 1)
    target_logit = logits.gather(-1, index)
    return (logits > target_logit).sum(-1) + 1


# ---------------------------------------------------------------------------------------------------------
# Collecting residual streams from a corpus
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_resid(model, tokens: Tensor, batch_size: int = 8, skip_bos: bool = True, progress: bool = True) -> Tensor:
    """`[n_layers + 1, n_tokens, d_model]` residual streams for every position of `tokens` `[n_seq, seq_len]`
    (flattened in row order), without the BOS position by default (its residual is an outlier: an attention
    sink with a huge norm)."""
    from tqdm.auto import tqdm

    n_layers = model.cfg.n_layers
    wanted = {"blocks.0.hook_resid_pre"} | {f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)}
    chunks = []
    starts = range(0, tokens.shape[0], batch_size)
    for start in tqdm(starts, desc="residual streams", disable=not progress):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in wanted)
        stack = resid_stack(cache, n_layers)
        if skip_bos:
            stack = stack[:, :, 1:]
        chunks.append(stack.flatten(1, 2).cpu())
        del cache
    return torch.cat(chunks, dim=1)


# ---------------------------------------------------------------------------------------------------------
# The tuned lens: one affine translator per layer, trained to match the final distribution
# ---------------------------------------------------------------------------------------------------------


def fit_translator(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Closed-form affine map `y ~ x @ weight + bias` pulled towards the identity.

    Minimises  sum_n |x_n @ W + b - y_n|^2 + ridge * |W - I|_F^2  (the bias is not penalised).
    x, y: `[n, d]`. Returns weight `[d, d]` and bias `[d]` (float32).
    """
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(xc.T @ xc + ridge * eye, xc.T @ yc + ridge * eye)
    bias = y_mean - x_mean @ weight
    return weight.float(), bias.float()


class TunedLens(torch.nn.Module):
    """One affine translator per layer l = 0 .. n_layers - 1 (the last row, the model's output, needs none).

    `translate(h, l)` = h @ weight[l] + bias[l]; `logits(model, h, l)` = unembed(ln_final(translate(h, l))).
    Starts as the identity (= the logit lens).
    """

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.n_layers = n_layers
        self.weight = torch.nn.Parameter(torch.eye(d_model).repeat(n_layers, 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model))

    def translate(self, h: Tensor, layer: int) -> Tensor:
        if layer == self.n_layers:
            return h
        return h @ self.weight[layer] + self.bias[layer]

    def logits(self, model, h: Tensor, layer: int) -> Tensor:
        translated = self.translate(h, layer)
        return unembed(model, translated / rms(translated, _norm_eps(model)))


def fit_tuned_lens(model, resid: Tensor, ridge: float, fit=fit_translator, progress: bool = True) -> TunedLens:
    """A TunedLens whose translators are fitted in closed form (`fit`) to predict the final residual stream
    `resid[-1]` from each `resid[l]`. resid: `[n_layers + 1, n_tokens, d_model]` (from `collect_resid`)."""
    from tqdm.auto import tqdm

    n_layers = resid.shape[0] - 1
    lens = TunedLens(n_layers, resid.shape[-1])
    target = resid[-1]
    with torch.no_grad():
        for layer in tqdm(range(n_layers), desc="fitting translators", disable=not progress):
            weight, bias = fit(resid[layer], target, ridge)
            lens.weight[layer] = weight
            lens.bias[layer] = bias
    return lens


def kl_finetune(model, lens: TunedLens, resid: Tensor, layers, steps: int, lr: float = 1e-3,
                progress: bool = True) -> None:
    """A few full-batch Adam steps on KL(final || tuned lens) for the given layers (in place)."""
    from tqdm.auto import tqdm

    final_log_p = unembed(model, resid[-1] / rms(resid[-1], _norm_eps(model))).log_softmax(-1)
    p = final_log_p.exp()
    for layer in tqdm(list(layers), desc="KL fine-tuning", disable=not progress):
        weight = lens.weight[layer].detach().clone().requires_grad_(True)
        bias = lens.bias[layer].detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(steps):
            translated = resid[layer] @ weight + bias
            log_q = unembed(model, translated / rms(translated, _norm_eps(model))).log_softmax(-1)
            loss = (p * (final_log_p - log_q)).sum(-1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            lens.weight[layer] = weight
            lens.bias[layer] = bias


@torch.no_grad()
def mean_kl_per_layer(model, resid: Tensor, lens_logits, kl=kl_from_final, chunk: int = 256,
                      progress: bool = True, desc: str = "KL per layer") -> Tensor:
    """`[n_layers + 1]` mean over tokens of kl(final, lens_logits(h, layer)).

    resid: `[n_layers + 1, n_tokens, d_model]`; lens_logits(h `[n, d_model]`, layer) -> `[n, d_vocab]`.
    Works in chunks of tokens so that only `[chunk, d_vocab]` logits exist at a time.
    """
    from tqdm.auto import tqdm

    n_rows, n_tokens = resid.shape[0], resid.shape[1]
    final = resid[-1]
    totals = torch.zeros(n_rows, dtype=torch.float64)
    for start in tqdm(range(0, n_tokens, chunk), desc=desc, disable=not progress):
        final_logits = unembed(model, final[start:start + chunk] / rms(final[start:start + chunk], _norm_eps(model)))
        for layer in range(n_rows):
            values = kl(final_logits, lens_logits(resid[layer, start:start + chunk], layer))
            totals[layer] += values.double().sum()
    return (totals / n_tokens).float()


# ---------------------------------------------------------------------------------------------------------
# Chapter 01's longer exercises: their references (same signatures as the learner's functions)
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_logit_lens_kl(model, resid: Tensor, chunk: int = 256) -> Tensor:
    """`[n_rows]` mean over tokens of KL(final || logit lens) for every row of `resid` `[n_rows, n_tokens, d_model]`
    (the last row is the final residual stream). Each row is normalised by its own final-norm scale, then
    unembedded; tokens are taken `chunk` at a time so that only `[chunk, d_vocab]` logits exist at once."""
    if resid.ndim != 3:
        raise ValueError(f"resid must be [n_rows, n_tokens, d_model], got shape {tuple(resid.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    n_rows, n_tokens = resid.shape[0], resid.shape[1]
    eps = _norm_eps(model)
    totals = torch.zeros(n_rows, dtype=torch.float64)
    for start in range(0, n_tokens, chunk):
        block = resid[:, start:start + chunk]
        final_logits = unembed(model, block[-1] / rms(block[-1], eps))
        for layer in range(n_rows):
            lens_logits = unembed(model, block[layer] / rms(block[layer], eps))
            totals[layer] += kl_from_final(final_logits, lens_logits).double().sum()
    return (totals / n_tokens).float()


@torch.no_grad()
def linearisation_error(model, resid: Tensor, chunk: int = 256) -> Tensor:
    """`[n_rows]` mean over tokens of KL(exact logit lens || frozen-scale lens): for every row h_l of `resid`
    `[n_rows, n_tokens, d_model]`, unembed(h_l / rms(h_l)) against unembed(h_l / rms(h_final)), where h_final is
    the last row. 0 where freezing the final norm's scale changes nothing."""
    if resid.ndim != 3:
        raise ValueError(f"resid must be [n_rows, n_tokens, d_model], got shape {tuple(resid.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    n_rows, n_tokens = resid.shape[0], resid.shape[1]
    eps = _norm_eps(model)
    totals = torch.zeros(n_rows, dtype=torch.float64)
    for start in range(0, n_tokens, chunk):
        block = resid[:, start:start + chunk]
        final_scale = rms(block[-1], eps)
        for layer in range(n_rows):
            exact = unembed(model, block[layer] / rms(block[layer], eps))
            frozen = unembed(model, block[layer] / final_scale)
            totals[layer] += kl_from_final(exact, frozen).double().sum()
    return (totals / n_tokens).float()


def train_translator_kl(model, h: Tensor, h_final: Tensor, weight: Tensor, bias: Tensor, steps: int,
                        lr: float = 1e-3, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """One tuned-lens translator trained by Adam on KL(final || tuned lens) (Belrose et al., 2023).

    h, h_final: `[n_tokens, d_model]` residual streams at one layer and at the end. weight `[d, d]`, bias `[d]`:
    the starting translator (e.g. the ridge fit); they are not modified. Step s uses the tokens
    `[(s * batch_size) % n_tokens : ... + batch_size]` (a fixed cycle through the data, no shuffling). The model is
    frozen: gradients reach only the translator. Returns the trained (weight, bias), detached.
    """
    if h.shape != h_final.shape or h.ndim != 2:
        raise ValueError(f"h and h_final must both be [n_tokens, d_model], got {tuple(h.shape)} and "
                         f"{tuple(h_final.shape)}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    eps = _norm_eps(model)
    w_u, b_u = model.W_U.detach(), model.b_U.detach()
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    n_tokens = h.shape[0]
    with torch.enable_grad():  # also when the caller has switched gradients off
        for step in range(steps):
            start = (step * batch_size) % n_tokens
            x, y = h[start:start + batch_size], h_final[start:start + batch_size]
            with torch.no_grad():
                log_p = ((y / rms(y, eps)) @ w_u + b_u).log_softmax(-1)
            translated = x @ weight + bias
            log_q = ((translated / rms(translated, eps)) @ w_u + b_u).log_softmax(-1)
            loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return weight.detach(), bias.detach()
