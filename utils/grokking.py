"""Grokking modular addition: the model, the data, the Fourier basis and the progress measures of chapter 13.

    model = build_grokking_model(p=113)                    # 1 layer, no LayerNorm, ReLU MLP, inputs "a b ="
    tokens, labels = modular_addition_data(113)           # all p*p pairs, "=" is token p
    train_idx, test_idx = train_test_split(113 * 113, 0.3, seed=0)
    log = train_grokking(model, tokens, labels, train_idx, test_idx, epochs=1000)

The course's references of the chapter's exercises live here (the checks compare learners' answers with them);
the model is a `TransformerBridge` around TransformerLens's native model, so hooks and caches work as on
SmolLM2. Training runs on the native module underneath with a forward pass that computes only the last
position (the only one read in a one-layer model), which is exactly the bridge's logits at "=" (tested).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from utils.course.remote import course_object

DATA = Path(__file__).resolve().parents[1] / "data"
CHECKPOINTS = DATA / "grokking_p113.pt"


# --------------------------------------------------------------------------------------------------- the model
def build_grokking_model(p: int = 113, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512, seed: int = 0):
    """The paper's one-layer modular-addition transformer: no LayerNorm, ReLU MLP, vocabulary 0..p-1 and "=" (= p),
    outputs over the p residues. Returns a TransformerBridge (compatibility mode) around the native model."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources import boot_native

    if p < 2 or d_model % n_heads:
        raise ValueError(f"need p >= 2 and d_model divisible by n_heads (got p={p}, d_model={d_model}, "
                         f"n_heads={n_heads}).")
    config = TransformerBridgeConfig(
        n_layers=1, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads, d_mlp=d_mlp, d_vocab=p + 1,
        d_vocab_out=p, n_ctx=3, act_fn="relu", normalization_type=None, positional_embedding_type="standard",
        seed=seed,
    )
    model = boot_native(config)
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    model.eval()
    return model


def last_position_logits(native, tokens: torch.Tensor, embed_override: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at the last position ("=") of the native one-layer model, computing the MLP and unembedding there
    only. Equal to `bridge(tokens)[:, -1]`. `embed_override` [d_vocab, d_model] replaces the token embedding
    (used to train with a fixed Fourier embedding)."""
    W_E = _raw(native.tok_embed).weight if embed_override is None else embed_override
    W_pos = _raw(native.pos).weight
    block = _raw(native.layers[0])
    attn, mlp = _raw(block.attn), _raw(block.mlp)
    q_proj, k_proj, v_proj, o_proj = (_raw(attn.q), _raw(attn.k), _raw(attn.v), _raw(attn.o))
    n, seq = tokens.shape
    heads, d_head = attn.n_heads, attn.d_head
    # Each position's residual is an embedding row plus a positional row, so its key and value are a row of a
    # small per-position table [d_vocab, ...]: look them up instead of projecting every sample (same numbers).
    keys, values = [], []
    for s in range(seq):
        x_s = W_E + W_pos[s]
        keys.append(k_proj(x_s)[tokens[:, s]])
        values.append(v_proj(x_s)[tokens[:, s]])
    k = torch.stack(keys, 1).view(n, seq, heads, d_head)
    v = torch.stack(values, 1).view(n, seq, heads, d_head)
    last = W_E[tokens[:, -1]] + W_pos[seq - 1]  # residual at "=" before the layer
    q = q_proj(W_E + W_pos[seq - 1])[tokens[:, -1]].view(n, 1, heads, d_head)
    pattern = ((q * k).sum(-1) / attn.scale).softmax(1)  # [n, seq, heads]: the last query sees every key
    z = (pattern.unsqueeze(-1) * v).sum(1).reshape(n, heads * d_head)
    resid = last + o_proj(z)
    mlp_in, mlp_out = _raw(mlp.fc_in), _raw(mlp.fc_out)
    resid = resid + mlp_out(mlp_in(resid).relu())
    return _raw(native.head)(resid)


def _raw(module):
    """The native module inside a bridge component (the bridge wraps each one to add hook points)."""
    return getattr(module, "original_component", module)


# ---------------------------------------------------------------------------------------------------- the data
def modular_addition_data(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair (a, b) in a-major order: tokens [p*p, 3] = (a, b, p) with p standing for "=", labels (a+b) mod p."""
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}.")
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


def train_test_split(n: int, frac_train: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random permutation of range(n) (torch.Generator seeded with `seed`); the first round(frac_train*n)
    indices train, the rest test. Both returned sorted."""
    if not 0 < frac_train < 1:
        raise ValueError(f"frac_train must be in (0, 1), got {frac_train}.")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    cut = int(round(frac_train * n))
    return perm[:cut].sort().values, perm[cut:].sort().values


# ----------------------------------------------------------------------------------------------------- training
def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy (computed in float64, as the paper does, so tiny losses are not rounded) and accuracy."""
    loss = F.cross_entropy(logits.double(), labels).item()
    return loss, (logits.argmax(-1) == labels).float().mean().item()


@torch.enable_grad()
def train_grokking(model, tokens, labels, train_idx, test_idx, epochs: int, lr: float = 1e-3,
                   weight_decay: float = 1.0, betas=(0.9, 0.98), log_every: int = 100,
                   embed_override: torch.Tensor | None = None, stop_at_test_acc: float | None = None,
                   on_log: Callable[[int, object], None] | None = None) -> list[dict]:
    """Full-batch AdamW on the training pairs; returns a log of {"epoch", "train_loss", "test_loss", "train_acc",
    "test_acc"} every `log_every` epochs (and the last). Stops early once the test accuracy reaches
    `stop_at_test_acc` (checked at each log). `on_log(epoch, native)` can save checkpoints."""
    native = model.original_model
    native.train()
    params = [q for name, q in native.named_parameters() if not (embed_override is not None and "tok_embed" in name)]
    for q in params:
        q.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    x_train, y_train = tokens[train_idx], labels[train_idx]
    x_test, y_test = tokens[test_idx], labels[test_idx]
    log: list[dict] = []
    for epoch in range(epochs + 1):
        logits = last_position_logits(native, x_train, embed_override)
        if epoch % log_every == 0 or epoch == epochs:
            with torch.no_grad():
                train_loss, train_acc = loss_and_accuracy(logits, y_train)
                test_loss, test_acc = loss_and_accuracy(last_position_logits(native, x_test, embed_override), y_test)
            log.append({"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss, "train_acc": train_acc,
                        "test_acc": test_acc})
            if on_log is not None:
                on_log(epoch, native)
            if stop_at_test_acc is not None and test_acc >= stop_at_test_acc:
                break
        if epoch == epochs:
            break
        loss = F.cross_entropy(logits.double(), y_train)  # float64 as in the paper (no slingshots from rounding)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    native.eval()
    return log


# ------------------------------------------------------------------------------------- exercises' references
def modular_addition_split(p: int, frac_train: float, seed: int = 0):
    """Exercise 13.1: (tokens [p*p, 3], labels [p*p], train_idx, test_idx) for a + b mod p, a-major order,
    "=" = token p, the split drawn by `train_test_split(p*p, frac_train, seed)`'s rule."""
    tokens, labels = modular_addition_data(p)
    train_idx, test_idx = train_test_split(p * p, frac_train, seed)
    return tokens, labels, train_idx, test_idx


def fourier_basis(p: int) -> torch.Tensor:
    """Exercise 13.2: the real Fourier basis of functions on Z_p (p odd), one unit-norm basis vector per row:
    row 0 the constant, rows 2k-1 and 2k cos(2 pi k x / p) and sin(2 pi k x / p) for k = 1..(p-1)/2. [p, p]."""
    if not isinstance(p, int) or p < 3 or p % 2 == 0:
        raise ValueError(f"fourier_basis needs an odd p >= 3, got {p!r}.")
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
    basis = torch.stack(rows)
    return (basis / basis.norm(dim=1, keepdim=True)).float()


def frequency_norms(W: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Exercise 13.3: for W [p, d] (one row per residue, e.g. the embedding without "="), the norm of its
    Fourier component at each frequency k = 1..(p-1)/2: sqrt(sum over d of (cos_k . W)^2 + (sin_k . W)^2).
    [(p-1)/2]."""
    coefficients = basis @ W  # [p, d]: row i is how much of basis vector i each column holds
    cos_part, sin_part = coefficients[1::2], coefficients[2::2]
    return (cos_part.pow(2).sum(-1) + sin_part.pow(2).sum(-1)).sqrt()


def mlp_activations(model, p: int) -> torch.Tensor:
    """Exercise 13.4: the MLP's post-ReLU activations at "=" for every input pair, [p, p, d_mlp] indexed [a, b]."""
    tokens, _ = modular_addition_data(p)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_post")
    acts = cache["blocks.0.mlp.hook_post"][:, -1]
    return acts.reshape(p, p, -1).detach()


def frequency_variance_fractions(acts: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Exercise 13.5: for acts [p, p, n] (n functions of (a, b), e.g. neurons), the fraction of each one's variance
    (its sum of squares after removing its mean) explained by each frequency k = 1..(p-1)/2: the 2-D Fourier
    terms whose two indices both lie in {constant, cos_k, sin_k}, the constant-constant term excluded.
    [(p-1)/2, n]."""
    coefficients = torch.einsum("ia,jb,abn->ijn", basis, basis, acts.to(basis.dtype))  # 2-D Fourier transform
    energy = coefficients.pow(2)
    total = energy.sum((0, 1)) - energy[0, 0]  # the variance: everything but the mean
    fractions = []
    for k in range(1, basis.shape[0] // 2 + 1):
        idx = torch.tensor([0, 2 * k - 1, 2 * k])
        fractions.append((energy[idx][:, idx].sum((0, 1)) - energy[0, 0]) / total.clamp(min=1e-12))
    return torch.stack(fractions)


def logit_frequency_components(logits: torch.Tensor, p: int, freqs) -> torch.Tensor:
    """Exercise 13.6: the part of the logits [p*p, p] (rows a-major (a, b), columns c) along the directions
    cos(w_k (a + b - c)) and sin(w_k (a + b - c)), w_k = 2 pi k / p, for k in `freqs`: the sum of the orthogonal
    projections of the whole [p, p, p] array onto each direction. [p*p, p]."""
    a = torch.arange(p).view(p, 1, 1)
    b = torch.arange(p).view(1, p, 1)
    c = torch.arange(p).view(1, 1, p)
    cube = logits.reshape(p, p, p).double()
    component = torch.zeros_like(cube)
    for k in freqs:
        angle = 2 * math.pi * k * (a + b - c).double() / p
        for direction in (torch.cos(angle), torch.sin(angle)):
            component += (cube * direction).sum() / direction.pow(2).sum() * direction
    return component.reshape(p * p, p).to(logits.dtype)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.double(), labels).item()


def progress_measures(logits: torch.Tensor, labels: torch.Tensor, train_idx: torch.Tensor, test_idx: torch.Tensor,
                      key_freqs) -> dict:
    """Exercise 13.7: the paper's progress measures from the logits [p*p, p] of every pair: train and test loss,
    the restricted loss (only the key frequencies' components of the logits kept; all pairs) and the excluded loss
    (the key frequencies' components removed; training pairs). Cross-entropies in float64. A dict of floats."""
    p = logits.shape[1]
    key_part = logit_frequency_components(logits, p, key_freqs).double()
    logits = logits.double()
    return {"train_loss": _cross_entropy(logits[train_idx], labels[train_idx]),
            "test_loss": _cross_entropy(logits[test_idx], labels[test_idx]),
            "restricted_loss": _cross_entropy(key_part, labels),
            "excluded_loss": _cross_entropy((logits - key_part)[train_idx], labels[train_idx])}


def train_modular(p: int, frac_train: float, epochs: int, lr: float = 1e-3, weight_decay: float = 1.0,
                  seed: int = 0, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512,
                  fixed_embedding: torch.Tensor | None = None, log_every: int = 100,
                  stop_at_test_acc: float | None = None) -> list[dict]:
    """Exercise 13.9: build `build_grokking_model(p, d_model, n_heads, d_mlp, seed)`, split the pairs with
    `modular_addition_split(p, frac_train, seed)`, and train it full batch with AdamW (betas (0.9, 0.98)) on the
    training pairs' cross-entropy at "=". With `fixed_embedding` [p+1, d_model] the token embedding is set to it
    and not trained (nor decayed). The last log entry also holds "embedding", the final token embedding. Logs {"epoch", "train_loss", "test_loss", "train_acc", "test_acc"} before the
    update of every `log_every`-th epoch and at `epochs`; stops after logging a test accuracy >= stop_at_test_acc."""
    model = build_grokking_model(p, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, seed=seed)
    tokens, labels, train_idx, test_idx = modular_addition_split(p, frac_train, seed)
    override = None if fixed_embedding is None else fixed_embedding.detach().float()
    log = train_grokking(model, tokens, labels, train_idx, test_idx, epochs, lr=lr, weight_decay=weight_decay,
                         log_every=log_every, embed_override=override, stop_at_test_acc=stop_at_test_acc)
    log[-1]["embedding"] = (model.W_E if override is None else override).detach().clone()
    return log


def epochs_to_accuracy(log: list[dict], threshold: float = 0.99) -> int | None:
    """The first logged epoch whose test accuracy reaches `threshold` (None if none does)."""
    return next((row["epoch"] for row in log if row["test_acc"] >= threshold), None)


def fourier_embedding(p: int, freqs, projection: torch.Tensor, eq_row: torch.Tensor) -> torch.Tensor:
    """Exercise 13.12: a fixed token embedding [p+1, d_model] built from the key frequencies: row a (a < p) is
    sum_i cos(w_k a) projection[2i] + sin(w_k a) projection[2i+1] for the i-th frequency k of `freqs`
    (w_k = 2 pi k / p); row p ("=") is `eq_row`. `projection` is [2 * len(freqs), d_model]."""
    freqs = list(freqs)
    if projection.shape[0] != 2 * len(freqs):
        raise ValueError(f"projection needs 2 rows per frequency ({2 * len(freqs)}), got {projection.shape[0]}.")
    a = torch.arange(p, dtype=torch.float64).unsqueeze(1)
    w = 2 * math.pi * torch.tensor(freqs, dtype=torch.float64) / p
    features = torch.stack([torch.cos(w * a), torch.sin(w * a)], dim=-1).reshape(p, -1)  # cos k0, sin k0, cos k1...
    rows = features.to(projection.dtype) @ projection
    return torch.cat([rows, eq_row.reshape(1, -1).to(projection.dtype)])


def min_norm_least_squares(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exercise 13.10: the minimum-norm weights w minimising |X w - y|^2 (X [n, d], y [n]): the pseudo-inverse
    solution, which interpolates when d >= n. [d]."""
    return torch.linalg.pinv(X.double()) @ y.double()


def random_features_risk(X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor,
                         n_features: list[int], seed: int = 0) -> torch.Tensor:
    """Exercise 13.11: test mean squared error of min-norm least squares on random ReLU features, for each width N
    in `n_features`: W = torch.randn(d, max(n_features), generator seeded with `seed`, float64) / sqrt(d); the
    features are relu(X @ W[:, :N]). [len(n_features)]."""
    g = torch.Generator().manual_seed(seed)
    d = X_train.shape[1]
    W = torch.randn(d, max(n_features), generator=g, dtype=torch.float64) / math.sqrt(d)
    errors = []
    for N in n_features:
        phi_train = (X_train.double() @ W[:, :N]).relu()
        phi_test = (X_test.double() @ W[:, :N]).relu()
        w = min_norm_least_squares(phi_train, y_train)
        errors.append((phi_test @ w - y_test.double()).pow(2).mean())
    return torch.stack(errors)


# ------------------------------------------------------------------------------------------- shipped weights
def parameters_only(native, state: dict) -> dict:
    """The entries of a native model's state dict that are its parameters (the bridge lists each under several
    aliases; the parameters are enough to rebuild it)."""
    names = {name for name, _ in native.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def _load_parameters(model, state: dict) -> None:
    native = model.original_model
    missing = {name for name, _ in native.named_parameters()} - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks parameters {sorted(missing)}")
    native.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


@functools.lru_cache(maxsize=1)
def shipped_run() -> dict:
    """data/grokking_p113.pt as saved by scripts/train_grokking.py: checkpoints (fp16), log, split, settings."""
    if not CHECKPOINTS.is_file():
        raise FileNotFoundError(f"{CHECKPOINTS} is missing: run scripts/train_grokking.py (see NOTES-ch13.md).")
    return torch.load(CHECKPOINTS, map_location="cpu", weights_only=True)


@course_object  # checks pass it to learners' functions; the grader rebuilds it in the kernel by name
@functools.lru_cache(maxsize=4)
def grokking_checkpoint(epoch: int):
    """The shipped p = 113 model at `epoch` (one of the saved epochs), weights cast back to float32."""
    run = shipped_run()
    if epoch not in run["checkpoints"]:
        raise ValueError(f"no checkpoint at epoch {epoch}; saved: {sorted(run['checkpoints'])}.")
    s = run["settings"]
    model = build_grokking_model(s["p"], d_model=s["d_model"], n_heads=s["n_heads"], d_mlp=s["d_mlp"], seed=s["seed"])
    _load_parameters(model, run["checkpoints"][epoch])
    model.eval()
    return model


# --------------------------------------------------------------------------------------------- the three phases
MEMORISATION_END = "the epoch of the highest test loss"
CIRCUIT_ACC, CLEANUP_LOSS = 0.5, 1e-2


def curves_from_log(log: list[dict]) -> dict:
    """The training log as curves: {"epoch": [...], "train_loss": [...], "test_loss": [...], "test_acc": [...]}."""
    return {key: [row[key] for row in log] for key in ("epoch", "train_loss", "test_loss", "test_acc")}


def three_phases(curves: dict) -> tuple[int, int, int]:
    """Exercise 13.8: (end of memorisation, end of circuit formation, end of cleanup), as logged epochs:
    memorisation ends at the highest test loss (the first such epoch); circuit formation ends at the first epoch,
    after that, whose test accuracy is >= CIRCUIT_ACC (0.5); cleanup ends at the first epoch, after that, whose
    test loss is <= CLEANUP_LOSS (0.01). A boundary never reached is the last logged epoch."""
    epochs, test_loss, test_acc = curves["epoch"], curves["test_loss"], curves["test_acc"]
    if not len(epochs) == len(test_loss) == len(test_acc) or not epochs:
        raise ValueError("curves need equally long, non-empty 'epoch', 'test_loss' and 'test_acc' lists.")
    peak = max(range(len(epochs)), key=lambda i: (test_loss[i], -i))
    circuit = next((i for i in range(peak, len(epochs)) if test_acc[i] >= CIRCUIT_ACC), len(epochs) - 1)
    cleanup = next((i for i in range(circuit, len(epochs)) if test_loss[i] <= CLEANUP_LOSS), len(epochs) - 1)
    return epochs[peak], epochs[circuit], epochs[cleanup]


PAPER_LR_LOG = DATA / "grokking_p113_lr1e-3_log.pt"


@functools.lru_cache(maxsize=1)
def paper_lr_log() -> list[dict]:
    """The training log of the run with the paper's lr 1e-3 (18k epochs, did not grok); see scripts/train_grokking.py."""
    return torch.load(PAPER_LR_LOG, map_location="cpu", weights_only=True)["log"]


@functools.lru_cache(maxsize=1)
def shipped_epochs() -> list[int]:
    return sorted(shipped_run()["checkpoints"])


@course_object
@functools.lru_cache(maxsize=8)
def random_grokking_model(p: int, seed: int):
    """A small untrained model of the chapter's architecture (d_model 32, 4 heads, d_mlp 64), for the checks."""
    return build_grokking_model(p, d_model=32, n_heads=4, d_mlp=64, seed=seed)
