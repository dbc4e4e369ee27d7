"""Toy transformers: build a small TL-native model, train it in seconds, save and load it.

    model = build_toy(n_layers=2, d_model=128, n_heads=8, d_vocab=500, n_ctx=64, attn_only=True, seed=0)
    losses = train(model, batches, steps=2000, lr=1e-3)
    save_toy(model, "toy.pt"); model = load_toy("toy.pt")

The model is a `TransformerBridge` around TransformerLens's native model (no HuggingFace), so every hook,
cache and weight property (`W_Q`, `W_OV`, ...) works exactly as on SmolLM2.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.course.remote import course_object

# The config fields a checkpoint stores; enough to rebuild the same architecture.
_CONFIG_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "attn_only",
                  "normalization_type", "act_fn", "positional_embedding_type", "seed")


def build_toy(n_layers: int = 2, d_model: int = 128, n_heads: int = 8, d_vocab: int = 500, n_ctx: int = 64,
              attn_only: bool = False, d_mlp: int | None = None, normalization_type: str | None = "LN",
              act_fn: str = "gelu", positional_embedding_type: str = "standard", seed: int = 0):
    """A freshly initialised TL-native transformer wrapped in a TransformerBridge (compatibility mode)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources import boot_native

    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
    config = TransformerBridgeConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=None if attn_only else (d_mlp or 4 * d_model), d_vocab=d_vocab, n_ctx=n_ctx, attn_only=attn_only,
        normalization_type=normalization_type, act_fn=None if attn_only else act_fn,
        positional_embedding_type=positional_embedding_type, seed=seed,
    )
    model = boot_native(config)
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return model


def toy_config(model) -> dict:
    return {field: getattr(model.cfg, field) for field in _CONFIG_FIELDS}


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]; `mask` [batch, pos-1] selects targets."""
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    if mask is None:
        return losses.mean()
    mask = mask.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp(min=1)


@torch.enable_grad()  # a notebook may have turned gradients off globally
def train(model, batches: Iterable | Callable[[int], tuple], steps: int, lr: float = 1e-3, weight_decay: float = 0.0,
          log_every: int = 50, callback: Callable[[int, object], dict] | None = None, seed: int = 0,
          desc: str = "training") -> list[dict]:
    """Train `model` with AdamW on next-token loss; returns a log of {"step", "loss", ...callback's values}.

    `batches(step)` returns `tokens` or `(tokens, mask)`; `callback(step, model)` may add measurements to the
    log every `log_every` steps (e.g. an induction score), so a chapter can plot them over training.
    """
    torch.manual_seed(seed)
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    get_batch = batches if callable(batches) else _cycle(batches)
    log: list[dict] = []
    progress = tqdm(range(steps), desc=desc)
    for step in progress:
        batch = get_batch(step)
        tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
        loss = next_token_loss(model(tokens), tokens, mask)
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
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return log


def _cycle(batches: Iterable):
    stored = list(batches)
    if not stored:
        raise ValueError("train() got an empty list of batches.")
    return lambda step: stored[step % len(stored)]


def save_toy(model, path: str | Path, **metadata) -> Path:
    """Save the weights and the config (and any extra metadata, e.g. how it was trained) to one small file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.original_model.state_dict().items()}
    torch.save({"config": toy_config(model), "state_dict": state, "metadata": metadata}, path)
    return path


def load_toy(path: str | Path, device: str = "cpu"):
    """Rebuild a model saved by `save_toy`. Returns the bridge; `.toy_metadata` holds the saved metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No toy model at {path}. Train one in the notebook, or regenerate the shipped "
                                f"weights with the script named in the chapter.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = dict(checkpoint["config"])
    d_head = config.pop("d_head")
    if config["d_model"] // config["n_heads"] != d_head:
        raise ValueError(f"{path}: d_head {d_head} does not match d_model / n_heads.")
    model = build_toy(**config)
    model.original_model.load_state_dict(checkpoint["state_dict"])
    if device != "cpu":
        model.to(device)
    model.eval()
    model.toy_metadata = checkpoint.get("metadata", {})
    return model


DATA = Path(__file__).resolve().parents[1] / "data"


@course_object  # checks pass it to learners' functions; the grader rebuilds it in the kernel by name
@functools.lru_cache(maxsize=8)
def shipped_toy(filename: str):
    """A toy model shipped in data/ (made by a script in scripts/), loaded once; e.g. shipped_toy("toy_induction.pt")."""
    return load_toy(DATA / filename)
