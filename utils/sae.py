"""Sparse autoencoders on a model's residual stream: the forward pass, training, metrics, splicing, clamping.

An SAE is four tensors, named and shaped as SAELens names them on disk:

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_in]   b_dec [d_in]

    acts  = activation((x - b_dec) @ W_enc + b_enc)     # ReLU ("standard") or TopK(k) ("topk")
    recon = acts @ W_dec + b_dec

Here an SAE is a plain dict of those tensors (`params`) plus its architecture and k, so that every function is a
function of tensors. `save_sae` / `load_sae` write and read SAELens's layout (cfg.json + sae_weights.safetensors),
so `sae_lens.SAE.load_from_disk(folder)` loads what this module saves, and `load_sae` reads SAELens's own saves.

    params = train_sae(activations, d_sae=4608, architecture="topk", k=32, n_steps=2000)
    recon, acts = sae_forward(x, params, "topk", 32)
    fraction_variance_explained(x, recon), latent_statistics(acts)["l0"]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

ARCHITECTURES = ("standard", "topk")
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"  # SAELens's file names (sae_lens/constants.py)
SAE_CFG_FILENAME = "cfg.json"
SPARSITY_FILENAME = "sparsity.safetensors"
SAE_LENS_VERSION = "6.54.12"  # the version whose on-disk layout this follows
ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SAE = ROOT / "data" / "sae_smollm2_l15_topk"


def _check_architecture(architecture: str, k: int | None) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if architecture == "topk" and (k is None or k < 1):
        raise ValueError("a TopK SAE needs k >= 1")


# ---------------------------------------------------------------------------------------------------------
# The forward pass and the loss
# ---------------------------------------------------------------------------------------------------------


def topk_activation(pre_acts: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations of each row (ReLU'd), zero the rest. Same shape as `pre_acts`."""
    values, indices = pre_acts.topk(k, dim=-1)
    return torch.zeros_like(pre_acts).scatter(-1, indices, values.relu())


def encode(x: torch.Tensor, params: dict, architecture: str, k: int | None = None) -> torch.Tensor:
    """Latent activations [..., d_sae] of inputs x [..., d_in]."""
    _check_architecture(architecture, k)
    pre_acts = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    return topk_activation(pre_acts, k) if architecture == "topk" else pre_acts.relu()


def decode(acts: torch.Tensor, params: dict) -> torch.Tensor:
    return acts @ params["W_dec"] + params["b_dec"]


def sae_forward(x: torch.Tensor, params: dict, architecture: str, k: int | None = None):
    """(reconstruction [..., d_in], latent activations [..., d_sae])."""
    acts = encode(x, params, architecture, k)
    return decode(acts, params), acts


def sae_loss(x: torch.Tensor, params: dict, architecture: str, k: int | None, l1_coefficient: float) -> dict:
    """The training loss on a batch x [batch, d_in], as a dict of scalar tensors:

    "mse":      squared reconstruction error, summed over d_in, averaged over the batch;
    "l1":       the L1 norm of the latent activations, each weighted by its decoder row's norm (so that shrinking
                activations while growing decoder rows cannot cheat the penalty), averaged over the batch;
    "loss":     mse + l1_coefficient * l1 (a TopK SAE is trained with l1_coefficient = 0: k sets the sparsity).
    """
    recon, acts = sae_forward(x, params, architecture, k)
    mse = (recon - x).pow(2).sum(-1).mean()
    l1 = (acts * params["W_dec"].norm(dim=-1)).sum(-1).mean()
    return {"mse": mse, "l1": l1, "loss": mse + l1_coefficient * l1}


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def init_sae(d_in: int, d_sae: int, seed: int = 0, b_dec: torch.Tensor | None = None) -> dict:
    """Random unit-norm decoder rows, the encoder initialised to the decoder's transpose (Gao et al. 2024),
    b_enc = 0 and b_dec = `b_dec` (e.g. the data's mean) or 0."""
    generator = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return {"W_enc": W_dec.T.clone().contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
            "b_dec": torch.zeros(d_in) if b_dec is None else b_dec.detach().clone().float()}


def _topk_sparse_loss(x, params, k, aux_k, dead_mask, aux_coefficient):
    """The TopK SAE's loss with a sparse decoder: the reconstruction sums the k chosen decoder rows
    (embedding_bag) instead of multiplying a mostly-zero [batch, d_sae] matrix, which saves about a third of a
    training step on a CPU. Same values and gradients as the dense `sae_loss`."""
    centred = x - params["b_dec"]
    pre_all = centred @ params["W_enc"] + params["b_enc"]
    indices = pre_all.detach().topk(k, dim=-1).indices  # [batch, k]
    pre = pre_all.gather(-1, indices)
    acts = pre.relu()
    recon = torch.nn.functional.embedding_bag(indices, params["W_dec"], per_sample_weights=acts,
                                              mode="sum") + params["b_dec"]
    error = x - recon
    mse = error.pow(2).sum(-1).mean()
    out = {"mse": mse, "loss": mse, "indices": indices, "acts": acts}
    if aux_k and dead_mask is not None and dead_mask.any():
        # AuxK (Gao et al. 2024): the top aux_k *dead* latents try to reconstruct the main error, so their
        # encoders get gradient and they can come back to life.
        n_aux = min(aux_k, int(dead_mask.sum()))
        aux_indices = pre_all.detach().masked_fill(~dead_mask, -math.inf).topk(n_aux, dim=-1).indices
        aux_recon = torch.nn.functional.embedding_bag(aux_indices, params["W_dec"],
                                                      per_sample_weights=pre_all.gather(-1, aux_indices).relu(),
                                                      mode="sum")
        target = error.detach()
        aux = (aux_recon - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp_min(1e-8)
        out["aux"] = aux
        out["loss"] = mse + aux_coefficient * aux
    return out


def train_sae(activations: torch.Tensor, d_sae: int, architecture: str = "topk", k: int | None = 32,
              l1_coefficient: float = 0.0, n_steps: int = 1000, batch_size: int = 1024, lr: float = 1e-3,
              seed: int = 0, *, aux_k: int = 0, aux_coefficient: float = 1 / 32, dead_after: int = 200_000,
              lr_decay_fraction: float = 0.2, log: list | None = None, log_every: int = 100,
              progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train an SAE on `activations` [n, d_in] with Adam; return its params (float32, detached).

    Each step draws `batch_size` rows at random (torch.Generator seeded with `seed`), takes an Adam step on
    `sae_loss`, then rescales every decoder row to unit norm (Bricken et al. 2023; Gao et al. 2024), after
    removing the gradient's component along each row so Adam does not fight the constraint. b_dec starts at the
    data's mean. The learning rate decays linearly to 0 over the last `lr_decay_fraction` of the steps.

    Extras used by scripts/train_sae.py: `aux_k` > 0 adds Gao et al.'s AuxK loss for latents that have not
    fired in the last `dead_after` training tokens; `log` (a list) receives a dict every `log_every` steps.
    """
    _check_architecture(architecture, k)
    activations = activations.float() if activations.dtype != torch.float32 else activations
    n, d_in = activations.shape
    generator = torch.Generator().manual_seed(seed)
    params = init_sae(d_in, d_sae, seed, b_dec=activations[:min(n, 65536)].mean(0))
    for tensor in params.values():
        tensor.requires_grad_(True)
    optimiser = torch.optim.Adam(params.values(), lr=lr)
    decay_start = int(n_steps * (1 - lr_decay_fraction))
    tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
    with torch.enable_grad():
        for step in range(n_steps):
            batch = activations[torch.randint(0, n, (batch_size,), generator=generator)]
            if architecture == "topk":
                dead = tokens_since_fired >= dead_after if aux_k else None
                losses = _topk_sparse_loss(batch, params, k, aux_k, dead, aux_coefficient)
                fired = torch.zeros(d_sae, dtype=torch.bool)
                fired[losses["indices"][losses["acts"] > 0]] = True
            else:
                losses = sae_loss(batch, params, architecture, k, l1_coefficient)
                fired = None
            optimiser.zero_grad(set_to_none=True)
            losses["loss"].backward()
            with torch.no_grad():
                W_dec, grad = params["W_dec"], params["W_dec"].grad
                grad -= (grad * W_dec).sum(-1, keepdim=True) * W_dec  # keep only the part tangent to the sphere
            if step >= decay_start:
                for group in optimiser.param_groups:
                    group["lr"] = lr * (n_steps - step) / max(1, n_steps - decay_start)
            optimiser.step()
            with torch.no_grad():
                params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
            if fired is not None:
                tokens_since_fired += batch_size
                tokens_since_fired[fired] = 0
            if log is not None and (step % log_every == 0 or step == n_steps - 1):
                entry = {"step": step, "tokens": (step + 1) * batch_size, "mse": float(losses["mse"].detach())}
                if "aux" in losses:
                    entry["aux"] = float(losses["aux"].detach())
                if "l1" in losses:
                    entry["l1"] = float(losses["l1"].detach())
                entry["dead"] = int((tokens_since_fired >= dead_after).sum()) if fired is not None else None
                log.append(entry)
                if progress is not None:
                    progress(step, entry)
    return {name: tensor.detach() for name, tensor in params.items()}


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def fraction_variance_explained(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """1 - (squared error) / (variance of x about its mean), summed over all rows and dimensions; a scalar.
    1 = perfect; 0 = no better than predicting the mean activation for every token."""
    x, recon = x.reshape(-1, x.shape[-1]).float(), recon.reshape(-1, recon.shape[-1]).float()
    return 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def latent_statistics(acts: torch.Tensor, dense_threshold: float = 0.1) -> dict:
    """Sparsity statistics of latent activations [n_tokens, d_sae] (extra leading dims are flattened):

    "l0": mean number of active (> 0) latents per token (a float);
    "firing_rate": [d_sae] fraction of tokens on which each latent is active;
    "n_dead": latents active on no token; "n_dense": latents active on more than `dense_threshold` of tokens.
    """
    active = acts.reshape(-1, acts.shape[-1]) > 0
    firing_rate = active.float().mean(0)
    return {"l0": float(active.sum(-1).float().mean()), "firing_rate": firing_rate,
            "n_dead": int((firing_rate == 0).sum()), "n_dense": int((firing_rate > dense_threshold).sum())}


SPLICE_MODES = ("clean", "sae", "zero", "mean")


def spliced_loss(model, tokens: torch.Tensor, hook_name: str, params: dict | None, architecture: str | None,
                 k: int | None, mode: str, mean_activation: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on `tokens` [batch, pos] with the activation at `hook_name`
    replaced, at every position but the first (the BOS token, which SAEs are not trained on), by:
    "clean" nothing (the model's own loss), "sae" the SAE's reconstruction, "zero" zeros, "mean" `mean_activation`.
    A scalar tensor."""
    if mode not in SPLICE_MODES:
        raise ValueError(f"mode must be one of {SPLICE_MODES}, got {mode!r}")

    def replace(activation, hook):
        if mode == "sae":
            replacement = sae_forward(activation[:, 1:], params, architecture, k)[0]
        elif mode == "zero":
            replacement = torch.zeros_like(activation[:, 1:])
        else:
            replacement = mean_activation.to(activation.dtype).expand_as(activation[:, 1:])
        activation = activation.clone()
        activation[:, 1:] = replacement
        return activation

    hooks = [] if mode == "clean" else [(hook_name, replace)]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    log_probs = logits[:, :-1].float().log_softmax(-1)
    return -log_probs.gather(-1, tokens[:, 1:, None]).mean()


def ce_loss_recovered(clean_loss: float, spliced: float, ablated: float) -> float:
    """How much of the loss an ablation destroys is brought back by the SAE: (ablated - spliced) / (ablated -
    clean). 1 = the reconstruction is as good as the real activation; 0 = no better than the ablation."""
    return float((ablated - spliced) / (ablated - clean_loss))


# ---------------------------------------------------------------------------------------------------------
# Dashboards: the statistics behind a feature's page
# ---------------------------------------------------------------------------------------------------------


def top_activations(latent_acts: torch.Tensor, n: int):
    """The n largest activations of one latent over [n_seq, seq_len], largest first, positive ones only:
    (values [m], sequence indices [m], positions [m]) with m = min(n, number of positive activations)."""
    flat = latent_acts.flatten()
    m = min(n, int((flat > 0).sum()))
    values, indices = flat.topk(m)
    return values, indices // latent_acts.shape[1], indices % latent_acts.shape[1]


def promoted_tokens(direction: torch.Tensor, W_U: torch.Tensor, n: int):
    """The tokens a decoder direction [d_model] pushes up and down through the unembedding W_U [d_model, vocab]:
    (top ids [n], their logit contributions [n], bottom ids [n], their contributions [n]), largest-magnitude first."""
    logits = direction.float() @ W_U.float()
    top = logits.topk(n)
    bottom = (-logits).topk(n)
    return top.indices, top.values, bottom.indices, -bottom.values


def activation_histogram(values: torch.Tensor, n_bins: int = 30):
    """(counts [n_bins], bin edges [n_bins + 1]) of a latent's positive activations."""
    values = values[values > 0].float()
    if values.numel() == 0:
        return torch.zeros(n_bins), torch.linspace(0, 1, n_bins + 1)
    edges = torch.linspace(0, float(values.max()), n_bins + 1)
    counts = torch.histc(values, bins=n_bins, min=0, max=float(values.max()))
    return counts, edges


# ---------------------------------------------------------------------------------------------------------
# Clamping a latent ("Golden Gate") and measuring what it does to generation
# ---------------------------------------------------------------------------------------------------------


def clamp_latent(resid: torch.Tensor, params: dict, architecture: str, k: int | None, latent: int,
                 value: float) -> torch.Tensor:
    """The residual stream [..., d_in] with one latent's activation set to `value`, everything else kept:
    resid + (value - acts[..., latent]) * W_dec[latent]. The SAE's error (what it fails to reconstruct) and
    every other latent stay as they were (Templeton et al. 2024 clamp this way)."""
    acts = encode(resid, params, architecture, k)
    return resid + (value - acts[..., latent, None]) * params["W_dec"][latent]


def generate_clamped(model, tokens: torch.Tensor, hook_name: str, params: dict | None, architecture: str | None,
                     k: int | None, latent: int | None, value: float | None, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of `tokens` [batch, pos] (BOS first; every row the same length) for `max_new_tokens`
    tokens, with `latent` clamped to `value` at `hook_name` at every position but BOS on every forward pass
    (latent None: no clamp). Recomputes the whole sequence each step (no KV cache), so the clamp applies to the
    prompt and to every generated token. Returns [batch, pos + max_new_tokens]."""

    def clamp(activation, hook):
        activation = activation.clone()
        activation[:, 1:] = clamp_latent(activation[:, 1:], params, architecture, k, latent, value)
        return activation

    hooks = [] if latent is None else [(hook_name, clamp)]
    tokens = tokens.clone()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def continuation_perplexity(model, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Per-row perplexity [batch] of the tokens after the first `prompt_length` under `model` as it is (no hooks):
    exp(mean negative log-probability of tokens[:, prompt_length:]). The fluency measure of a steered text."""
    with torch.no_grad():
        logits = model(tokens)
    log_probs = logits[:, prompt_length - 1:-1].float().log_softmax(-1)
    nll = -log_probs.gather(-1, tokens[:, prompt_length:, None])[..., 0]
    return nll.mean(-1).exp()


# ---------------------------------------------------------------------------------------------------------
# Activations and SAELens's on-disk layout
# ---------------------------------------------------------------------------------------------------------


HUMAN_TEXT = ROOT / "data" / "sae_human_text.jsonl.gz"
TEXT_SOURCES = ("smollm2_corpus", "python_docs")  # in this order: source i is shuffled with seed + i


def human_texts() -> list[str]:
    """The human-written prose of data/sae_human_text.jsonl.gz (Python 3.11 documentation; see
    scripts/make_human_text.py), one string per document."""
    import gzip

    with gzip.open(HUMAN_TEXT, "rt", encoding="utf-8") as file:
        return [json.loads(line)["text"] for line in file if line.strip()]


def text_sequences(tokenizer, texts: list[str], seq_len: int, seed: int) -> torch.Tensor:
    """Shuffle the documents (random.Random(seed)), join them with EOS, cut into rows of BOS + (seq_len - 1)
    tokens: a LongTensor [n_rows, seq_len]."""
    import random

    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    random.Random(seed).shuffle(encoded)
    stream = [token for ids in encoded for token in list(ids) + [tokenizer.eos_token_id]]
    n_rows = len(stream) // (seq_len - 1)
    body = torch.tensor(stream[:n_rows * (seq_len - 1)]).view(n_rows, seq_len - 1)
    return torch.cat([torch.full((n_rows, 1), tokenizer.bos_token_id), body], dim=1)


def train_held_out_split(rows: torch.Tensor, held_out_fraction: float, seed: int):
    """(training rows, held-out rows): a seeded random permutation, the first `held_out_fraction` held out."""
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    n_held = max(1, int(rows.shape[0] * held_out_fraction))
    return rows[order[n_held:]], rows[order[:n_held]]


def sae_text_split(model, source: str, seq_len: int = 128, held_out_fraction: float = 0.05, seed: int = 0):
    """(training rows, held-out rows) of one of the shipped SAE's two text sources, exactly as
    scripts/train_sae.py cut them: "smollm2_corpus" (data/corpus.jsonl.gz) or "python_docs" (human text)."""
    from utils.corpus import corpus_texts

    if source not in TEXT_SOURCES:
        raise ValueError(f"source must be one of {TEXT_SOURCES}, got {source!r}")
    index = TEXT_SOURCES.index(source)
    texts = corpus_texts() if source == "smollm2_corpus" else human_texts()
    rows = text_sequences(model.tokenizer, texts, seq_len, seed + index)
    return train_held_out_split(rows, held_out_fraction, seed + index)


def collect_residuals(model, tokens: torch.Tensor, layer: int, batch_size: int = 16, drop_bos: bool = True,
                      dtype: torch.dtype = torch.float32, progress: bool = False) -> torch.Tensor:
    """The residual stream after block `layer` ("blocks.{layer}.hook_resid_post") for `tokens` [n_seq, pos],
    as [n_seq, pos (- 1 without BOS), d_model]; stops the forward pass there (stop_at_layer), so it costs about
    (layer + 1) / n_layers of a full pass."""
    chunks = []
    starts = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"residuals after block {layer}")
    with torch.no_grad():
        for start in starts:
            resid = model.forward(tokens[start:start + batch_size], stop_at_layer=layer + 1)
            chunks.append((resid[:, 1:] if drop_bos else resid).to(dtype))
    return torch.cat(chunks)


def sae_lens_cfg(d_in: int, d_sae: int, architecture: str, k: int | None, hook_name: str, model_name: str,
                 context_size: int, dataset_path: str = "", **extra_metadata) -> dict:
    """cfg.json's contents as SAELens 6 writes them (SAEConfig.to_dict(): fields, "metadata", "architecture")."""
    _check_architecture(architecture, k)
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAE_LENS_VERSION, "sae_lens_training_version": SAE_LENS_VERSION,
                        "model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
                        "context_size": context_size, "prepend_bos": True, "dataset_path": dataset_path,
                        "model_from_pretrained_kwargs": {}, **extra_metadata},
           "architecture": architecture}
    if architecture == "topk":
        cfg.update({"k": k, "rescale_acts_by_decoder_norm": False})
    return cfg


def save_sae(folder: str | Path, params: dict, cfg: dict, weights_dtype: torch.dtype = torch.float32,
             firing_rate: torch.Tensor | None = None) -> Path:
    """Write `folder`/cfg.json and `folder`/sae_weights.safetensors (and sparsity.safetensors, log10 firing rates,
    if given), as SAELens's `SAE.save_model` does."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {"W_enc": (cfg["d_in"], cfg["d_sae"]), "b_enc": (cfg["d_sae"],), "W_dec": (cfg["d_sae"], cfg["d_in"]),
                "b_dec": (cfg["d_in"],)}
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(params[name].shape)}, the config says {shape}")
    save_file({name: params[name].detach().to(weights_dtype).contiguous() for name in expected},
              str(folder / SAE_WEIGHTS_FILENAME))
    (folder / SAE_CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    if firing_rate is not None:
        save_file({"sparsity": firing_rate.float().clamp_min(1e-10).log10()}, str(folder / SPARSITY_FILENAME))
    return folder


def load_sae(folder: str | Path = SHIPPED_SAE) -> tuple[dict, dict]:
    """(params as float32 tensors, cfg dict) from a folder in SAELens's layout (ours or SAELens's own)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / SAE_CFG_FILENAME).read_text())
    state = load_file(str(folder / SAE_WEIGHTS_FILENAME))
    params = {name: state[name].float() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return params, cfg


def load_firing_rate(folder: str | Path = SHIPPED_SAE) -> torch.Tensor | None:
    from safetensors.torch import load_file

    path = Path(folder) / SPARSITY_FILENAME
    return 10 ** load_file(str(path))["sparsity"] if path.is_file() else None
